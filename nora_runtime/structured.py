"""Structured output: a JSON object, JSON that follows a JSON schema, or text matching a regex,
enforced token by token with a per-row mask of the tokens the grammar allows next.

The grammar library is llguidance (PyPI `llguidance`), chosen over xgrammar and outlines-core:
- CPU first: a Rust core with abi3 wheels for Linux, macOS and Windows and no dependency at all
  (xgrammar pulls in torch-version-specific code and its CPU wheels trail its CUDA ones;
  outlines-core compiles a whole regex index up front, seconds for larger schemas).
- Speed: the mask is computed lazily per step (about 50 us for a 50k vocabulary, measured by its
  authors; 2 ms here for the first mask of a schema on the tiny test model, compile included),
  so there is no per-schema compile before the first token; JSON schemas, regexes and Lark
  grammars go through one API (`LLMatcher`).
- Fit: it reads a transformers fast tokenizer as it is (`llguidance.hf.from_tokenizer`), the
  mask is a plain bitmask we apply ourselves (no torch.compile, no CUDA kernel), and a matcher
  is per request, so constrained and free rows share one batch: sampling.py applies each row's
  own mask, which keeps a row's token independent of the rest of the batch.

Grammars are compiled and validated once per spec (`Grammars.check`, cached): a bad schema or
regex is a ValueError (INVALID_ARGUMENT / HTTP 400) before the request is queued. A request then
has its own `Matcher`; when its grammar is complete (nothing may follow) the engine ends the
request with finish reason "stop". llguidance is imported lazily: a server without it serves
everything but structured output.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("json_object", "json_schema", "regex")
MAX_SPEC_CHARS = 65536  # a schema or regex longer than this is refused
CACHE_SIZE = 256  # compiled grammars kept
# JSON as json.dumps writes it, no other whitespace: llguidance's default allows any run of
# whitespace between tokens, and a weak model then spends its tokens on it (the tiny test
# model's schema answer was half tabs and newlines until it hit max_new_tokens)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: `kind` "json_object" (any JSON object; `spec` empty),
    "json_schema" (`spec`: the schema as JSON text) or "regex" (`spec`: the regex, matched by
    the whole output). Invalid values raise ValueError; whether a schema or regex compiles is
    checked by `Grammars.check` (it needs the tokenizer)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, got "
                             f"{self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"structured output spec must be text, got "
                             f"{type(self.spec).__name__}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} spec has {len(self.spec)} characters; the limit "
                             f"is {MAX_SPEC_CHARS}")
        if self.kind == "json_object" and self.spec:
            raise ValueError("json_object takes no spec (use json_schema for a schema)")
        if self.kind == "regex" and not self.spec:
            raise ValueError("regex needs a non-empty pattern")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object (or true/false), got "
                                 f"{type(schema).__name__}")
            object.__setattr__(self, "spec", json.dumps(schema, sort_keys=True))

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> StructuredOutput:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:  # pragma: no cover - it is a dependency; a stripped install lacks it
        raise ValueError("structured output needs the llguidance package, which this server "
                         "lacks") from None
    return llguidance


class Grammars:
    """The compiled grammars of one tokenizer (thread-safe: the servers check specs on worker
    threads, the engine makes matchers on its loop thread). `vocab_size`: the model's logits
    width (masks have this length); `eos_ids`: the tokens a complete grammar allows."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._lock = threading.Lock()
        self._lltok = None
        self._cache: OrderedDict[StructuredOutput, str] = OrderedDict()

    def _ll_tokenizer(self):
        ll = _llguidance()
        with self._lock:
            if self._lltok is None:
                n = max(self.vocab_size, len(self.tokenizer))
                self._lltok = ll.hf.from_tokenizer(self.tokenizer, n_vocab=n,
                                                   eos_token=list(self.eos_ids))
            return self._lltok

    def check(self, spec: StructuredOutput) -> str:
        """The grammar of `spec`, compiled and validated (cached); ValueError if it is bad."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        ll, tok = _llguidance(), self._ll_tokenizer()
        try:
            if spec.kind == "regex":
                grammar = ll.LLMatcher.grammar_from_regex(spec.spec)
            else:
                schema = {"type": "object"} if spec.kind == "json_object" else spec.spec
                grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"bad {spec.kind}: {exc}") from None
        error = ll.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise ValueError(f"bad {spec.kind}: {error.strip()}")
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutput) -> Matcher:
        """A fresh matcher of `spec` for one request (ValueError for a bad spec)."""
        ll = _llguidance()
        m = ll.LLMatcher(self._ll_tokenizer(), self.check(spec), log_level=0)
        if m.is_error():
            raise ValueError(f"bad {spec.kind}: {m.get_error()}")
        return Matcher(m, self.vocab_size)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._m, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next: [V] bool, on the CPU."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        return torch.from_numpy(mask)

    def consume(self, token: int) -> str | None:
        """Advance by the sampled token; an error message if the grammar refuses it."""
        if self._m.consume_token(token):
            return None
        return self._m.get_error() or f"token {token} does not fit the grammar"

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing may follow."""
        return self._m.is_stopped()


__all__ = ["Grammars", "KINDS", "Matcher", "StructuredOutput"]

"""Streaming text out of generated tokens: incremental detokenization that never splits a
character, and stop strings that a client never sees part of.

Per sequence, the engine does

    delta = detok.step(token_id)            # each new token
    text, stopped = stops.feed(delta)       # `text` is what the client may see now
    ...
    text, stopped = stops.feed(detok.flush())   # when generation ends otherwise
    text += stops.flush()                       # (if that did not stop)
"""

from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21
except ImportError:  # pragma: no cover - older tokenizers: the Python window only
    DecodeStream = None

REPLACEMENT = "\ufffd"  # what decoders put where bytes do not (yet) form a character


class IncrementalDetokenizer:
    """Text deltas of one sequence's output tokens. The concatenated deltas, after `flush()`,
    equal `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=
    False)`: the output's own text, without the prompt as context (so a first token "##s" or
    "▁world" decodes as decode() gives it, "##s" or "world").

    Decoding a token alone is wrong for two reasons: a byte-level token may hold part of a
    UTF-8 character (decoded as U+FFFD), and decoders give a token different text at the start
    of a sequence (WordPiece "##", SentencePiece's stripped leading space). So, as in vLLM and
    TGI, each step decodes a short window: `prefix` is the text of the tokens [start, read)
    whose text was emitted, and the new text is what decode(tokens[start:]) adds after it. The
    window start sits on earlier tokens, so the new tokens never see start-of-text effects.
    Trailing U+FFFD is held back until the character completes (or `flush()`); text before it
    goes out at once. The window only moves on at a clean end, so it stays a few tokens long.

    This relies on a token's text depending only on its neighbours, true of the fast
    tokenizers' decoders (ByteLevel, ByteFallback, Metaspace, WordPiece). Python-level
    `clean_up_tokenization_spaces` is not: it deletes spaces before punctuation that may
    already have been sent, so it is off here, as in vLLM (it also mangles code).

    With a fast tokenizer (`stream`, the default) the same window runs in Rust: `tokenizers`'
    DecodeStream, with no Python decode() per token. It holds back a whole token's text while
    that text ends mid-character (the Python window sends the complete characters before it at
    once), so text may come one token later; the concatenated text is the same. An id the
    backend does not know (a model whose vocabulary is larger than its tokenizer's) has no
    text, as decode() skips it, and DecodeStream never sees it. An error of DecodeStream and
    `flush()` hand over to the Python window, primed with every id so far and the text already
    sent, so that the rest is what decode() of the whole output adds.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True,
                 stream: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # output ids from the window start on
        self._read = 0  # window[:read] is fully emitted; window[:read] decodes to `_prefix`
        self._prefix = ""
        self._sent = 0  # characters emitted past `_prefix` of tokens window[read:]
        self._text: list[str] = []
        backend = getattr(tokenizer, "backend_tokenizer", None) if stream else None
        self._backend = backend
        self._stream = None  # the DecodeStream while it is in use
        if backend is not None and DecodeStream is not None:
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._vocab = backend.get_vocab_size(with_added_tokens=True)
            self._ids: list[int] = []  # every output id while streaming
            self._emitted = 0  # characters sent while streaming

    def _to_window(self) -> None:
        """Continue with the Python window: decode(all ids so far)[sent:] is still to come."""
        self._window, self._read, self._prefix = self._ids, 0, ""
        self._sent, self._stream = self._emitted, None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def step(self, token_id: int) -> str:
        """Add one output token; return the text it completes (often "", e.g. mid-character)."""
        if self._stream is not None:
            if not 0 <= token_id < self._vocab:  # no text, as in decode(): it skips such ids
                self._ids.append(token_id)
                return ""
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - the Python window decodes what Rust would not
                piece = False
            if piece is not False:
                self._ids.append(token_id)
                if piece:
                    self._text.append(piece)
                    self._emitted += len(piece)
                return piece or ""
            self._to_window()
        self._window.append(token_id)
        new = self._decode(self._window)
        start = len(self._prefix) + self._sent
        if new.endswith(REPLACEMENT):
            stable = len(new.rstrip(REPLACEMENT))
            delta = new[start:stable]
            self._sent += len(delta)
        else:
            delta = new[start:]
            if len(new) > len(self._prefix):  # the last emission's tokens become the window
                self._window = self._window[self._read:]
                self._read = len(self._window)
                self._prefix = self._decode(self._window)
                self._sent = 0
        if delta:
            self._text.append(delta)
        return delta

    def flush(self) -> str:
        """The held-back text (a trailing U+FFFD run) once the sequence has ended."""
        if self._stream is not None:
            self._to_window()
        new = self._decode(self._window)
        delta = new[len(self._prefix) + self._sent:]
        self._sent += len(delta)
        if delta:
            self._text.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text)


class StopChecker:
    """Cuts a text stream at the first stop string. `feed` holds back the longest suffix that
    could still grow into a stop string, so a client never sees part of one; on a match it
    returns the text before the stop string (the stop string itself is not output, as with
    OpenAI's API) and stopped=True. The match is the stop string that ends first in the text
    (on a tie the longest): the same however the text is split into deltas."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = stop
        self._starts = {s[0] for s in stop}  # a held-back suffix starts with one of these
        self._longest = max((len(s) for s in stop), default=0)
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped). Feed nothing more after a stop."""
        if not self.stop:
            return delta, False
        text = self._held + delta
        match = min(((i + len(s), i) for s in self.stop if (i := text.find(s)) >= 0),
                    default=None)
        if match is not None:
            self._held = ""
            return text[:match[1]], True
        hold = self._partial(text)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        first = max(0, len(text) - self._longest + 1)
        for i in range(first, len(text)):
            if text[i] in self._starts:
                tail = text[i:]
                if any(s.startswith(tail) for s in self.stop):
                    return len(text) - i
        return 0

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

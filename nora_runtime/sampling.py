"""Choosing the next token: per-row token masks (structured output, tokens banned before
min_new_tokens), repetition, presence and frequency penalties, temperature, top-k, top-p, min-p,
per-request seeds, log-probabilities (the chosen token's and the top k), and when a sequence
stops on a token or on length. A model's default
parameters come from its generation_config.json (`model_defaults`).

Determinism is the priority: a row's token depends only on its own logits, its parameters and
its own `torch.Generator`, never on which other rows share the batch or in which order. So the
same request with the same seed gives the same text however the scheduler batches it. Two
things make it so:

- All randomness is the Gumbel-max trick, `argmax(logits + Gumbel noise)`, which samples from
  `softmax(logits)`. Each row draws its noise, V uniforms, from its own generator: the one
  per-row loop in this file, with one kernel launch per sampled row (unavoidable: a batched draw
  from one generator would give row i noise that depends on the rows before it).
- Everything else is row-wise tensor math (penalty, scaling, sort, softmax, cumsum, argmax),
  vectorised over the batch with per-row parameter tensors, and the kept set of top-k/top-p is
  a threshold on logit values, so ties are resolved by value, not by the order a sort returns.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

from nora_runtime.structured import StructuredOutput

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily: logits / T would overflow float32
# Ranges of the float parameters, for float32 math (the sampler's): a double that is fine in
# Python can round to 0 or inf in float32 (repetition_penalty=1e-300 became 0: logits / 0 gave
# NaN log-probabilities). Inside these ranges every value is a normal float32 and the products
# stay finite for any finite float32 logits below 1e30: temperature divides by at most 1/1e-5
# (below GREEDY_BELOW is greedy); the penalty multiplies or divides by at most 100. No useful
# setting lies outside them (a penalty of 100 or 1/100 already decides every repeated token).
MAX_TEMPERATURE = 1e4
MIN_TOP_P = 1.1754943508222875e-38  # the smallest normal float32; anything below keeps 1 token
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed accepts
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
PRESENCE_PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range, for presence and frequency penalties

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops. Invalid values raise ValueError (the
    server answers INVALID_ARGUMENT)."""

    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0  # keep the k most likely tokens (and any tied with the k-th); 0 = off
    top_p: float = 1.0  # keep the fewest most likely tokens whose probability sums to >= top_p
    repetition_penalty: float = 1.0  # CTRL/HF; > 1 discourages tokens of the prompt and output
    seed: int | None = None  # None: the engine's generator, seeded from its global counter
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not part of the output
    stop_token_ids: tuple[int, ...] = ()  # stop tokens besides EOS (these apply with ignore_eos)
    ignore_eos: bool = False
    logprobs: bool = False  # report the chosen token's log-probability (see `sample`)
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens' (k <= 20)
    # OpenAI's: subtract presence_penalty from the logit of every token generated so far, and
    # frequency_penalty times the number of times it was generated (the prompt does not count)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely; 0 = off
    min_new_tokens: int = 0  # EOS and stop token ids are masked until this many are generated
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last this many tokens
    structured: StructuredOutput | None = None  # the output must be JSON / match a schema / regex

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature)
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got "
                             f"{self.temperature}")
        _check_int("top_k", self.top_k, 0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p < MIN_TOP_P:
            raise ValueError(f"top_p must be >= {MIN_TOP_P:.3g} (float32's smallest normal "
                             f"number), got {self.top_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low:g}, {high:g}] (1 = off), "
                             f"got {self.repetition_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed > MAX_SEED:
                raise ValueError(f"seed must be < 2**64, got {self.seed}")
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        # Sequences become tuples so that params stay hashable; a bare string is refused rather
        # than read as one stop per character.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        if len(self.stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters, got "
                                 f"{brief(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, "
                             f"got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entries", t, 0)
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {brief(self.logprobs)}")
        _check_int("top_logprobs", self.top_logprobs, 0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        low, high = PRESENCE_PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}] (0 = off), got {value}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        _check_int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got "
                             f"{type(self.structured).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def brief(value: object, limit: int = 64) -> str:
    """repr(value), cut to about `limit` characters: error messages quote input this way (a
    status message must not grow with the request)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {brief(value)}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {brief(value)}")


def defaults_from_generation_config(gen: Mapping[str, object]) -> SamplingParams:
    """SamplingParams whose defaults are a generation config's (a generation_config.json as a
    dict): do_sample false = greedy (temperature 0, as HF generate), else its temperature,
    top_k, top_p and repetition_penalty. Only keys the config sets count (as vLLM reads it):
    where it sets none, SamplingParams' own defaults stay (temperature 1; not HF's implicit
    top_k 50). A config whose values SamplingParams refuses is ignored with a warning."""
    kw = {k: gen[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")
          if gen.get(k) is not None}
    if gen.get("do_sample") is False:
        kw = {"temperature": 0.0}
    try:
        return SamplingParams(**kw)
    except ValueError as exc:
        log.warning("generation config's sampling ignored (%s): %s", exc, kw)
        return SamplingParams()


def model_defaults(checkpoint: str | Path) -> SamplingParams:
    """The default SamplingParams of a checkpoint directory: those of its generation_config.json
    (`defaults_from_generation_config`), or SamplingParams() without one."""
    path = Path(checkpoint) / "generation_config.json"
    try:
        gen = json.loads(path.read_text())
    except FileNotFoundError:
        return SamplingParams()
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable, default sampling used: %s", path, exc)
        return SamplingParams()
    return defaults_from_generation_config(gen if isinstance(gen, dict) else {})


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one request's noise, on the logits' device (`sample` draws on it)."""
    return torch.Generator(device=device).manual_seed(seed)


def finish_reason(params: SamplingParams, token_id: int, num_output_tokens: int,
                  eos_token_ids: Sequence[int]) -> str | None:
    """Why a sequence stops after emitting `token_id` as its `num_output_tokens`-th token:
    "stop" (EOS unless ignore_eos, or a stop token id), "length" (max_new_tokens reached), or
    None to continue. A stop token wins over length, as in vLLM. The stopping token's text is
    not part of the output. Stop strings are matched on text by `detokenize.StopChecker`."""
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if num_output_tokens >= params.max_new_tokens:
        return "length"
    return None


@dataclass(frozen=True)
class SampleResult:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32; None when no row asked for logprobs
    # [B, K] ids and logprobs of each row's K most likely tokens (K: the largest top_logprobs
    # of the batch; a row reads its own first top_logprobs), None when no row asked for them
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


class HostCopy:
    """A SampleResult on its way to the host: every tensor is copied with non_blocking=True
    (into pinned memory on CUDA, which a non-blocking device-to-host copy needs to be
    asynchronous) behind the kernels that compute it, and a CUDA event marks the copies' end.
    Creating one does not wait for the device, so the host can do other work (the engine: the
    previous step's text and events) while the step still runs; `wait` blocks only then.
    On the CPU the copies are plain tensors and nothing waits."""

    def __init__(self, result: SampleResult) -> None:
        cuda = result.tokens.device.type == "cuda"
        # torch's caching host allocator reuses pinned blocks (and keeps a block until the
        # copy into it is done), so a fresh buffer per step costs no cudaHostAlloc
        self._host = SampleResult(*(
            None if t is None else
            torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t, non_blocking=True)
            for t in (result.tokens, result.logprobs, result.top_ids, result.top_logprobs)))
        self._done = None
        if cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    def wait(self) -> SampleResult:
        """The result on the host, once the device has written it (releases the GIL while it
        waits)."""
        if self._done is not None:
            self._done.synchronize()
        return self._host


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None],
           history: Sequence[Sequence[int]], *,
           outputs: Sequence[Sequence[int]] | None = None,
           allowed: Sequence[torch.Tensor | None] | None = None,
           banned: Sequence[Sequence[int]] | None = None) -> SampleResult:
    """Pick one token per row.

    Order: first the row's masks (`allowed[i]`, a [V] bool tensor of the tokens its grammar
    allows, None = all; `banned[i]`, token ids it may not take now: EOS and stop ids before
    min_new_tokens), then, as in HF generate, repetition penalty over the set of ids in
    `history[i]` (prompt and output so far; read only for rows whose penalty is not 1, ids must
    be < V), then presence and frequency penalties over `outputs[i]` (the generated tokens so
    far; read only for rows that use them), then temperature, top-k, top-p on the renormalised
    top-k distribution, min-p (a token is kept if its probability is >= min_p times the most
    likely one's; with top-k/top-p the stricter bound wins), then a draw. Greedy rows take the
    argmax of the penalised logits (first index on ties). The reported logprob is the chosen
    token's log-probability under the distribution it was drawn from: log_softmax of the
    masked, penalised, scaled and filtered logits; for greedy rows log_softmax of the masked,
    penalised logits. Top logprobs are the same distribution's K largest.

    logits: [B, V], any float dtype and device (math in float32, not modified). generators[i]:
    row i's generator on logits.device; required for sampled rows, ignored for greedy ones.
    A row must keep at least one token after its masks.
    """
    B, V = logits.shape
    if not len(params) == len(generators) == len(history) == B:
        raise ValueError(f"{B} logits rows but {len(params)} params, {len(generators)} "
                         f"generators and {len(history)} histories")
    for name, per_row in (("outputs", outputs), ("allowed", allowed), ("banned", banned)):
        if per_row is not None and len(per_row) != B:
            raise ValueError(f"{B} logits rows but {len(per_row)} {name}")
    device = logits.device
    x = _mask(logits.float(), allowed, banned)  # [B, V]
    x = _penalise(x, params, history)
    x = _presence_frequency(x, params, outputs)
    temperature = [1.0 if p.greedy else p.temperature for p in params]
    if any(t != 1.0 for t in temperature):
        x = x / _device_tensor(temperature, device)[:, None]
    threshold = _thresholds(x, params)  # [B] or None
    by_min_p = _min_p_thresholds(x, params)  # [B] or None
    if by_min_p is not None:
        threshold = by_min_p if threshold is None else torch.maximum(threshold, by_min_p)
    if threshold is not None:
        x = x.masked_fill(x < threshold[:, None], -math.inf)

    scores = x
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        gumbel = _gumbel(V, [generators[i] for i in rows], device)  # [S, V]
        if len(rows) == B:
            scores = x + gumbel
        else:
            idx = _device_tensor(rows, device)
            scores = x.index_put((idx,), x[idx] + gumbel)
    tokens = scores.argmax(dim=-1)  # [B]

    logprobs = top_ids = top_logprobs = None
    if any(p.logprobs for p in params):
        # log_softmax, not x - logsumexp: CUDA's generic reductions split a row differently
        # for different batch sizes, the softmax kernels only by V, so this stays row-exact.
        lp = x.log_softmax(dim=-1)  # [B, V]
        logprobs = lp.gather(1, tokens[:, None]).squeeze(1)  # [B]
        k = min(max(p.top_logprobs for p in params), V)
        if k:
            top_logprobs, top_ids = lp.topk(k, dim=-1)  # [B, K], descending
    return SampleResult(tokens, logprobs, top_ids, top_logprobs)


def _mask(x: torch.Tensor, allowed: Sequence[torch.Tensor | None] | None,
          banned: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """x with -inf outside each row's allowed tokens and on its banned ones (a new tensor if
    any row is masked)."""
    device = x.device
    rows = [i for i, a in enumerate(allowed or ()) if a is not None]
    if rows:
        keep = _to_device(torch.stack([allowed[i] for i in rows]), device)  # [R, V] bool
        idx = _device_tensor(rows, device)
        x = x.index_put((idx,), x[idx].masked_fill(~keep, -math.inf))
    rows = [i for i, b in enumerate(banned or ()) if len(b)]
    if rows:
        counts = _device_tensor([len(banned[i]) for i in rows], device)
        c = _device_tensor(list(chain.from_iterable(banned[i] for i in rows)), device)  # [N]
        r = _repeat(_device_tensor(rows, device), counts, len(c))  # [N]
        x = x.index_put((r, c), torch.full((), -math.inf, device=device))
    return x


def _presence_frequency(x: torch.Tensor, params: Sequence[SamplingParams],
                        outputs: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """OpenAI's penalties: logit -= presence * (count > 0) + frequency * count, with count the
    times the token was generated (counts are small integers, exact in float32 in any order of
    addition). Returns a new tensor if any row is penalised."""
    if outputs is None:
        return x
    rows = [i for i, p in enumerate(params)
            if (p.presence_penalty or p.frequency_penalty) and len(outputs[i])]
    if not rows:
        return x
    device = x.device
    lengths = _device_tensor([len(outputs[i]) for i in rows], device)
    c = _device_tensor(list(chain.from_iterable(outputs[i] for i in rows)), device)  # [N]
    r = _repeat(torch.arange(len(rows), device=device), lengths, len(c))  # [N]
    counts = torch.zeros(len(rows), x.shape[1], device=device)  # [R, V]
    counts.index_put_((r, c), torch.ones_like(c, dtype=counts.dtype), accumulate=True)
    presence = _device_tensor([params[i].presence_penalty for i in rows], device)
    frequency = _device_tensor([params[i].frequency_penalty for i in rows], device)
    penalty = frequency[:, None] * counts + presence[:, None] * (counts > 0)
    idx = _device_tensor(rows, device)
    return x.index_put((idx,), x[idx] - penalty)


def _min_p_thresholds(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
    """Per-row smallest logit min-p keeps ([B], -inf = keep all), or None when no row uses it:
    p_i >= min_p * p_max  <=>  x_i >= max(x) + log(min_p). x: [B, V] scaled logits."""
    rows = [i for i, p in enumerate(params) if not p.greedy and p.min_p > 0.0]
    if not rows:
        return None
    device = x.device
    idx = _device_tensor(rows, device)
    log_min_p = _device_tensor([math.log(params[i].min_p) for i in rows], device)
    threshold = torch.full((x.shape[0],), -math.inf, device=device)
    threshold[idx] = x[idx].max(dim=-1).values + log_min_p
    return threshold


def _penalise(x: torch.Tensor, params: Sequence[SamplingParams],
              history: Sequence[Sequence[int]]) -> torch.Tensor:
    """CTRL repetition penalty: each seen token's logit is divided by the penalty if positive,
    multiplied if negative, once however often it was seen. Returns a new tensor."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and len(history[i])]
    if not rows:
        return x
    device = x.device
    counts = _device_tensor([len(history[i]) for i in rows], device)
    c = _device_tensor(list(chain.from_iterable(history[i] for i in rows)), device)  # [N]
    r = _repeat(_device_tensor(rows, device), counts, len(c))  # [N]
    penalty = _repeat(_device_tensor([params[i].repetition_penalty for i in rows], device),
                      counts, len(c))
    seen = x[r, c]  # [N]; a repeated id writes the same value twice, so duplicates are harmless
    return x.index_put((r, c), torch.where(seen > 0, seen / penalty, seen * penalty))


def _thresholds(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
    """Per-row smallest logit that top-k/top-p keep ([B], -inf = keep all), or None when no
    row filters. x: [B, V] scaled logits. Only filtering rows are sorted, and a full sort only
    when some row uses top-p (top-k alone needs just the k largest)."""
    B, V = x.shape
    rows = [i for i, p in enumerate(params)
            if not p.greedy and (0 < p.top_k < V or p.top_p < 1.0)]
    if not rows:
        return None
    device = x.device
    idx = _device_tensor(rows, device)
    top_k = [params[i].top_k if 0 < params[i].top_k < V else V for i in rows]
    top_p = [params[i].top_p for i in rows]
    k = _device_tensor(top_k, device)  # [R]
    if all(p == 1.0 for p in top_p):
        values = x[idx].topk(max(top_k), dim=-1).values  # [R, kmax], descending
        keep = k
    else:
        values = x[idx].sort(dim=-1, descending=True).values  # [R, V]
        ranked = values.masked_fill(torch.arange(V, device=device) >= k[:, None], -math.inf)
        probs = ranked.softmax(dim=-1)
        # Mass of the strictly more likely tokens; a token is kept while that is < top_p, which
        # keeps the fewest tokens reaching top_p and always the first. Shifting the cumsum (not
        # cumsum - probs) keeps it monotone in float32.
        before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))  # [R, V]
        p = _device_tensor(top_p, device)
        by_p = torch.where(p < 1.0, (before < p[:, None]).sum(dim=-1), V)
        keep = torch.minimum(by_p, k).clamp(min=1)
    threshold = torch.full((B,), -math.inf, device=device)
    threshold[idx] = values.gather(1, (keep - 1)[:, None]).squeeze(1)
    return threshold


def _device_tensor(values: list, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, device=device), without waiting for the device."""
    return _to_device(torch.tensor(values), device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for it: a plain copy to a CUDA device
    synchronizes the stream, so in `sample` the host would wait for the forward pass queued
    before it (and lose engine._step's overlap of the last step's text work with this one).
    From pinned memory the copy is asynchronous (torch keeps the pinned block until it is
    done)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _repeat(t: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """torch.repeat_interleave(t, counts) given the sum of counts: without it, the result's
    size is read back from the device (a synchronization, see `_to_device`)."""
    return torch.repeat_interleave(t, counts, output_size=total)


def _gumbel(V: int, generators: Sequence[torch.Generator | None],
            device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise, one row of V per generator: [S, V]. u is uniform on [0, 1), so
    -log(u) is in (0, inf] and the noise in [-inf, 17): never NaN, even on masked (-inf)
    logits, and a u of exactly 0 only makes that token lose."""
    u = torch.empty(len(generators), V, device=device)
    for j, g in enumerate(generators):
        if g is None:
            raise ValueError("a sampled row (temperature > 0) needs a generator")
        u[j].uniform_(generator=g)
    return -torch.log(-torch.log(u))

"""The serving engine: requests of many adapters in one continuous batch (DESIGN.md s2).

One background thread runs the loop; every other thread talks to it through `submit` and
`abort`, which only queue work under a lock:

    loop:  take new requests and aborts (step boundary; aborts also before postprocess)
           -> scheduler.schedule()            which tokens of which sequences run now
           -> runner.prepare() / forward()    one forward pass over all of them
           -> sample()                        one token per sequence that finished its prompt
           -> the last step's text and events (while the device computes this step)
           -> scheduler.postprocess()
           -> per request: finish checks (text and events wait for the next step, except
              for requests whose stop strings or grammar need the text now)

Callbacks run on the loop thread and must not block (`generate` and `generate_async` put the
events on a queue; `generate_async` hands each asyncio loop a step's events in one
call_soon_threadsafe, two when some come at once and others are deferred to the next step
(`Engine._step`), not one per token per request). A request holds its adapter's table
slot from `submit` to its last token (its last event may come a step later), so replacing or
unloading the adapter never changes a running request (registry.py).

Determinism: a request's tokens depend only on its prompt, adapter, parameters and seed, never
on the other requests in its batches (sampling.py draws each row's noise from its own
generator; the kernels compute each row on its own). Greedy requests give the same text alone
or batched, up to floating-point differences between batch shapes on GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig

from nora_runtime.adapter import base_fingerprint
from nora_runtime.checkpoint import DEFAULT_MODEL_NAME, resolve_checkpoint
from nora_runtime.config import EngineConfig
from nora_runtime.detokenize import IncrementalDetokenizer, StopChecker
from nora_runtime.histogram import Histogram, HistogramSnapshot, powers_of_two
from nora_runtime.model_runner import ModelRunner
from nora_runtime.parallel import launch
from nora_runtime.registry import BASE_SLOT, AdapterHold, AdapterInfo, AdapterRegistry
from nora_runtime.sampling import (
    HostCopy,
    SamplingParams,
    finish_reason,
    make_generator,
    model_defaults,
    sample,
)
from nora_runtime.scheduler import ScheduledBatch, Scheduler, Sequence
from nora_runtime.structured import Grammars, Matcher, StructuredOutput

log = logging.getLogger(__name__)

# finish reasons of TokenEvent
FINISH_REASONS = ("length", "eos", "stop", "abort", "time_limit", "error")


@dataclass(frozen=True)
class TokenEvent:
    """What one request produced in one step. The concatenated `text` of all events is the
    output text; `token_ids` includes a stopping token (EOS, stop id) whose text is not output."""

    request_id: str
    token_ids: tuple[int, ...]  # new tokens (0 or 1; more when coalesced: `merged`)
    text: str  # new text (may be "" mid-character or while a stop string may be forming)
    logprobs: tuple[float, ...] | None  # the new tokens' logprobs, if asked for
    finish_reason: str | None  # None while running, else one of FINISH_REASONS
    error: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    queue_seconds: float | None = None  # submit -> first scheduled, on the first event only
    # per new token, with params.top_logprobs: its top_logprobs most likely (token id, logprob)
    # pairs, most likely first (tokens the row's masks exclude are left out)
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    mode: str
    act: str
    groups: int
    num_layers: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    max_adapters: int
    kv_cache_tokens: int
    max_lora_adapters: int = 0  # LoRA pool rows (0: LoRA and NoRA++ adapters refused)
    max_lora_rank: int = 0
    lora_target_modules: tuple[str, ...] = ()
    lora_pool_bytes: int = 0  # device memory of the LoRA pool


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    batch_size: int  # sequences in the latest step
    steps: int
    preemptions: int
    slots_used: int  # adapter slots holding an adapter (loaded or retired but still held)
    slots_total: int
    adapter_loads: int
    adapter_evictions: int
    adapter_load_failures: int
    adapter_inline_evictions: int = 0  # of adapter_evictions, those of inline adapters
    adapter_reloads: int = 0  # named adapters reloaded from the store on use after an eviction
    adapters_registered: int = 0  # ids registered, resident or not
    lora_slots_used: int = 0  # LoRA pool rows holding an adapter's LoRA
    lora_slots_total: int = 0
    # requests per adapter id ("": the base; inline adapters under their content ids)
    adapters_running: dict[str, int] = field(default_factory=dict)
    adapters_waiting: dict[str, int] = field(default_factory=dict)
    step_tokens: HistogramSnapshot | None = None  # tokens computed per step
    step_sequences: HistogramSnapshot | None = None  # sequences per step
    # adapter load latency by how the load came ("load", "reload", "inline": registry.py)
    adapter_load_seconds: dict[str, HistogramSnapshot] = field(default_factory=dict)


@dataclass(eq=False)
class _Request:
    seq: Sequence  # seq.request_id: the engine's key, unique across tenants (_key)
    request_id: str  # the caller's id, unique within its tenant
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stops: StopChecker
    on_event: Callable[[TokenEvent], None]
    deadline: float | None
    submitted: float
    queue_seconds: float | None = None  # set when first scheduled
    matcher: Matcher | None = None  # params.structured's grammar state
    error: str | None = None  # its deferred text work failed: it ends at its next token


# A row's token whose text and event wait for the next step (Engine._drain): the request,
# token, logprob, top logprobs, finish reason (decided on the token), output count then.
_Deferred = tuple[_Request, int, float | None, tuple[tuple[int, float], ...] | None, str | None,
                  int]


class Engine:
    """Loads the model (config.model: a local checkpoint, hub id or .gguf file; None: the
    default model, SmolLM2-135M-Instruct) and serves requests from a background thread once
    `start()`ed.

    adapter_store: the directory that `load_adapter` may read paths from (None: bytes only).
    With `durable_adapters` (the default) it also keeps the named adapters' state across
    restarts (store.py): the engine restores it at construction (`restored_adapters`). Without
    a store, or with durable_adapters=False (a read-only directory such as the demo adapters'),
    adapter state is memory-only.
    """

    def __init__(self, config: EngineConfig | None = None, *,
                 adapter_store: str | Path | None = None,
                 durable_adapters: bool = True) -> None:
        self.config = config = config or EngineConfig()
        checkpoint = resolve_checkpoint(config.model)
        tp = launch(config, checkpoint)  # tensor parallelism: the workers, started (else None)
        try:
            self.runner = runner = ModelRunner(config, checkpoint, tp=tp)
        except BaseException:
            if tp is not None:
                tp.close(graceful=False)
            raise
        self.tokenizer = runner.tokenizer
        hf = runner.hf_config
        fingerprint = base_fingerprint(runner.model, runner.act)
        self.registry = AdapterRegistry(runner.table, fingerprint=fingerprint, mode=config.mode,
                                        act=runner.act, store_dir=adapter_store,
                                        durable=durable_adapters,
                                        max_inline=config.max_inline_adapters,
                                        lora_pool=runner.lora,
                                        max_inline_lora=config.max_inline_lora_adapters)
        self.restored_adapters = self.registry.restore()  # [] without a durable store
        self.scheduler = Scheduler(config, runner.num_blocks)
        self.eos_ids = _eos_ids(checkpoint, hf, self.tokenizer)
        # what submit(params=None) uses; the server fills a request's unset fields from it
        self.default_params = model_defaults(checkpoint)
        self.grammars = Grammars(self.tokenizer, hf.vocab_size, self.eos_ids)
        kv_tokens = runner.num_blocks * runner.block_size
        if config.max_model_len > kv_tokens:
            log.warning("max_model_len %d exceeds the KV cache: sequences end at %d tokens",
                        config.max_model_len, kv_tokens)
        self.max_model_len = min(config.max_model_len, kv_tokens)
        self.info = ModelInfo(
            name=config.model or DEFAULT_MODEL_NAME, fingerprint=fingerprint, mode=config.mode,
            act=runner.act, groups=config.groups, num_layers=hf.num_hidden_layers,
            vocab_size=hf.vocab_size, max_model_len=self.max_model_len,
            eos_token_ids=self.eos_ids, device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."), max_adapters=config.max_adapters,
            kv_cache_tokens=kv_tokens,
            max_lora_adapters=runner.lora.capacity if runner.lora else 0,
            max_lora_rank=config.max_lora_rank if runner.lora else 0,
            lora_target_modules=runner.lora.targets if runner.lora else (),
            lora_pool_bytes=runner.lora.nbytes if runner.lora else 0)
        self._seeds = random.Random(config.seed)  # seeds of requests that bring none
        self._lock = threading.Condition()
        self._incoming: list[_Request] = []
        self._aborts: dict[str, str] = {}
        self._ids: set[str] = set()  # request ids submitted and not yet finished
        self._live: dict[str, _Request] = {}  # loop thread only
        # the last step's rows whose text and events are still to come, in order (_drain)
        self._pending: list[_Deferred] = []
        # generate_async's events of the current step, per asyncio loop (loop thread only)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = {}
        self._stopping = False
        self.error: str | None = None  # why the loop thread died, if it did
        self._fatal: str | None = None  # set from any thread: the loop stops with this error
        self._thread: threading.Thread | None = None
        self._batch_size = self._steps = 0
        # per step: one bisect each (metrics, read at scrape time)
        self._step_tokens = Histogram(powers_of_two(config.max_num_batched_tokens))
        self._step_seqs = Histogram(powers_of_two(config.max_num_seqs))
        if tp is not None:  # a dead rank stops the engine, even while it idles
            tp.watch(self._fail)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Engine:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nora-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self.runner.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, *,
               adapter: str | bytes | AdapterHold | None = None, request_id: str | None = None,
               deadline: float | None = None, tenant: str = "",
               on_event: Callable[[TokenEvent], None]) -> str:
        """Queue a request; its events go to `on_event` (on the loop thread). `params`: None =
        the model's defaults (`default_params`, from its generation config). `adapter`: a named
        adapter's id, an adapter file's bytes (loaded inline, deduplicated by content), or a
        hold from `hold_adapter` (which the request takes over).
        `deadline`: a time.monotonic() after which it ends with "time_limit". `tenant`: the
        caller; request ids are unique per tenant, and the scheduler's fairness guard shares
        seats between tenants ("": callers that cannot be told apart, so their requests are
        shared out by adapter instead).

        Raises (nothing is queued then) ValueError for a bad prompt or parameters,
        AdapterNotFound for an unknown adapter id, the registry's errors (`hold_adapter`).
        """
        params = params or self.default_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt, params.truncate_prompt_tokens)
        matcher = self.grammars.matcher(params.structured) if params.structured else None
        max_tokens = min(len(ids) + params.max_new_tokens, self.max_model_len)
        request_id = request_id or uuid.uuid4().hex
        if not isinstance(request_id, str) or not isinstance(tenant, str):
            raise ValueError("request_id and tenant must be strings")
        key = _key(tenant, request_id)
        adapter_id, slot = self._acquire(adapter)
        try:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            gen = None if params.greedy else make_generator(seed, self.runner.device)
            share = f"tenant:{tenant}" if tenant else f"adapter:{adapter_id or ''}"
            seq = Sequence(key, ids, max_tokens, slot=slot, tenant=share,
                           adapter=adapter_id or "")
            req = _Request(seq, request_id, params, gen, IncrementalDetokenizer(self.tokenizer),
                           StopChecker(params.stop), on_event, deadline, time.monotonic(),
                           matcher=matcher)
            with self._lock:
                if self._stopping:
                    raise RuntimeError(self.error or "the engine is shutting down")
                if key in self._ids:
                    raise ValueError(f"request id {request_id!r} is already in flight")
                self._ids.add(key)
                self._incoming.append(req)
                self._lock.notify()
        except BaseException:
            self.registry.release(slot)
            raise
        return request_id

    def abort(self, request_id: str, reason: str = "abort", *, tenant: str = "") -> None:
        """End `tenant`'s request with finish_reason `reason` once the running step's device
        work is done (without that step's token) or at the next step boundary; its KV blocks
        are freed then. Unknown or finished ids are ignored."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason must be one of {FINISH_REASONS}, got {reason!r}")
        key = _key(tenant, request_id)
        with self._lock:
            if key in self._ids:
                self._aborts.setdefault(key, reason)
                self._lock.notify()

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                 adapter: str | bytes | AdapterHold | None = None, request_id: str | None = None,
                 deadline: float | None = None, tenant: str = "") -> Iterator[TokenEvent]:
        """Submit and yield the request's events until the last one. Closing the iterator early
        aborts the request. Needs a started engine."""
        events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        rid = self.submit(prompt, params, adapter=adapter, request_id=request_id,
                          deadline=deadline, tenant=tenant, on_event=events.put)
        done = False
        try:
            while not done:
                event = events.get()
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.abort(rid, tenant=tenant)

    async def generate_async(self, prompt: str | list[int], params: SamplingParams | None = None,
                             *, adapter: str | bytes | AdapterHold | None = None,
                             request_id: str | None = None, deadline: float | None = None,
                             tenant: str = "", coalesce: bool = False
                             ) -> AsyncIterator[TokenEvent]:
        """`generate` for asyncio; cancelling or closing the iterator aborts the request.
        coalesce: events that queued up while the consumer was busy come as one (`merged`),
        so a consumer slower than the engine (a server writing one message per event for
        hundreds of streams) sends fewer, fuller messages instead of falling further behind."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def put(event: TokenEvent) -> None:  # on the engine's loop thread: sent by _flush_events
            self._outbox.setdefault(loop, []).append((events, event))

        rid = self.submit(prompt, params, adapter=adapter, request_id=request_id,
                          deadline=deadline, tenant=tenant, on_event=put)
        done = False
        try:
            while not done:
                event = await events.get()
                if coalesce and event.finish_reason is None and not events.empty():
                    run = [event]  # the finish, if queued, is the last: nothing follows it
                    while not events.empty():
                        run.append(events.get_nowait())
                    event = merged(*run)
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.abort(rid, tenant=tenant)

    # ---- adapters -----------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, source: str | Path | bytes) -> AdapterInfo:
        """Load or replace a named (pinned) adapter, persisted in a durable store. Running
        requests keep the version they started with. Blocks on validation and fsync: call it
        off an event loop.

        source: a path inside adapter_store (a nora .safetensors file, NoRA or NoRA++; a PEFT
        LoRA directory with adapter_config.json + adapter_model.safetensors, or that config
        file), or bytes (a nora file, or a PEFT LoRA packed by `nora_runtime.lora.pack_peft`;
        a lone adapter_model.safetensors is refused: it lacks its config).
        `AdapterInfo.kind` says what it is: "nora", "lora" or "nora++"."""
        return self.registry.load(adapter_id, source)

    def unload_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (named or inline); a durable store remembers the unload."""
        self.registry.unload(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every registered adapter, inline ones included (`AdapterInfo.inline`): what
        callers other than admins see is for the server to filter."""
        return self.registry.list()

    def hold_adapter(self, adapter: str | bytes | AdapterHold) -> AdapterHold:
        """Load (bytes: inline) or reload (a named id not resident) an adapter and hold its
        slot for a request that `submit(adapter=hold)` then takes over; `hold.release()` if the
        request is never submitted. May validate and read the store: call it off an event
        loop. Raises AdapterNotFound for unknown ids and inline content ids, the registry's
        errors for bad bytes, RegistryFull when no slot can be had."""
        if isinstance(adapter, AdapterHold):
            return adapter
        if isinstance(adapter, bytes):
            return self.registry.hold_inline(adapter)
        if isinstance(adapter, str):
            return self.registry.hold(adapter)
        raise ValueError(f"adapter must be an id or adapter bytes, got {type(adapter).__name__}")

    async def hold_adapter_async(self, adapter: str | bytes | AdapterHold, *,
                                 run=asyncio.to_thread) -> AdapterHold:
        """`hold_adapter` on a worker thread, for asyncio (validation stays off the event
        loop); `run(fn, arg)` runs it (default: asyncio's executor). If the caller is cancelled
        meanwhile, the hold the thread still takes is released when it comes, never leaked."""
        future = asyncio.ensure_future(run(self.hold_adapter, adapter))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_release_hold)
            raise

    def stats(self) -> EngineStats:
        """A snapshot, from any thread (the loop thread keeps running meanwhile)."""
        reg, sched = self.registry, self.scheduler
        # copies of the loop thread's queues: list() of a list or deque runs in C without
        # releasing the GIL, so it sees no half-done change
        running, waiting = list(sched.running), list(sched.waiting)
        return EngineStats(
            num_running=len(running), num_waiting=len(waiting),
            kv_usage=sched.kv_usage, batch_size=self._batch_size, steps=self._steps,
            preemptions=sched.preemptions, slots_used=reg.capacity - reg.num_free,
            slots_total=reg.capacity, adapter_loads=reg.loads,
            adapter_evictions=reg.evictions, adapter_load_failures=reg.load_failures,
            adapter_inline_evictions=reg.inline_evictions, adapter_reloads=reg.reloads,
            adapters_registered=len(reg),
            lora_slots_used=reg.lora_capacity - reg.num_free_lora,
            lora_slots_total=reg.lora_capacity,
            adapters_running=dict(Counter(s.adapter for s in running)),
            adapters_waiting=dict(Counter(s.adapter for s in waiting)),
            step_tokens=self._step_tokens.snapshot(), step_sequences=self._step_seqs.snapshot(),
            adapter_load_seconds={how: h.snapshot() for how, h in reg.load_seconds.items()})

    # ---- the loop -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the loop thread has died (then `error` says why) or shut down."""
        return self.error is None and not self._stopping

    def _fail(self, error: str) -> None:
        """Stop the loop with `error` (from any thread): something it cannot recover from,
        such as a dead tensor-parallel worker."""
        with self._lock:
            self._fatal = error
            self._lock.notify()

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug outside a step: fail everything, refuse new work
            log.exception("engine loop died")
            error = f"engine loop died: {type(exc).__name__}: {exc}"
            with self._lock:
                self.error = error
                self._stopping = True
                pending = self._incoming + list(self._live.values())
                self._incoming, self._ids = [], set()
            self._drain()  # the tokens of the last step first, then the error
            for req in pending:
                seq = req.seq
                self._deliver(req, TokenEvent(req.request_id, (), "", None, "error", error,
                                              len(seq.prompt_ids), len(seq.output_ids)))
        finally:
            self._flush_events()

    def _idle(self) -> bool:
        """Nothing for the loop to do (under self._lock): it waits."""
        return not (self._incoming or self._aborts or self._live or self._stopping
                    or self._fatal)

    def _run(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)
        failures = 0  # consecutive failed steps
        while True:
            with self._lock:
                idle = self._idle()
            if idle:  # the last step's deferred events go out before this thread sleeps
                self._drain()
            self._flush_events()  # the last step's events, before this thread may wait
            with self._lock:
                while self._idle():
                    self._lock.wait()
                if self._fatal:
                    raise RuntimeError(self._fatal)
                incoming, self._incoming = self._incoming, []
                stopping = self._stopping
            for req in incoming:
                try:
                    self.scheduler.add(req.seq)  # submit checked what add checks
                except ValueError as exc:
                    self._reject(req, str(exc))
                    continue
                self._live[req.seq.request_id] = req
            if stopping:
                self._drain()  # the last events of requests that ended in the last step
                for rid in list(self._live):
                    self._finish(self._live[rid], "abort")
                return
            self._take_aborts()
            now = time.monotonic()
            for req in [r for r in self._live.values() if r.deadline and r.deadline <= now]:
                self._finish(req, "time_limit")
            batch = self.scheduler.schedule()
            if batch is None:
                self._drain()  # no step to overlap it with
                continue
            try:
                self._step(batch)
            except Exception as exc:  # a failed step ends its requests, not the server ...
                log.exception("engine step failed")
                for seq in batch.seqs:
                    if seq.request_id in self._live:
                        self._finish(self._live[seq.request_id], "error",
                                     error=f"{type(exc).__name__}: {exc}")
                failures += 1
                if self._fatal:
                    raise RuntimeError(self._fatal) from exc
                if failures >= self.config.max_consecutive_step_failures:
                    # ... unless steps keep failing (a broken device): then the engine stops,
                    # health says NOT_SERVING and nora-serve exits for a restart
                    raise RuntimeError(f"{failures} steps in a row failed, the last with "
                                       f"{type(exc).__name__}: {exc}") from exc
            else:
                failures = 0

    def _take_aborts(self) -> None:
        """End the requests whose abort (`abort`, from any thread) has come in."""
        with self._lock:
            aborts, self._aborts = self._aborts, {}
        for rid, reason in aborts.items():
            if rid in self._live:
                self._finish(self._live[rid], reason)

    def _step(self, batch: ScheduledBatch) -> None:
        """One step, k. While the device runs step k, the host does step k-1's deferred text
        work (`_drain`); what decides whether a sequence goes on runs before the next schedule,
        so scheduling is the same as without the overlap:

            host:   prepare | forward | sample | drain k-1 | wait | aborts, postprocess, _emit
            device:           step k's kernels, copy to host -->|

        forward and sample only queue kernels on a GPU (a CUDA-graph replay for decode
        steps); the tokens come back by an asynchronous copy (HostCopy) that the host waits
        for only after the drain. `_emit` decides each sampled row's finish now and queues
        its text and event for the drain of step k+1, except for rows whose finish depends on
        text or a grammar (stop strings, structured output): those get theirs now, as their
        tokens come. On the CPU the same order runs, with nothing to overlap.
        """
        self._steps += 1
        self._batch_size = len(batch.seqs)
        self._step_tokens.observe(batch.num_tokens)
        self._step_seqs.observe(self._batch_size)
        now = time.monotonic()
        for seq in batch.seqs:
            req = self._live[seq.request_id]
            if req.queue_seconds is None:
                req.queue_seconds = now - req.submitted
        fb = self.runner.prepare(batch.seqs, list(batch.num_new_tokens), list(batch.sample))
        logits = self.runner.forward(fb)
        rows = [i for i, want in enumerate(batch.sample) if want]
        reqs = [self._live[batch.seqs[i].request_id] for i in rows]
        copy = None
        if reqs:
            history = [r.seq.tokens if r.params.repetition_penalty != 1.0 else ()
                       for r in reqs]
            copy = HostCopy(sample(logits, [r.params for r in reqs], [r.generator for r in reqs],
                                   history, **self._row_masks(reqs)))
        self._drain()
        self._flush_events()  # the drained events go to asyncio now, not after this step
        sampled: list[int | None] = [None] * len(batch.seqs)
        if copy is not None:
            result = copy.wait()
            tokens = result.tokens.tolist()
            logprobs = result.logprobs.tolist() if result.logprobs is not None else None
            tops = _top_pairs(result, [r.params.top_logprobs for r in reqs])
            for i, token in zip(rows, tokens, strict=True):
                sampled[i] = token
        # Callers see a step's tokens only during the next step (the drain above), so an abort
        # they send then would come one token later than before the overlap if it waited for
        # the step boundary: it ends its request now, without this step's token (postprocess
        # skips it).
        self._take_aborts()
        self.scheduler.postprocess(batch, sampled)
        for j, req in enumerate(reqs):
            if req.seq.request_id in self._live:
                self._emit(req, tokens[j], logprobs[j] if logprobs is not None else None,
                           tops[j] if tops is not None else None)

    def _row_masks(self, reqs: list[_Request]) -> dict:
        """`sample`'s per-row inputs beyond the history: generated tokens (presence and
        frequency penalties), the grammar's allowed tokens, and the EOS and stop ids a row may
        not take before min_new_tokens (not for constrained rows: their grammar decides where
        the output ends). {} when no row uses any of them (the usual step: nothing built)."""
        if not any(r.matcher is not None or r.params.presence_penalty
                   or r.params.frequency_penalty or r.params.min_new_tokens for r in reqs):
            return {}
        outputs = [r.seq.output_ids if r.params.presence_penalty or r.params.frequency_penalty
                   else () for r in reqs]
        allowed = [r.matcher.allowed() if r.matcher is not None else None for r in reqs]
        banned = []
        for r in reqs:
            p = r.params
            early = r.matcher is None and len(r.seq.output_ids) < p.min_new_tokens
            banned.append((() if p.ignore_eos else self.eos_ids) + p.stop_token_ids
                          if early else ())
        return {"outputs": outputs, "allowed": allowed, "banned": banned}

    def _emit(self, req: _Request, token: int, logprob: float | None,
              top: tuple[tuple[int, float], ...] | None = None) -> None:
        """A sampled token, before the next schedule: whether its request goes on, and freeing
        it if not. Its text and event come now when text or a grammar may end the request
        (stop strings, structured output); else they wait for the next step's device time
        (`_pending`, `_drain`): with 256 requests on an H200, ~7 ms of host work a step that
        the device no longer idles through (issue 11)."""
        seq, params = req.seq, req.params
        if req.error is not None:
            self._finish(req, "error", error=req.error)
            return
        n_out = len(seq.output_ids)
        reason = finish_reason(params, token, n_out, self.eos_ids)
        if reason == "stop" and token not in params.stop_token_ids:
            reason = "eos"
        if reason is None and seq.num_tokens >= seq.max_tokens:
            reason = "length"  # max_model_len reached before max_new_tokens
        if not params.stop and req.matcher is None:
            if reason is not None:
                self._release(req, reason)
            self._pending.append((req, token, logprob, top, reason, n_out))
            return
        complete = False  # the grammar is complete: the token's text is output, then "stop"
        if req.matcher is not None:
            if (error := req.matcher.consume(token)) is not None:
                self._finish(req, "error", error=f"structured output: {error}")
                return
            complete = reason in (None, "length") and req.matcher.done
        text, by_string = self._text(req, token, reason)
        if by_string or complete:
            reason = "stop"
        event = self._event(req, token, logprob, top, reason, n_out, text)
        if reason is not None:
            self._finish(req, reason, event=event)
        else:
            self._deliver(req, event)

    def _drain(self) -> None:
        """The deferred rows' text and events (`_emit`), in order. Their finish reasons are
        decided already: without stop strings, text never ends a request. Runs during the
        next step's device time (`_step`), and before anything else that may send a request's
        events (an ending without a token: `_finish`) or let them wait (the loop sleeping,
        stopping or dying)."""
        pending, self._pending = self._pending, []
        for req, token, logprob, top, reason, n_out in pending:
            try:
                text, _ = self._text(req, token, reason)
            except Exception as exc:  # a detokenizer bug ends its request, not everyone's
                log.exception("text of request %r failed", req.request_id)
                error = f"{type(exc).__name__}: {exc}"
                if reason is None:  # still running: its next token ends it (_emit)
                    req.error = error
                    continue
                event = TokenEvent(req.request_id, (token,), "", None, "error", error,
                                   len(req.seq.prompt_ids), n_out)
            else:
                event = self._event(req, token, logprob, top, reason, n_out, text)
            self._deliver(req, event)

    def _text(self, req: _Request, token: int, reason: str | None) -> tuple[str, bool]:
        """The output text that `token` adds, and whether a stop string ended it there."""
        text, by_string = "", False
        if reason not in ("stop", "eos"):  # a stopping token's text is not output
            text, by_string = req.stops.feed(req.detok.step(token))
        if not by_string and reason is not None:  # the text ends here: send what was held back
            rest, by_string = req.stops.feed(req.detok.flush())
            text += rest if by_string else rest + req.stops.flush()
        return text, by_string

    def _event(self, req: _Request, token: int, logprob: float | None,
               top: tuple[tuple[int, float], ...] | None, reason: str | None, n_out: int,
               text: str) -> TokenEvent:
        """The event of a sampled token, the request's n_out-th."""
        return TokenEvent(req.request_id, (token,), text,
                          (logprob,) if req.params.logprobs and logprob is not None else None,
                          reason, None, len(req.seq.prompt_ids), n_out,
                          req.queue_seconds if n_out == 1 else None,
                          (top,) if top is not None else None)

    def _finish(self, req: _Request, reason: str, *, event: TokenEvent | None = None,
                error: str | None = None) -> None:
        """Remove a request for good: free its KV blocks and slot, send its last event. An
        ending without a token (abort, deadline, error, shutdown) first sends the deferred
        events (`_drain`), so that the request's earlier tokens come before its end."""
        if event is None:
            self._drain()
            event = TokenEvent(req.request_id, (), "", None, reason, error,
                               len(req.seq.prompt_ids), len(req.seq.output_ids))
        self._release(req, reason)
        self._deliver(req, event)

    def _release(self, req: _Request, reason: str) -> None:
        """Free a finished request's KV blocks, adapter slot and id (its last event may still
        be to come: `_drain`)."""
        seq = req.seq
        self.scheduler.finish(seq, reason)
        del self._live[seq.request_id]
        self.registry.count_tokens(seq.slot, len(seq.output_ids))
        self.registry.release(seq.slot)
        with self._lock:
            self._ids.discard(seq.request_id)

    def _reject(self, req: _Request, error: str) -> None:
        seq = req.seq
        self.registry.release(seq.slot)
        with self._lock:
            self._ids.discard(seq.request_id)
        self._deliver(req, TokenEvent(req.request_id, (), "", None, "error", error,
                                      len(seq.prompt_ids), 0))

    def _deliver(self, req: _Request, event: TokenEvent) -> None:
        try:
            req.on_event(event)
        except Exception:  # one bad callback must not stop the loop for everyone
            log.exception("event callback of request %r failed", event.request_id)

    def _flush_events(self) -> None:
        """Hand generate_async's events to their asyncio loops: one call_soon_threadsafe per
        loop per step for the deferred events (`_drain`, during the device's time) and one for
        those sent at once (each wakes the loop through its self-pipe and takes the GIL from
        this thread), not one per token per request."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            # RuntimeError: the event loop is closed, so nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    # ---- validation ---------------------------------------------------------------------------

    def check_structured(self, spec: StructuredOutput) -> None:
        """Compile and validate a structured output spec now (cached; ValueError if bad), so
        that `submit` does not compile it on the caller's thread: servers call this on a worker
        thread first."""
        self.grammars.check(spec)

    def _prompt_ids(self, prompt: str | list[int], truncate: int | None = None) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            vocab = self.info.vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                       for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        else:
            raise ValueError(f"prompt must be text or token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt")
        if truncate is not None:
            ids = ids[-truncate:]  # from the left: the end of a conversation matters most
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate within "
                             f"max_model_len {self.max_model_len}")
        return ids

    def _acquire(self, adapter: str | bytes | AdapterHold | None) -> tuple[str | None, int]:
        """The adapter id and the slot the request holds from now on. Bytes are loaded and held
        in one step, so no other load can evict them before the request runs."""
        if adapter is None or adapter == "":
            return None, BASE_SLOT
        hold = self.hold_adapter(adapter)
        return hold.id, hold.take()


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    """On an asyncio loop: one engine step's events for that loop's requests, in order."""
    for events, event in items:
        events.put_nowait(event)


def merged(*events: TokenEvent) -> TokenEvent:
    """One event for consecutive events of a request, in order: tokens, text and per-token
    lists joined; the rest is the last one's (its counts, finish), but the first queue time.
    Built in one step: a server's event loop calls this for hundreds of streams per step."""
    token_ids, text, logprobs, top, queued = (), "", None, None, None
    for e in events:
        token_ids += e.token_ids
        text += e.text
        if e.logprobs is not None:
            logprobs = (logprobs or ()) + e.logprobs
        if e.top_logprobs is not None:
            top = (top or ()) + e.top_logprobs
        if queued is None:
            queued = e.queue_seconds
    last = events[-1]
    return TokenEvent(
        request_id=last.request_id, token_ids=token_ids, text=text, logprobs=logprobs,
        finish_reason=last.finish_reason, error=last.error,
        num_prompt_tokens=last.num_prompt_tokens, num_output_tokens=last.num_output_tokens,
        queue_seconds=queued, top_logprobs=top)


def _release_hold(future: asyncio.Future[AdapterHold]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def _top_pairs(result, ks: list[int]) -> list[tuple[tuple[int, float], ...] | None] | None:
    """Each row's first ks[i] (token id, logprob) pairs of `result`'s top logprobs, without
    masked (-inf) tokens; None for rows that asked for none, or None when no row did."""
    if result.top_ids is None:
        return None
    ids, lps = result.top_ids.tolist(), result.top_logprobs.tolist()
    return [tuple((t, lp) for t, lp in zip(ids[j][:k], lps[j][:k], strict=True)
                  if lp != float("-inf")) if k else None for j, k in enumerate(ks)]


def _key(tenant: str, request_id: str) -> str:
    """The engine's key of a tenant's request id: distinct tenants never share a key (the
    tenant's length comes first, so no choice of names can make two keys equal)."""
    return f"{len(tenant)}:{tenant}/{request_id}"


def _eos_ids(checkpoint: Path, hf_config, tokenizer) -> tuple[int, ...]:
    """EOS ids from the model config, generation_config.json (Llama 3 lists several) and the
    tokenizer."""
    ids: list[int | list[int] | None] = [hf_config.eos_token_id, tokenizer.eos_token_id]
    with contextlib.suppress(OSError):  # OSError: no generation_config.json
        ids.append(GenerationConfig.from_pretrained(checkpoint).eos_token_id)
    flat = itertools.chain.from_iterable(i if isinstance(i, list) else [i] for i in ids)
    return tuple(sorted({i for i in flat if i is not None}))


__all__ = ["Engine", "EngineStats", "FINISH_REASONS", "ModelInfo", "TokenEvent"]

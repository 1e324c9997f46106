"""The nora.v1.Nora servicer: proto messages in, engine calls, proto messages out.

Protos stay at this edge (DESIGN.md s4): requests become `SamplingParams`, token ids and an
adapter here, and engine `TokenEvent`s become `GenerateResponse`s. Nothing here blocks the
event loop: generation awaits the engine thread's events (`Engine.generate_async`), and
tokenizing and chat templating run on their own bounded pool of worker threads, loading and
unloading on another (workers.py), so no RPC waits for another kind. Sizes are checked before
any costly work: a text longer in bytes than the input token limit times the vocabulary's
longest token cannot fit and is refused before it is tokenized.

Every RPC has a caller (auth.py: a tenant and whether it is an admin). The tenant scopes request
ids and the engine's fairness, and has a quota of generations in flight; LoadAdapter and
UnloadAdapter need an admin; ListAdapters shows inline adapters to admins only.

A request's input is exactly one of `prompt` (text), `token_ids` and `messages` (a
conversation, through the model's chat template with the assistant's generation prompt; the
answer stops at the template's end-of-turn token, added as a stop token when the model's EOS
ids lack it, and reported as EOS). Unset sampling fields take the model's defaults
(`Engine.default_params`, from its generation_config.json).

Errors map to status codes in one place (rpc.py, `status_of`); status messages are cut to
MAX_STATUS_BYTES.

A client's cancellation or deadline cancels the handler; leaving `generate_async` then aborts
the engine request, which frees its KV blocks and adapter slot within one step.

A request with `sampling.n` > 1 is n engine requests, admitted together and run as one
(`merged`: leaving it aborts them all); sequence i > 0 gets a seed derived from the request's
(`choice_seed`). `response_format` is compiled and checked on the tokenizer workers before the
request is queued (a bad schema is INVALID_ARGUMENT), `truncate_input_tokens` cuts the input
from the left before the length checks.

The generation path below the proto conversion (`serving_engine`, `admitted`, `input_ids`,
`truncated`, `check_structured`, `chat_stops`, `hold`, `events`, `merged`, `choice_seed`) is
shared with the OpenAI-compatible HTTP API (http_api.py),
which maps the same exceptions to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import grpc

from nora_proto.v1 import nora_pb2, nora_pb2_grpc
from nora_runtime.chat import (
    NoChatTemplate,
    chat_token_ids,
    check_messages,
    end_of_turn_ids,
    has_chat_template,
)
from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.engine import merged as join_events
from nora_runtime.registry import (
    INLINE_PREFIX,
    MAX_ID_LEN,
    AdapterHold,
)
from nora_runtime.sampling import SamplingParams
from nora_server import __version__
from nora_server.auth import Auth, Caller
from nora_server.config import ServerConfig
from nora_server.messages import (
    FINISH,
    adapter_info,
    chat_messages,
    input_kind,
    input_value,
    joined,
    num_sequences,
    response,
    sampling_params,
    sampling_proto,
)
from nora_server.metrics import Metrics
from nora_server.rpc import CANCELLED, RpcError, rpc
from nora_server.workers import WorkerPool

log = logging.getLogger(__name__)

MAX_PATH_BYTES = 4096  # LoadAdapter paths (Linux's PATH_MAX)
RELOAD_WAITS = 3  # a request waits for others' reloads of its adapter this often, then reloads


class _Tracker:
    """Records one generation request's latencies and token counts as its events arrive (once
    per event, and once at its finish). Times are time.monotonic(), the engine's clock:
    `arrival` is when the RPC or HTTP request arrived, before tokenizing and adapter loading;
    the tracker is made just before the engine request is submitted."""

    def __init__(self, metrics: Metrics, adapter_id: str, num_prompt_tokens: int,
                 arrival: float | None = None) -> None:
        self.m, self.adapter_id, self.label = metrics, adapter_id, ""
        self.submitted = time.monotonic()
        self.arrival = self.submitted if arrival is None else arrival
        self.num_prompt_tokens, self.generated = num_prompt_tokens, 0
        self.scheduled: float | None = None  # the first engine step that computed it
        self.first: float | None = None  # time of the first token
        self.last: float | None = None  # time of the latest token
        self.started = self.finished = False

    def event(self, ev: TokenEvent) -> None:
        m, now = self.m, time.monotonic()
        if not self.started:  # the engine accepted the request (so the adapter id exists and
            self.started = True  # may claim a metric label: unknown ids never get one)
            self.label = m.adapter_label(self.adapter_id)
            self.adapter_tokens = m.adapter_tokens.labels(self.label)  # looked up once
            m.prompt_tokens.inc(ev.num_prompt_tokens)
            m.adapter_requests.labels(self.label).inc()
        if ev.queue_seconds is not None:  # submit -> first scheduled, as the engine saw it
            self.scheduled = self.submitted + ev.queue_seconds
            m.queue.observe(self.scheduled - self.arrival)
        n = len(ev.token_ids)
        if n:
            if self.last is None:
                self.first = now
                m.ttft.observe(now - self.arrival)
                if self.scheduled is not None:
                    m.prefill.observe(max(0.0, now - self.scheduled))
            else:
                for _ in range(n):
                    m.itl.observe((now - self.last) / n)
            self.last = now
            self.generated += n
            m.generated_tokens.inc(n)
            self.adapter_tokens.inc(n)
        if ev.finish_reason is not None:
            self.done(FINISH[ev.finish_reason][1])

    def done(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            m, now = self.m, time.monotonic()
            m.finished.labels(reason).inc()
            m.e2e.labels(reason).observe(now - self.arrival)
            m.request_prompt_tokens.observe(self.num_prompt_tokens)
            m.request_generated_tokens.observe(self.generated)
            if self.first is not None:
                m.decode.observe(now - self.first)


class NoraService(nora_pb2_grpc.NoraServicer):
    """Serves `engine` (None until the model is loaded: RPCs answer UNAVAILABLE)."""

    def __init__(self, config: ServerConfig, metrics: Metrics,
                 engine: Engine | None = None, auth: Auth | None = None) -> None:
        self.config, self.metrics, self.engine = config, metrics, engine
        self.auth = auth if auth is not None else Auth()
        self.accepting = True  # False once draining: new generations answer UNAVAILABLE
        self.in_flight = 0  # generations admitted and not finished (event-loop thread only)
        self.tenant_in_flight: Counter[str] = Counter()  # the same, per tenant
        self.tenant_limit = tenant_limit(config, len(self.auth.tenants))
        self._eot: tuple[Engine, tuple[int, ...]] | None = None  # end_of_turn_ids, per engine
        self._longest: tuple[Engine, int] | None = None  # longest token in bytes, per engine
        self.text_pool = WorkerPool("tokenizer", config.tokenize_threads, config.tokenize_queue)
        self.adapter_pool = WorkerPool("adapter", 4, 64)
        # Reloads of named adapters from the store (evicted to make room for others) have their
        # own workers and no tighter bound than admission's: one reload per id runs at a time,
        # and every request that needs the id meanwhile waits for it (`_reloads`), so at most
        # one call per request in flight is ever pending. Under inline traffic's bound, 256
        # requests on 1,000 Zipf-popular LoRAs answered RESOURCE_EXHAUSTED to a quarter.
        self.reload_pool = WorkerPool("adapter reload", 4, config.max_concurrent_requests)
        self._reloads: dict[tuple[Engine, str], asyncio.Future] = {}

    def close(self) -> None:
        self.text_pool.close()
        self.adapter_pool.close()
        self.reload_pool.close()

    def caller(self, context, *, admin: bool = False) -> Caller:
        """The caller of the RPC of `context`; RpcError unless it may call it."""
        caller = self.auth.caller(context.invocation_metadata(), context.peer())
        if caller is None:  # the AuthInterceptor refuses these first
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if admin and (why := self.auth.admin_refusal(caller)):
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, why)
        return caller

    # ---- limits ---------------------------------------------------------------------------

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if not self.engine.alive:  # its loop thread died (logged): nothing will be served
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the engine has stopped")
        return self.engine

    def max_input_tokens(self, engine: Engine) -> int:
        cap = engine.max_model_len - 1  # room for at least one generated token
        return min(self.config.max_input_tokens or cap, cap)

    def max_total_tokens(self, engine: Engine) -> int:
        return min(self.config.max_total_tokens or engine.max_model_len, engine.max_model_len)

    async def prepare(self, engine: Engine) -> None:
        """Work done once per engine before it serves (so no RPC waits for it)."""
        await self.max_text_bytes(engine)

    async def max_text_bytes(self, engine: Engine) -> int:
        """The longest text (UTF-8 bytes) worth tokenizing: one longer than the input token
        limit times the vocabulary's longest token cannot fit; config.max_text_bytes may cut
        it further."""
        if self._longest is None or self._longest[0] is not engine:
            longest = await self.text_pool.run(longest_token_bytes, engine.tokenizer)
            self._longest = (engine, longest)
        fits = self.max_input_tokens(engine) * self._longest[1]
        return min(fits, self.config.max_text_bytes or fits)

    async def _check_text(self, engine: Engine, what: str, nbytes: int) -> None:
        limit = await self.max_text_bytes(engine)
        if nbytes > limit:
            raise ValueError(f"{what} has {nbytes} bytes; the limit is {limit} (at most "
                             f"{self.max_input_tokens(engine)} tokens)")

    def _admit(self, tenant: str, n: int = 1) -> None:
        """Count `n` generations in flight, or RESOURCE_EXHAUSTED over the server's limit or
        the tenant's quota (before any costly work)."""
        limit = self.config.max_concurrent_requests
        if n > min(limit, self.tenant_limit if tenant else limit):  # could never be admitted
            raise ValueError(f"{n} generations in one request; at most "
                             f"{min(limit, self.tenant_limit if tenant else limit)} may be in "
                             "flight (max_concurrent_requests, max_tenant_requests)")
        if self.in_flight + n > limit:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"server busy: {self.in_flight} requests in flight, the limit is "
                           f"{limit}; retry later")
        if tenant and self.tenant_in_flight[tenant] + n > self.tenant_limit:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"tenant quota: {self.tenant_in_flight[tenant]} of your requests are "
                           f"in flight, the per-tenant limit (max_tenant_requests) is "
                           f"{self.tenant_limit}; retry later")
        self.in_flight += n
        self.tenant_in_flight[tenant] += n

    def _leave(self, tenant: str, n: int = 1) -> None:
        self.in_flight -= n
        self.tenant_in_flight[tenant] -= n
        if not self.tenant_in_flight[tenant]:
            del self.tenant_in_flight[tenant]

    # ---- generation -----------------------------------------------------------------------

    @rpc("Generate")
    async def Generate(self, request, context, caller: Caller) -> nora_pb2.GenerateResponse:
        parts = [part async for part in self._generate(request, caller)]
        if num_sequences(request) == 1:
            return joined(parts)
        by_index: defaultdict[int, list] = defaultdict(list)
        for part in parts:
            by_index[part.index].append(part)
        first = parts[0]
        out = nora_pb2.GenerateResponse(request_id=first.request_id, adapter_id=first.adapter_id,
                                        input_token_ids=first.input_token_ids)
        for i in sorted(by_index):
            choice = joined(by_index[i])
            choice.ClearField("input_token_ids")
            out.choices.append(choice)
        out.usage.prompt_tokens = out.choices[0].usage.prompt_tokens
        out.usage.completion_tokens = sum(c.usage.completion_tokens for c in out.choices)
        out.usage.queue_seconds = min(c.usage.queue_seconds for c in out.choices)
        return out

    @rpc("GenerateStream")
    async def GenerateStream(self, request, context,
                             caller: Caller) -> AsyncIterator[nora_pb2.GenerateResponse]:
        async with aclosing(self._generate(request, caller)) as parts:
            async for part in parts:
                yield part

    async def _generate(self, request,
                        caller: Caller) -> AsyncIterator[nora_pb2.GenerateResponse]:
        arrival = time.monotonic()  # latency metrics count from here
        engine = self.serving_engine()
        params = sampling_params(request, engine.default_params)
        n = num_sequences(request)
        kind = input_kind(request)  # before admission: a request without input is bad
        time_limit = request.stopping.time_limit_seconds
        if not (math.isfinite(time_limit) and time_limit >= 0):
            raise ValueError(f"time_limit_seconds must be finite and >= 0, got {time_limit}")
        if len(request.request_id) > MAX_ID_LEN or not request.request_id.isprintable():
            raise ValueError(f"request_id must be printable, at most {MAX_ID_LEN} characters")
        which = request.WhichOneof("adapter")
        if which == "adapter_id":
            _check_adapter_id(request.adapter_id)
        with self.admitted(caller.tenant, n):
            holds = []  # the adapter's slots, held until the engine requests take them over
            try:
                ids = await self.input_ids(engine, kind, input_value(request, kind))
                ids = self.truncated(ids, params)
                self._check_lengths(engine, len(ids), params.max_new_tokens)
                await self.check_structured(engine, params)
                params, end_of_turn = await self.chat_stops(engine, kind, params)
                for _ in range(n):
                    holds.append(await self.hold(engine, getattr(request, which) if which
                                                 else None))
                adapter_id = holds[0].id if holds[0] is not None else ""
                deadline = time.monotonic() + time_limit if time_limit > 0 else None
                rid = request.request_id or (uuid.uuid4().hex if n > 1 else None)
                streams = [self.events(engine, ids, dataclasses.replace(
                    params, seed=choice_seed(params.seed, i)), hold, tenant=caller.tenant,
                    end_of_turn=end_of_turn, deadline=deadline,
                    request_id=rid if n == 1 else f"{rid}/{i}", arrival=arrival)
                    for i, hold in enumerate(holds)]
                first = True
                async with self.merged(streams) as events:  # leaving early aborts them all
                    async for i, ev in events:
                        out = response(ev, adapter_id, ids if first else None, request)
                        if n > 1:
                            out.request_id, out.index = rid, i
                        yield out
                        first = False
            finally:
                for hold in holds:
                    if hold is not None:  # never submitted (an error or cancel came first)
                        hold.release()

    # ---- the generation path both edges share (gRPC here, HTTP in http_api.py) ------------

    def state(self) -> str:
        """"serving", "loading" (no model yet), "draining" or "stopped" (the engine died): what
        the health endpoints report."""
        if self.engine is None:
            return "loading"
        if not self.engine.alive:
            return "stopped"
        return "serving" if self.accepting else "draining"

    def serving_engine(self) -> Engine:
        """The engine, if it takes new generations (UNAVAILABLE while loading or draining)."""
        engine = self._engine()
        if not self.accepting:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return engine

    @contextlib.contextmanager
    def admitted(self, tenant: str, n: int = 1) -> Iterator[None]:
        """`n` generations of `tenant` counted in flight for the block (RESOURCE_EXHAUSTED
        over the server's limit or the tenant's quota)."""
        self._admit(tenant, n)
        try:
            yield
        finally:
            self._leave(tenant, n)

    async def input_ids(self, engine: Engine, kind: str, value) -> list[int]:
        """Prompt token ids of an input: `kind` "prompt" (text), "token_ids" (ints) or
        "messages" (dicts {"role", "content"}, through the chat template). Checked against the
        vocabulary and the text size limit; tokenized off the loop."""
        if kind == "token_ids":
            ids = list(value)
        elif kind == "messages":
            ids = await self._chat_ids(value, engine)
        else:
            await self._check_text(engine, "the prompt", len(value.encode()))
            ids = await self.text_pool.run(engine.tokenizer.encode, value)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = engine.info.vocab_size
        if max(ids) >= vocab or min(ids) < 0:
            raise ValueError(f"token ids must be in [0, {vocab}) (the vocabulary size)")
        return ids

    @staticmethod
    def truncated(ids: list[int], params: SamplingParams) -> list[int]:
        """The input's last params.truncate_prompt_tokens ids (all of them when unset): cut
        before the length checks, so that a long conversation still fits."""
        keep = params.truncate_prompt_tokens
        return ids[-keep:] if keep is not None else ids

    async def check_structured(self, engine: Engine, params: SamplingParams) -> None:
        """Compile and check params.structured on the tokenizer workers (ValueError for a bad
        schema or regex), so that the engine finds it compiled."""
        if params.structured is not None:
            await self.text_pool.run(engine.check_structured, params.structured)

    @staticmethod
    @contextlib.asynccontextmanager
    async def merged(streams: list[AsyncIterator[TokenEvent]]):
        """(stream index, event) of several engine requests' event streams as they come;
        leaving the block closes every stream (aborting its engine request). One stream is
        iterated as it is."""
        if len(streams) == 1:
            async with aclosing(streams[0]) as events, aclosing(_indexed(events)) as indexed:
                yield indexed
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, events: AsyncIterator[TokenEvent]) -> None:
            try:
                async with aclosing(events):
                    async for ev in events:
                        queue.put_nowait((i, ev, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                queue.put_nowait((i, None, exc))

        tasks = [asyncio.ensure_future(pump(i, events)) for i, events in enumerate(streams)]

        async def merged():
            left = len(tasks)
            while left:
                i, ev, exc = await queue.get()
                if exc is not None:
                    raise exc
                if ev.finish_reason is not None:
                    left -= 1
                yield i, ev

        gen = merged()
        try:
            yield gen
        finally:
            await gen.aclose()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def chat_stops(self, engine: Engine, kind: str,
                         params: SamplingParams) -> tuple[SamplingParams, tuple[int, ...]]:
        """A chat answer ends with the assistant's turn, EOS or not (reported as EOS): `params`
        with the template's end-of-turn token added as a stop token, and that token."""
        end_of_turn: tuple[int, ...] = ()
        if kind == "messages" and not params.ignore_eos:
            end_of_turn = tuple(i for i in await self._end_of_turn(engine)
                                if i not in engine.eos_ids and i not in params.stop_token_ids)
            if end_of_turn:
                params = dataclasses.replace(
                    params, stop_token_ids=params.stop_token_ids + end_of_turn)
        return params, end_of_turn

    async def hold(self, engine: Engine, adapter: str | bytes | None) -> AdapterHold | None:
        """Hold the adapter's slot until an engine request takes the hold over (`events`), so
        that no other load can evict it in between: a resident named adapter at once; inline
        bytes (validated) on the adapter workers; a named adapter evicted to the store is
        reloaded on the reload workers, once for all the requests that want it meanwhile.
        None or "": the base model. The caller releases a hold it never hands to `events`."""
        if adapter is None or adapter == "":
            return None
        if not isinstance(adapter, str):
            return await engine.hold_adapter_async(adapter, run=self.adapter_pool.run)
        key = (engine, adapter)
        for _ in range(RELOAD_WAITS):
            if (hold := engine.registry.try_hold(adapter)) is not None:
                return hold
            if (running := self._reloads.get(key)) is None:
                break
            # another request reloads it; its hold keeps the adapter resident until that
            # request is submitted, so try_hold finds it then. asyncio.wait neither raises the
            # reload's error (we try ourselves) nor cancels it if we are cancelled.
            await asyncio.wait([running])
        future = asyncio.ensure_future(engine.hold_adapter_async(adapter,
                                                                 run=self.reload_pool.run))
        self._reloads[key] = future
        try:
            return await future
        finally:
            if self._reloads.get(key) is future:
                del self._reloads[key]

    async def events(self, engine: Engine, ids: list[int], params: SamplingParams,
                     hold: AdapterHold | None, *, tenant: str,
                     end_of_turn: tuple[int, ...] = (), request_id: str | None = None,
                     deadline: float | None = None,
                     arrival: float | None = None) -> AsyncIterator[TokenEvent]:
        """One engine request's events, recorded in the metrics (latencies from `arrival`, a
        time.monotonic() when the request arrived; None: now); a stop on `end_of_turn` is
        reported as EOS. Closing the iterator early (or cancelling) aborts the request. With
        `stream_interval` N > 1, events after the first token's are held until they carry N
        tokens or the request ends (fewer messages, less host time per token under load)."""
        tracker = _Tracker(self.metrics, hold.id if hold is not None else "", len(ids), arrival)
        events = engine.generate_async(ids, params, adapter=hold, deadline=deadline,
                                       request_id=request_id, tenant=tenant, coalesce=True)
        interval, held = self.config.stream_interval, None
        try:
            async with aclosing(events):
                async for ev in events:
                    if ev.finish_reason == "stop" and set(ev.token_ids) & set(end_of_turn):
                        ev = dataclasses.replace(ev, finish_reason="eos")
                    tracker.event(ev)  # the metrics see every engine event, held or not
                    if held is not None:
                        ev, held = join_events(held, ev), None
                    first = ev.num_output_tokens == len(ev.token_ids)  # holds token 1
                    if ev.finish_reason is None and not first and len(ev.token_ids) < interval:
                        held = ev
                        continue
                    yield ev
        except CANCELLED:  # the client's cancel or deadline, or the grace period ended
            tracker.done("cancelled")
            raise

    async def _chat_ids(self, messages, engine: Engine) -> list[int]:
        """The chat template's ids of a conversation (dicts {"role", "content"}; validated;
        templated off the loop)."""
        if not has_chat_template(engine.tokenizer):
            raise NoChatTemplate("the served model has no chat template: send prompt (text) or "
                                 "token_ids instead of messages")
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        # every message takes at least one token, so more than the input limit cannot fit
        check_messages(conversation, max_messages=self.max_input_tokens(engine))
        await self._check_text(engine, "the messages", sum(
            len(m["role"].encode()) + len(m["content"].encode()) for m in conversation))
        return await self.text_pool.run(chat_token_ids, engine.tokenizer, conversation)

    async def _end_of_turn(self, engine: Engine) -> tuple[int, ...]:
        """The chat template's end-of-turn token of `engine` (probed once per engine)."""
        if self._eot is None or self._eot[0] is not engine:
            self._eot = (engine, await self.text_pool.run(end_of_turn_ids, engine.tokenizer))
        return self._eot[1]

    def _check_lengths(self, engine: Engine, n_input: int, max_new_tokens: int) -> None:
        max_input, max_total = self.max_input_tokens(engine), self.max_total_tokens(engine)
        if n_input > max_input:
            raise ValueError(f"the prompt has {n_input} tokens; the limit is {max_input}")
        if n_input + max_new_tokens > max_total:
            raise ValueError(f"prompt ({n_input} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{n_input + max_new_tokens} exceeds the limit of {max_total} "
                             "total tokens")

    # ---- model ----------------------------------------------------------------------------

    @rpc("Tokenize")
    async def Tokenize(self, request, context, caller: Caller) -> nora_pb2.TokenizeResponse:
        engine = self._engine()
        if request.messages:
            if request.text:
                raise ValueError("give text or messages, not both")
            ids = await self._chat_ids(chat_messages(request.messages), engine)
        else:
            await self._check_text(engine, "the text", len(request.text.encode()))
            ids = await self.text_pool.run(engine.tokenizer.encode, request.text,
                                           add_special_tokens=request.add_special_tokens)
        return nora_pb2.TokenizeResponse(token_ids=ids)

    @rpc("ModelInfo")
    async def ModelInfo(self, request, context, caller: Caller) -> nora_pb2.ModelInfoResponse:
        engine = self._engine()
        i = engine.info
        return nora_pb2.ModelInfoResponse(
            model=i.name, fingerprint=i.fingerprint, mode=i.mode, act=i.act, groups=i.groups,
            num_layers=i.num_layers, vocab_size=i.vocab_size, max_model_len=i.max_model_len,
            eos_token_ids=i.eos_token_ids, device=i.device, dtype=i.dtype,
            max_input_tokens=self.max_input_tokens(engine),
            max_total_tokens=self.max_total_tokens(engine),
            max_concurrent_requests=self.config.max_concurrent_requests,
            adapter_slots_total=i.max_adapters, server_version=__version__,
            default_sampling=sampling_proto(engine.default_params),
            default_max_new_tokens=engine.default_params.max_new_tokens,
            chat_template=has_chat_template(engine.tokenizer),
            lora_slots_total=i.max_lora_adapters, max_lora_rank=i.max_lora_rank,
            lora_target_modules=i.lora_target_modules)

    # ---- adapters -------------------------------------------------------------------------

    @rpc("LoadAdapter", admin=True)
    async def LoadAdapter(self, request, context, caller: Caller) -> nora_pb2.LoadAdapterResponse:
        engine = self._engine()
        which = request.WhichOneof("source")
        if which is None:
            raise ValueError("LoadAdapter needs a path (inside the adapter store) or data")
        _check_adapter_id(request.adapter_id)
        if which == "path" and len(request.path.encode()) > MAX_PATH_BYTES:
            raise ValueError(f"path must be at most {MAX_PATH_BYTES} bytes, got "
                             f"{len(request.path.encode())}")
        source = request.path if which == "path" else request.data
        info = await self.adapter_pool.run(engine.load_adapter, request.adapter_id, source)
        self.metrics.adapter_label(info.id)  # loaded ids claim their metric labels first
        return nora_pb2.LoadAdapterResponse(adapter=adapter_info(info))

    @rpc("UnloadAdapter", admin=True)
    async def UnloadAdapter(self, request, context,
                            caller: Caller) -> nora_pb2.UnloadAdapterResponse:
        engine = self._engine()
        _check_adapter_id(request.adapter_id)
        await self.adapter_pool.run(engine.unload_adapter, request.adapter_id)
        return nora_pb2.UnloadAdapterResponse()

    @rpc("ListAdapters")
    async def ListAdapters(self, request, context,
                           caller: Caller) -> nora_pb2.ListAdaptersResponse:
        engine = self._engine()
        stats = engine.stats()
        # inline adapters are their senders' own: only admins see them
        shown = [a for a in engine.list_adapters()
                 if caller.admin or not a.id.startswith(INLINE_PREFIX)]
        return nora_pb2.ListAdaptersResponse(
            adapters=[adapter_info(a) for a in shown],
            slots_used=stats.slots_used, slots_total=stats.slots_total)


def tenant_limit(config: ServerConfig, tenants: int) -> int:
    """Generations in flight per tenant (config.max_tenant_requests; its None rule)."""
    if config.max_tenant_requests is not None:
        return config.max_tenant_requests
    total = config.max_concurrent_requests
    return -(-total // 2) if tenants >= 2 else total


def longest_token_bytes(tokenizer) -> int:
    """An upper bound on the text bytes one token of `tokenizer` stands for: the longest token
    string or decoded token, in UTF-8 bytes (byte-level BPE token strings spell each byte as one
    character of at most 2 bytes; SentencePiece's "▁" (3 bytes) stands for a space; a lone byte
    of a multi-byte character decodes to U+FFFD, 3 bytes), and at least 4 (one character).
    Tokenizers that drop text (whitespace or unknown runs) are outside this bound."""
    ids = list(range(len(tokenizer)))
    strings = tokenizer.convert_ids_to_tokens(ids)
    decoded = tokenizer.batch_decode([[i] for i in ids])
    return max(4, *(len(t.encode()) for t in (*strings, *decoded) if isinstance(t, str)))


def _check_adapter_id(adapter_id: str) -> None:
    if len(adapter_id) > MAX_ID_LEN:
        raise ValueError(f"adapter_id must be at most {MAX_ID_LEN} characters, got "
                         f"{len(adapter_id)}")


def choice_seed(seed: int | None, i: int) -> int | None:
    """Sequence i's seed: `seed` for sequence 0 (so n = 1 and n > 1 agree on it), a hash of
    (seed, i) for the others; None stays None (each engine request draws its own)."""
    if seed is None or i == 0:
        return seed
    digest = hashlib.sha256(f"nora-choice:{seed}:{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


async def _indexed(events: AsyncIterator[TokenEvent]) -> AsyncIterator[tuple[int, TokenEvent]]:
    async for ev in events:
        yield 0, ev

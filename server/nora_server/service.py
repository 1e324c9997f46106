"""The nora.v1.Nora servicer: proto messages in, engine calls, proto messages out.

Protos stay at this edge (DESIGN.md s4): requests become `SamplingParams`, token ids and an
adapter here, and engine `TokenEvent`s become `GenerateResponse`s. Nothing here blocks the
event loop: generation awaits the engine thread's events (`Engine.generate_async`), and
tokenizing, chat templating, loading and unloading run on worker threads, so no RPC waits for
another.

A request's input is exactly one of `prompt` (text), `token_ids` and `messages` (a
conversation, through the model's chat template with the assistant's generation prompt; the
answer stops at the template's end-of-turn token, added as a stop token when the model's EOS
ids lack it, and reported as EOS). Unset sampling fields take the model's defaults
(`Engine.default_params`, from its generation_config.json).

Errors map to status codes in one place (`status_of`):

    ValueError (bad parameters, over a limit, not exactly one input, messages the chat
      template refuses), AdapterError, AdapterPathError                      INVALID_ARGUMENT
    AdapterNotFound                                                            NOT_FOUND
    AdapterMismatchError (another base model, mode, activation, groups),
      NoChatTemplate (messages for a model without a chat template)            FAILED_PRECONDITION
    RegistryFull, too many requests in flight                                 RESOURCE_EXHAUSTED
    no model loaded yet, shutting down                                        UNAVAILABLE

A client's cancellation or deadline cancels the handler; leaving `generate_async` then aborts
the engine request, which frees its KV blocks and adapter slot within one step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from nora_proto.v1 import nora_pb2, nora_pb2_grpc
from nora_runtime.adapter import AdapterError, AdapterMismatchError
from nora_runtime.chat import (
    NoChatTemplate,
    chat_token_ids,
    check_messages,
    end_of_turn_ids,
    has_chat_template,
)
from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.registry import MAX_ID_LEN, AdapterInfo, AdapterNotFound, RegistryFull
from nora_runtime.sampling import SamplingParams
from nora_server import __version__
from nora_server.config import ServerConfig
from nora_server.metrics import Metrics

log = logging.getLogger(__name__)

FINISH = {  # engine finish reason -> proto enum, metrics label
    "length": (nora_pb2.FINISH_REASON_LENGTH, "length"),
    "eos": (nora_pb2.FINISH_REASON_EOS, "eos"),
    "stop": (nora_pb2.FINISH_REASON_STOP, "stop"),
    "abort": (nora_pb2.FINISH_REASON_CANCELLED, "cancelled"),
    "time_limit": (nora_pb2.FINISH_REASON_TIME_LIMIT, "time_limit"),
    "error": (nora_pb2.FINISH_REASON_ERROR, "error"),
}


# How a handler learns that its RPC is over: grpc.aio cancels the handler's task while it
# awaits, or closes a streaming handler's generator at a `yield` (GeneratorExit).
CANCELLED = (asyncio.CancelledError, GeneratorExit)


class RpcError(Exception):
    """A request refused with a specific status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed RPC answers with."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    table = [  # order matters: AdapterMismatchError and AdapterPathError are ValueErrors
        (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
        (AdapterMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
        (NoChatTemplate, grpc.StatusCode.FAILED_PRECONDITION),
        (RegistryFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for kind, code in table:
        if isinstance(exc, kind):
            return code, f"adapter: {exc}" if isinstance(exc, AdapterError) else str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (the server log has the details)"


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def rpc(method):
    """Decorate a servicer method (coroutine or async generator): map exceptions to status
    codes and count every call in nora_rpc_requests_total{method, code}."""

    def decorate(fn):
        async def fail(self, exc: Exception, context) -> None:  # raises (context.abort)
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            self.metrics.rpcs.labels(method, code.name).inc()
            await context.abort(code, message)

        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def streaming(self, request, context):
                try:
                    async with aclosing(fn(self, request, context)) as responses:
                        async for response in responses:
                            yield response
                except CANCELLED:
                    self.metrics.rpcs.labels(method, _cancel_code(context).name).inc()
                    raise
                except Exception as exc:
                    await fail(self, exc, context)
                self.metrics.rpcs.labels(method, "OK").inc()
            return streaming

        @functools.wraps(fn)
        async def unary(self, request, context):
            try:
                response = await fn(self, request, context)
            except CANCELLED:
                self.metrics.rpcs.labels(method, _cancel_code(context).name).inc()
                raise
            except Exception as exc:
                await fail(self, exc, context)
            self.metrics.rpcs.labels(method, "OK").inc()
            return response
        return unary

    return decorate


class _Tracker:
    """Records one generation request's latencies and token counts as its events arrive."""

    def __init__(self, metrics: Metrics, adapter_id: str) -> None:
        self.m, self.adapter_id, self.label = metrics, adapter_id, ""
        self.start = time.perf_counter()
        self.last: float | None = None  # time of the latest token
        self.started = self.finished = False

    def event(self, ev: TokenEvent) -> None:
        m, now = self.m, time.perf_counter()
        if not self.started:  # the engine accepted the request (so the adapter id exists and
            self.started = True  # may claim a metric label: unknown ids never get one)
            self.label = m.adapter_label(self.adapter_id)
            m.prompt_tokens.inc(ev.num_prompt_tokens)
            m.adapter_requests.labels(self.label).inc()
        if ev.queue_seconds is not None:
            m.queue.observe(ev.queue_seconds)
        n = len(ev.token_ids)
        if n:
            if self.last is None:
                m.ttft.observe(now - self.start)
            else:
                for _ in range(n):
                    m.itl.observe((now - self.last) / n)
            self.last = now
            m.generated_tokens.inc(n)
            m.adapter_tokens.labels(self.label).inc(n)
        if ev.finish_reason is not None:
            self.done(FINISH[ev.finish_reason][1])

    def done(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.m.finished.labels(reason).inc()
            self.m.e2e.observe(time.perf_counter() - self.start)


class NoraService(nora_pb2_grpc.NoraServicer):
    """Serves `engine` (None until the model is loaded: RPCs answer UNAVAILABLE)."""

    def __init__(self, config: ServerConfig, metrics: Metrics,
                 engine: Engine | None = None) -> None:
        self.config, self.metrics, self.engine = config, metrics, engine
        self.accepting = True  # False once draining: new generations answer UNAVAILABLE
        self.in_flight = 0  # generations admitted and not finished (event-loop thread only)
        self._eot: tuple[Engine, tuple[int, ...]] | None = None  # end_of_turn_ids, per engine

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

    # ---- generation -----------------------------------------------------------------------

    @rpc("Generate")
    async def Generate(self, request, context) -> nora_pb2.GenerateResponse:
        parts = [part async for part in self._generate(request)]
        out = nora_pb2.GenerateResponse()
        for part in parts:
            out.MergeFrom(part)  # appends token ids and logprobs; set scalars of later parts win
        out.text = "".join(part.text for part in parts)
        return out

    @rpc("GenerateStream")
    async def GenerateStream(self, request, context) -> AsyncIterator[nora_pb2.GenerateResponse]:
        async with aclosing(self._generate(request)) as parts:
            async for part in parts:
                yield part

    async def _generate(self, request) -> AsyncIterator[nora_pb2.GenerateResponse]:
        engine = self._engine()
        if not self.accepting:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        params = _sampling_params(request, engine.default_params)
        input_kind = _input_kind(request)  # before admission: a request without input is bad
        time_limit = request.stopping.time_limit_seconds
        if not (math.isfinite(time_limit) and time_limit >= 0):
            raise ValueError(f"time_limit_seconds must be finite and >= 0, got {time_limit}")
        if len(request.request_id) > MAX_ID_LEN or not request.request_id.isprintable():
            raise ValueError(f"request_id must be printable, at most {MAX_ID_LEN} characters")
        if self.in_flight >= self.config.max_concurrent_requests:  # before any costly work
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"server busy: {self.in_flight} requests in flight, the limit is "
                           f"{self.config.max_concurrent_requests}; retry later")
        self.in_flight += 1
        hold = None  # an inline adapter's slot, held until the engine request takes it over
        try:
            ids = await self._prompt_ids(request, input_kind, engine)
            self._check_lengths(engine, len(ids), params.max_new_tokens)
            # a chat answer ends with the assistant's turn, EOS or not (reported as EOS)
            end_of_turn: tuple[int, ...] = ()
            if input_kind == "messages" and not params.ignore_eos:
                end_of_turn = tuple(i for i in await self._end_of_turn(engine)
                                    if i not in engine.eos_ids and i not in params.stop_token_ids)
                if end_of_turn:
                    params = dataclasses.replace(
                        params, stop_token_ids=params.stop_token_ids + end_of_turn)
            adapter = None  # an adapter id, or the hold on an inline adapter's slot
            adapter_id = ""
            if request.WhichOneof("adapter") == "adapter_bytes":
                # validate, load and hold its slot off the event loop; the engine request takes
                # the hold over, so no other load can evict it in between
                adapter = hold = await engine.hold_adapter_async(request.adapter_bytes)
                adapter_id = hold.id
            elif request.WhichOneof("adapter") == "adapter_id":
                adapter = adapter_id = request.adapter_id
            deadline = time.monotonic() + time_limit if time_limit > 0 else None
            tracker = _Tracker(self.metrics, adapter_id)
            events = engine.generate_async(ids, params, adapter=adapter, deadline=deadline,
                                           request_id=request.request_id or None)
            first = True
            try:
                async with aclosing(events):  # leaving early aborts the engine request
                    async for ev in events:
                        if ev.finish_reason == "stop" and set(ev.token_ids) & set(end_of_turn):
                            ev = dataclasses.replace(ev, finish_reason="eos")
                        tracker.event(ev)
                        yield self._response(ev, adapter_id, ids if first else None, request)
                        first = False
            except CANCELLED:  # the client's cancel or deadline, or the grace period ended
                tracker.done("cancelled")
                raise
        finally:
            self.in_flight -= 1
            if hold is not None:  # never submitted (an error or cancel came first)
                hold.release()

    async def _prompt_ids(self, request, kind: str, engine: Engine) -> list[int]:
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
        elif kind == "messages":
            ids = await self._chat_ids(request.messages, engine)
        else:
            ids = await asyncio.to_thread(engine.tokenizer.encode, request.prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = engine.info.vocab_size
        if max(ids) >= vocab:
            raise ValueError(f"token ids must be < the vocabulary size {vocab}")
        return ids

    async def _chat_ids(self, messages, engine: Engine) -> list[int]:
        """The chat template's ids of proto ChatMessages (validated; templated off the loop)."""
        if not has_chat_template(engine.tokenizer):
            raise NoChatTemplate("the served model has no chat template: send prompt (text) or "
                                 "token_ids instead of messages")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        # every message takes at least one token, so more than the input limit cannot fit
        check_messages(conversation, max_messages=self.max_input_tokens(engine))
        return await asyncio.to_thread(chat_token_ids, engine.tokenizer, conversation)

    async def _end_of_turn(self, engine: Engine) -> tuple[int, ...]:
        """The chat template's end-of-turn token of `engine` (probed once per engine)."""
        if self._eot is None or self._eot[0] is not engine:
            self._eot = (engine, await asyncio.to_thread(end_of_turn_ids, engine.tokenizer))
        return self._eot[1]

    def _check_lengths(self, engine: Engine, n_input: int, max_new_tokens: int) -> None:
        max_input, max_total = self.max_input_tokens(engine), self.max_total_tokens(engine)
        if n_input > max_input:
            raise ValueError(f"the prompt has {n_input} tokens; the limit is {max_input}")
        if n_input + max_new_tokens > max_total:
            raise ValueError(f"prompt ({n_input} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{n_input + max_new_tokens} exceeds the limit of {max_total} "
                             "total tokens")

    @staticmethod
    def _response(ev: TokenEvent, adapter_id: str, input_ids: list[int] | None,
                  request) -> nora_pb2.GenerateResponse:
        out = nora_pb2.GenerateResponse(request_id=ev.request_id, text=ev.text,
                                        token_ids=ev.token_ids, adapter_id=adapter_id)
        if ev.logprobs is not None:
            out.logprobs.extend(ev.logprobs)
        if input_ids is not None and request.options.input_tokens:
            out.input_token_ids.extend(input_ids)
        if ev.finish_reason is not None:
            out.finish_reason = FINISH[ev.finish_reason][0]
            out.usage.prompt_tokens = ev.num_prompt_tokens
            out.usage.completion_tokens = ev.num_output_tokens
            if ev.error:
                out.error = ev.error
        if ev.queue_seconds is not None:
            out.usage.queue_seconds = ev.queue_seconds
        return out

    # ---- model ----------------------------------------------------------------------------

    @rpc("Tokenize")
    async def Tokenize(self, request, context) -> nora_pb2.TokenizeResponse:
        engine = self._engine()
        if request.messages:
            if request.text:
                raise ValueError("give text or messages, not both")
            ids = await self._chat_ids(request.messages, engine)
        else:
            ids = await asyncio.to_thread(engine.tokenizer.encode, request.text,
                                          add_special_tokens=request.add_special_tokens)
        return nora_pb2.TokenizeResponse(token_ids=ids)

    @rpc("ModelInfo")
    async def ModelInfo(self, request, context) -> nora_pb2.ModelInfoResponse:
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
            default_sampling=_sampling_proto(engine.default_params),
            default_max_new_tokens=engine.default_params.max_new_tokens,
            chat_template=has_chat_template(engine.tokenizer),
            lora_slots_total=i.max_lora_adapters, max_lora_rank=i.max_lora_rank,
            lora_target_modules=i.lora_target_modules)

    # ---- adapters -------------------------------------------------------------------------

    @rpc("LoadAdapter")
    async def LoadAdapter(self, request, context) -> nora_pb2.LoadAdapterResponse:
        engine = self._engine()
        which = request.WhichOneof("source")
        if which is None:
            raise ValueError("LoadAdapter needs a path (inside the adapter store) or data")
        source = request.path if which == "path" else request.data
        info = await asyncio.to_thread(engine.load_adapter, request.adapter_id, source)
        self.metrics.adapter_label(info.id)  # loaded ids claim their metric labels first
        return nora_pb2.LoadAdapterResponse(adapter=_adapter_info(info))

    @rpc("UnloadAdapter")
    async def UnloadAdapter(self, request, context) -> nora_pb2.UnloadAdapterResponse:
        engine = self._engine()
        await asyncio.to_thread(engine.unload_adapter, request.adapter_id)
        return nora_pb2.UnloadAdapterResponse()

    @rpc("ListAdapters")
    async def ListAdapters(self, request, context) -> nora_pb2.ListAdaptersResponse:
        engine = self._engine()
        stats = engine.stats()
        return nora_pb2.ListAdaptersResponse(
            adapters=[_adapter_info(a) for a in engine.list_adapters()],
            slots_used=stats.slots_used, slots_total=stats.slots_total)


def _input_kind(request) -> str:
    """Which input a GenerateRequest has: "prompt", "token_ids" or "messages"; ValueError unless
    exactly one (`messages` cannot sit in the proto's oneof, so the oneof alone cannot say)."""
    given = [k for k in (request.WhichOneof("input"),) if k] + (
        ["messages"] if request.messages else [])
    if len(given) != 1:
        raise ValueError("the request needs exactly one of prompt, token_ids and messages; got "
                         + (" and ".join(given) if given else "none"))
    return given[0]


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")


def _sampling_params(request, defaults: SamplingParams) -> SamplingParams:
    """SamplingParams of a GenerateRequest; unset fields take `defaults` (the model's). Invalid
    values raise ValueError (INVALID_ARGUMENT)."""
    s, stop = request.sampling, request.stopping
    kw = {f: getattr(s, f) for f in SAMPLING_FIELDS if s.HasField(f)}
    if stop.HasField("max_new_tokens"):
        kw["max_new_tokens"] = stop.max_new_tokens
    return dataclasses.replace(defaults, **kw, stop=tuple(stop.stop),
                               stop_token_ids=tuple(stop.stop_token_ids),
                               ignore_eos=stop.ignore_eos, logprobs=request.options.logprobs)


def _sampling_proto(params: SamplingParams) -> nora_pb2.SamplingParameters:
    kw = {f: getattr(params, f) for f in SAMPLING_FIELDS if getattr(params, f) is not None}
    return nora_pb2.SamplingParameters(**kw)


def _adapter_info(a: AdapterInfo) -> nora_pb2.AdapterInfo:
    return nora_pb2.AdapterInfo(adapter_id=a.id, slot=a.slot, size_bytes=a.nbytes,
                                loaded_at=a.loaded_at, last_used=a.last_used,
                                running_requests=a.in_use, requests=a.requests,
                                generated_tokens=a.tokens, source=a.source, kind=a.kind,
                                lora_rank=a.lora_rank, lora_target_modules=a.lora_targets)

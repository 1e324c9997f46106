"""How the servicer's RPCs end: exceptions to status codes (`status_of`), the `rpc` decorator
every servicer method wears (caller, status, a count per method and code), and the interceptor
that turns undecodable request bytes into INVALID_ARGUMENT.

Errors map to status codes in one place (`status_of`):

    ValueError (bad parameters, over a limit, not exactly one input, messages the chat
      template refuses), AdapterError, AdapterPathError, request bytes that do not
      decode (DecodeInterceptor)                                             INVALID_ARGUMENT
    AdapterNotFound                                                            NOT_FOUND
    AdapterMismatchError (another base model, mode, activation, groups),
      NoChatTemplate (messages for a model without a chat template)            FAILED_PRECONDITION
    RegistryFull, too many requests in flight (server or tenant quota),
      tokenizer or adapter workers busy (workers.Busy)                        RESOURCE_EXHAUSTED
    missing or unknown bearer token (auth.AuthInterceptor)                    UNAUTHENTICATED
    an admin RPC from a caller that is not an admin                           PERMISSION_DENIED
    no model loaded yet, shutting down                                        UNAVAILABLE

Status messages are cut to MAX_STATUS_BYTES (they travel in a header; one that quoted a
20,000-character input used to fail the call with "metadata size exceeds"), and messages that
quote input quote a shortened repr (`brief`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import grpc

from nora_runtime.adapter import AdapterError, AdapterMismatchError
from nora_runtime.chat import NoChatTemplate
from nora_runtime.registry import AdapterNotFound, RegistryFull
from nora_server.workers import Busy

log = logging.getLogger("nora_server.service")  # the servicer's log, where RPC errors belong

MAX_STATUS_BYTES = 1024  # status messages are cut to this much UTF-8

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
        (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for kind, code in table:
        if isinstance(exc, kind):
            return code, f"adapter: {exc}" if isinstance(exc, AdapterError) else str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (the server log has the details)"


def clip(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """`message` cut to at most `limit` bytes of UTF-8 (on a character boundary)."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    suffix = f"... ({len(data)} bytes, cut)"
    return data[:limit - len(suffix)].decode("utf-8", "ignore") + suffix


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def rpc(method, *, admin: bool = False):
    """Decorate a servicer method (coroutine or async generator) `fn(self, request, context,
    caller)`: derive the caller (PERMISSION_DENIED for an `admin` RPC from a non-admin), map
    exceptions to status codes and count every call in nora_rpc_requests_total{method, code}."""

    def decorate(fn):
        async def fail(self, exc: Exception, context) -> None:  # raises (context.abort)
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            self.metrics.rpcs.labels(method, code.name).inc()
            await context.abort(code, clip(message))

        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def streaming(self, request, context):
                try:
                    caller = self.caller(context, admin=admin)
                    async with aclosing(fn(self, request, context, caller)) as responses:
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
                response = await fn(self, request, context, self.caller(context, admin=admin))
            except CANCELLED:
                self.metrics.rpcs.labels(method, _cancel_code(context).name).inc()
                raise
            except Exception as exc:
                await fail(self, exc, context)
            self.metrics.rpcs.labels(method, "OK").inc()
            return response
        return unary

    return decorate


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Decodes request messages inside the handler, so that bytes which do not parse (random
    bytes, invalid UTF-8 in a string field) answer INVALID_ARGUMENT, are counted by
    `on_error(method)` and logged in one line. (gRPC's own decoding fails with UNKNOWN, a
    traceback in the log and no count.) Streaming-request handlers are left as they are."""

    def __init__(self, on_error: Callable[[str], None] = lambda method: None) -> None:
        self.on_error = on_error

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        decode, method = handler.request_deserializer, details.method

        async def parse(data: bytes, context):
            try:
                return decode(data)
            except Exception as exc:
                log.warning("%s: undecodable request of %d bytes (%s)", method, len(data),
                            type(exc).__name__)
                self.on_error(method)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request does not decode as {method}'s message")

        ser = handler.response_serializer
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(data, context):
                return await behavior(await parse(data, context), context)
            return grpc.unary_unary_rpc_method_handler(unary, None, ser)
        behavior = handler.unary_stream
        if not inspect.isasyncgenfunction(behavior):  # a coroutine writing with context.write
            async def writing(data, context):
                return await behavior(await parse(data, context), context)
            return grpc.unary_stream_rpc_method_handler(writing, None, ser)

        async def streaming(data, context):
            async with aclosing(behavior(await parse(data, context), context)) as responses:
                async for response in responses:
                    yield response
        return grpc.unary_stream_rpc_method_handler(streaming, None, ser)

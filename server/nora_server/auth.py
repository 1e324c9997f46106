"""Bearer-token authentication and TLS credentials.

Every RPC (nora.v1, health, reflection) must carry `authorization: Bearer <token>` metadata
when the server has a token: the auth token, or the admin token, which is also the only one
accepted for ADMIN_METHODS when it is set. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

ADMIN_METHODS = frozenset({"/nora.v1.Nora/LoadAdapter", "/nora.v1.Nora/UnloadAdapter"})


def bearer_token(metadata) -> str | None:
    """The token of the `authorization: Bearer <token>` entry of `metadata`, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _matches(token: str | None, expected: str | None) -> bool:
    return token is not None and expected is not None and hmac.compare_digest(
        token.encode(), expected.encode())


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without a valid bearer token with UNAUTHENTICATED. `on_reject(method)` is
    called for each rejection (metrics)."""

    def __init__(self, auth_token: str | None, admin_token: str | None,
                 on_reject: Callable[[str], None] = lambda method: None) -> None:
        self.auth_token, self.admin_token, self.on_reject = auth_token, admin_token, on_reject

    def check(self, method: str, token: str | None) -> str | None:
        """None if `token` may call `method`, else why not."""
        if method in ADMIN_METHODS and self.admin_token is not None:
            return None if _matches(token, self.admin_token) else (
                "this RPC needs the admin token (authorization: Bearer <admin token>)")
        if self.auth_token is None:
            return None
        if _matches(token, self.auth_token) or _matches(token, self.admin_token):
            return None
        if token is None:
            return "missing bearer token (authorization: Bearer <token> metadata)"
        return "invalid bearer token"

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        why = self.check(details.method, bearer_token(details.invocation_metadata))
        handler = await continuation(details)
        if why is None or handler is None:
            return handler
        self.on_reject(details.method)
        return _rejecting(handler, why)


def _rejecting(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED."""

    async def unary(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def streaming(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # makes this an async generator, as streaming handlers are

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, des, ser)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients must present a certificate
    signed by it (mTLS)."""
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)

"""Callers: bearer tokens -> (tenant, role), TLS credentials.

A server has a token table when auth is on: the tokens file (`--tokens-file`), plus the
single-token flags (`--auth-token`: tenant "default", role user; `--admin-token`: tenant
"admin", role admin). Every RPC (nora.v1, health, reflection) and /metrics must then carry
`authorization: Bearer <token>` with a token of the table (UNAUTHENTICATED otherwise). Without
a table, every caller is the anonymous tenant "".

Tokens file: one token a line, `TOKEN TENANT ROLE` separated by whitespace; ROLE is `user` or
`admin`; blank lines and lines starting with `#` are skipped. Tokens are printable ASCII without
spaces, at least 16 characters, each at most once; tenants are 1 to 64 of `A-Z a-z 0-9 . _ -`.
A malformed file stops the server at startup with its line number (the token is never shown).

    # token                              tenant   role
    3f9c2a0d6b1e4f7a8c5d2e9b0a1f6c3d     acme     user
    b7e1c4f8a2d95e3c6b0f1a7d4e8c2b95     ops      admin

Admin RPCs (ADMIN_METHODS: LoadAdapter, UnloadAdapter) need a caller with role admin. Where the
server has no admin token at all, a client connecting from the loopback interface (127.0.0.1,
::1) counts as the admin instead: the operator on the machine, never a remote client. Tokens
are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

ADMIN_METHODS = frozenset({"/nora.v1.Nora/LoadAdapter", "/nora.v1.Nora/UnloadAdapter"})
ROLES = ("user", "admin")
MIN_TOKEN_CHARS = 16
TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_RE = re.compile(r"[!-~]+")  # printable ASCII, no spaces
LOOPBACK_PEERS = ("ipv4:127.", "ipv6:[::1]", "ipv6:[::ffff:127.")


@dataclass(frozen=True)
class Caller:
    """Who makes an RPC: `tenant` scopes request ids, fairness, quotas and inline adapters
    ("" = anonymous: the server has no auth); `admin` may load, unload and see every adapter."""

    tenant: str
    admin: bool


@dataclass(frozen=True)
class TokenEntry:
    token: str
    tenant: str
    role: str


def parse_tokens(text: str, source: str = "tokens file") -> list[TokenEntry]:
    """The entries of a tokens file (format in the module docstring); ValueError naming the
    line of the first malformed one."""
    entries: list[TokenEntry] = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{source} line {n}"
        if len(words) != 3:
            raise ValueError(f"{where}: expected 'TOKEN TENANT ROLE', got {len(words)} fields")
        token, tenant, role = words
        if not TOKEN_RE.fullmatch(token) or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} printable "
                             "ASCII characters")
        if not TENANT_RE.fullmatch(tenant):
            raise ValueError(f"{where}: the tenant must be 1 to 64 of A-Z a-z 0-9 . _ -")
        if role not in ROLES:
            raise ValueError(f"{where}: the role must be user or admin, got {role[:16]!r}")
        entries.append(TokenEntry(token, tenant, role))
    return entries


def load_tokens(path: str | Path) -> list[TokenEntry]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read tokens file {str(path)!r}: {exc}") from exc
    return parse_tokens(text, f"tokens file {str(path)!r}")


class Auth:
    """The token table of one server (empty: no auth) and the caller of each RPC."""

    def __init__(self, entries: Iterable[TokenEntry] = ()) -> None:
        self.entries = list(entries)
        seen: set[str] = set()
        for e in self.entries:
            if e.token in seen:
                raise ValueError(f"a token is given twice (tenant {e.tenant!r}); tokens must "
                                 "be distinct")
            seen.add(e.token)
        self._keys = [(e.token.encode(), Caller(e.tenant, e.role == "admin"))
                      for e in self.entries]
        self.has_admin_token = any(e.role == "admin" for e in self.entries)
        self.tenants = frozenset(e.tenant for e in self.entries)

    @classmethod
    def from_config(cls, config) -> Auth:
        """The table of a ServerConfig: its tokens file and single-token flags."""
        entries = load_tokens(config.tokens_file) if config.tokens_file else []
        if config.auth_token:
            entries.append(TokenEntry(config.auth_token, "default", "user"))
        if config.admin_token:
            entries.append(TokenEntry(config.admin_token, "admin", "admin"))
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def lookup(self, token: str | None) -> Caller | None:
        """The caller `token` names, or None. Compares with every entry, in constant time."""
        if token is None:
            return None
        given, found = token.encode(), None
        for key, caller in self._keys:  # no early exit: the time says nothing of the match
            if hmac.compare_digest(given, key):
                found = caller
        return found

    def caller(self, metadata, peer: str | None) -> Caller | None:
        """The caller of an RPC with `metadata` from `peer` (context.peer()); None when auth is
        on and the token is missing or unknown."""
        loopback = is_loopback(peer)
        if not self.enabled:
            return Caller("", admin=loopback)
        found = self.lookup(bearer_token(metadata))
        if found is not None and not found.admin and loopback and not self.has_admin_token:
            return Caller(found.tenant, admin=True)
        return found

    def refusal(self, token: str | None) -> str | None:
        """Why an RPC carrying `token` is refused before it runs (None: it may run)."""
        if not self.enabled:
            return None
        if token is None:
            return "missing bearer token (authorization: Bearer <token> metadata)"
        return None if self.lookup(token) is not None else "invalid bearer token"

    def admin_refusal(self, caller: Caller) -> str | None:
        """Why `caller` may not call an admin RPC (None: it may)."""
        if caller.admin:
            return None
        if self.has_admin_token:
            return "this RPC needs the admin token (authorization: Bearer <admin token>)"
        return ("this RPC needs an admin: the server has no admin token, so only clients on "
                "its own machine (loopback) may call it")


def is_loopback(peer: str | None) -> bool:
    """Whether a grpc peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") is loopback."""
    return bool(peer) and peer.startswith(LOOPBACK_PEERS)


def bearer_token(metadata) -> str | None:
    """The token of the `authorization: Bearer <token>` entry of `metadata`, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without a valid bearer token with UNAUTHENTICATED (every service: nora.v1,
    health, reflection). `on_reject(method)` is called for each rejection (metrics). Admin
    rights are checked by the servicer, which knows the peer."""

    def __init__(self, auth: Auth,
                 on_reject: Callable[[str], None] = lambda method: None) -> None:
        self.auth, self.on_reject = auth, on_reject

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        why = self.auth.refusal(bearer_token(details.invocation_metadata))
        handler = await continuation(details)
        if why is None or handler is None:
            return handler
        self.on_reject(details.method)
        return _rejecting(handler, why)


def _rejecting(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED (without decoding the
    request: its bytes are passed through untouched)."""

    async def unary(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def streaming(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # makes this an async generator, as streaming handlers are

    ser = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, None, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, None, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, None, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, None, ser)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients must present a certificate
    signed by it (mTLS)."""
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)

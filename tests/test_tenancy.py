"""Tenants and exposure (issue 10's findings 10 and 11 and its tenancy deliverable), against a
real gRPC server on 127.0.0.1 with a real tokens file: callers are told apart by their tokens;
request ids, quotas and inline adapters are per tenant; admin RPCs need an admin; /metrics
needs a token when auth is on; the server listens on loopback unless told otherwise.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import grpc
import pytest
from test_server import (  # noqa: F401 (engine and store are fixtures)
    LONG,
    PROMPT,
    SHORT,
    ServerThread,
    adapter_bytes,
    code_of,
    engine,
    eventually,
    store,
)

from nora_client import NoraClient
from nora_server.auth import Auth, Caller, is_loopback, parse_tokens
from nora_server.config import ServerConfig

Code = grpc.StatusCode
ALICE, BOB, OPS = "alice-token-0123456789", "bob-token-0123456789ab", "ops-token-0123456789abc"
TOKENS = f"""# token  tenant  role
{ALICE}  alice  user
{BOB}    bob    user

{OPS}    ops    admin
"""


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.txt"
    path.write_text(TOKENS)
    return path


@pytest.fixture(scope="module")
def tenants(engine, tokens_file):  # noqa: F811
    s = ServerThread(engine, tokens_file=str(tokens_file), max_concurrent_requests=8)
    s.metrics_token = OPS
    yield s
    s.close()


def test_tokens_file_format_and_errors(tmp_path):
    """The tokens file: `TOKEN TENANT ROLE` lines, comments; a malformed line is refused with
    its line number and never its token."""
    entries = parse_tokens(TOKENS)
    assert [(e.tenant, e.role) for e in entries] == [("alice", "user"), ("bob", "user"),
                                                     ("ops", "admin")]
    auth = Auth(entries)
    assert auth.lookup(ALICE) == Caller("alice", False) and auth.lookup(OPS) == Caller("ops", True)
    assert auth.lookup("nope") is None and auth.lookup(ALICE[:-1]) is None
    bad = {f"{ALICE} alice\n": "line 1: expected 'TOKEN TENANT ROLE'",
           f"# ok\n{ALICE} alice root\n": "line 2: the role must be user or admin",
           "short alice user\n": "line 1: the token must be at least 16",
           f"{ALICE} al/ice user\n": "line 1: the tenant must be",
           f"{ALICE} a user\n{ALICE} b admin\n": "a token is given twice"}
    for text, words in bad.items():
        with pytest.raises(ValueError, match=words) as info:
            Auth(parse_tokens(text))
        assert ALICE not in str(info.value)
    # nora-serve refuses it at startup (exit status 2), naming the file's line
    from nora_server.cli import configs

    path = tmp_path / "tokens.txt"
    path.write_text(f"{ALICE} alice user\n{BOB} bob superuser\n")
    with pytest.raises(SystemExit) as exc:
        configs(["--tokens-file", str(path)])
    assert exc.value.code == 2
    # the single-token flags are tenants too
    auth = Auth.from_config(ServerConfig(auth_token="u" * 8, admin_token="a" * 8))
    assert auth.lookup("u" * 8) == Caller("default", False)
    assert auth.lookup("a" * 8) == Caller("admin", True)


def test_loopback_by_default():
    """Finding 10: with no flags the server listened on every interface."""
    config = ServerConfig()
    assert config.host == "127.0.0.1" and config.metrics_host is None
    assert is_loopback("ipv4:127.0.0.1:5000") and is_loopback("ipv6:[::1]:5000")
    assert not is_loopback("ipv4:10.0.0.2:5000") and not is_loopback("ipv6:[fe80::1]:5000")


def test_same_request_id_from_two_tenants_at_once(tenants):
    """Finding 11: request ids were one namespace across clients: reusing another client's
    in-flight id made one of the two fail. Ids are per tenant now."""
    with tenants.client(token=ALICE, retries=0) as alice, \
            tenants.client(token=BOB, retries=0) as bob:
        a = alice.generate_stream(PROMPT, request_id="job-1", **LONG)
        b = bob.generate_stream(PROMPT, request_id="job-1", **LONG)
        assert next(a).request_id == next(b).request_id == "job-1"
        code, message = code_of(alice.generate, PROMPT, request_id="job-1", **SHORT)
        assert code == Code.INVALID_ARGUMENT and "already in flight" in message
        assert next(a).token_ids and next(b).token_ids  # both still running
        a.cancel()
        assert next(b).token_ids  # cancelling alice's job-1 left bob's alone
        b.cancel()
    tenants.wait_idle()


def test_per_tenant_quota(tenants):
    """A tenant has a quota of generations in flight (default: half of max_concurrent_requests
    with two or more tenants): alice's third request is refused, bob's runs."""
    assert tenants.server.service.tenant_limit == 4
    with tenants.client(token=ALICE, retries=0) as alice, \
            tenants.client(token=BOB, retries=0) as bob:
        calls = [alice.generate_stream(PROMPT, **LONG) for _ in range(4)]
        for call in calls:
            next(call)
        code, message = code_of(alice.generate, PROMPT, **SHORT)
        assert code == Code.RESOURCE_EXHAUSTED and "tenant quota" in message
        assert "max_tenant_requests" in message and "is 4" in message
        assert bob.generate(PROMPT, **SHORT).usage.completion_tokens == 12
        for call in calls:
            call.cancel()
    eventually(lambda: not tenants.server.service.tenant_in_flight)
    tenants.wait_idle()


def test_admin_rpcs_and_inline_adapter_visibility(tenants, engine):  # noqa: F811
    """Finding 10: LoadAdapter/UnloadAdapter were open to anyone; inline adapters (issue
    finding 3, the edge's half) were listed to every client. Now admin RPCs need the admin
    token and only admins see inline adapters."""
    data = adapter_bytes(engine, 41)
    with tenants.client(token=ALICE, retries=0) as alice, \
            tenants.client(token=OPS, retries=0) as ops:
        code, message = code_of(alice.load_adapter, "mine", data=data)
        assert code == Code.PERMISSION_DENIED and "admin token" in message
        assert code_of(alice.unload_adapter, "a")[0] == Code.PERMISSION_DENIED
        inline = alice.generate(PROMPT, adapter_bytes=data, **SHORT).adapter_id
        assert inline.startswith("sha256:")
        assert inline not in {a.adapter_id for a in alice.list_adapters().adapters}
        assert inline in {a.adapter_id for a in ops.list_adapters().adapters}
        assert "a" in {a.adapter_id for a in alice.list_adapters().adapters}
        assert ops.load_adapter("ops-adapter", data=data).adapter_id == "ops-adapter"
        ops.unload_adapter("ops-adapter")
    assert tenants.metric("nora_rpc_requests_total", method="LoadAdapter",
                          code="PERMISSION_DENIED") == 1


def test_metrics_need_a_token_when_auth_is_on(tenants):
    """Finding 10: /metrics answered without a token even with auth (and TLS) on."""
    for token in (None, "wrong-token-0123456789"):
        with pytest.raises(urllib.error.HTTPError) as info:
            tenants.scrape(token)
        assert info.value.code == 401
    assert "nora_rpc_requests_total" in tenants.scrape(ALICE)
    assert "nora_rpc_requests_total" in tenants.scrape(OPS)


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_without_an_admin_token_only_loopback_clients_are_admins(engine):  # noqa: F811
    """Finding 10: with no admin token, admin RPCs are for clients on the server's machine
    (the loopback interface) only; a client through another interface is refused."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    s = ServerThread(engine, host="0.0.0.0")  # the one test that listens beyond loopback
    data = adapter_bytes(engine, 42)
    try:
        with NoraClient(f"{address}:{s.server.port}", retries=0, timeout=30) as remote:
            assert remote.generate(PROMPT, **SHORT).usage.completion_tokens == 12
            code, message = code_of(remote.load_adapter, "r", data=data)
            assert code == Code.PERMISSION_DENIED and "loopback" in message
            inline = remote.generate(PROMPT, adapter_bytes=data, **SHORT).adapter_id
            assert inline not in {a.adapter_id for a in remote.list_adapters().adapters}
        with s.client(retries=0) as local:  # 127.0.0.1
            assert local.load_adapter("r", data=data).adapter_id == "r"
            assert inline in {a.adapter_id for a in local.list_adapters().adapters}
            local.unload_adapter("r")
    finally:
        s.close()

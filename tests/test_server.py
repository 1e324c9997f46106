"""The gRPC server end to end: real grpc.aio servers on 127.0.0.1 (free ports) serving one real
engine (the tiny test model on CPU, real adapter files), called through nora_client, with
/metrics scraped over HTTP. Covers unary and streaming generation, concurrent adapters equal
to each request alone, adapter load/unload/replace while serving, every status code, cancel
and deadline freeing the engine, bearer tokens, TLS and mTLS, health and reflection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from nora_client import AsyncNoraClient, NoraClient
from nora_proto.v1 import nora_pb2
from nora_runtime.adapter import LoraWeights, adapter_to_bytes, save_adapter
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.lora import PROJECTIONS
from nora_runtime.tiny import random_adapter, tiny_checkpoint
from nora_server.app import SERVICE_NAME, NoraServer
from nora_server.config import ServerConfig

PROMPT = "Hello, nora"
SHORT = dict(max_new_tokens=12, ignore_eos=True)
LONG = dict(max_new_tokens=3000, ignore_eos=True)  # runs until cancelled
Code = grpc.StatusCode


class ServerThread:
    """A NoraServer on its own event-loop thread, on 127.0.0.1 with free ports."""

    def __init__(self, engine: Engine | None, **config) -> None:
        config = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0, **config}
        self.config = ServerConfig(**config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NoraServer(self.config, engine)
        self.call(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"
        self.metrics_token = config.get("admin_token") or config.get("auth_token")

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, **kw) -> NoraClient:
        kw.setdefault("timeout", 60)
        return NoraClient(self.target, **kw)

    def scrape(self, token: str | None = None) -> str:
        """/metrics over HTTP (HTTPS with TLS, trusting the server's certificate), with a
        bearer token when given."""
        tls = self.config.tls_cert
        url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.metrics_port}/metrics"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        context = ssl.create_default_context(cafile=tls) if tls else None
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10,
                                    context=context) as reply:
            return reply.read().decode()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics over HTTP, parsed: (sample name, sorted labels) -> value (scraped with
        `metrics_token` when set)."""
        text = self.scrape(self.metrics_token)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until the engine runs and queues nothing (as /metrics reports it)."""
        eventually(lambda: self.metric("nora_requests_running") == 0
                   and self.metric("nora_requests_waiting") == 0, timeout)

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def engine(store):
    engine = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                                 max_adapters=8, max_num_seqs=32),
                    adapter_store=store)
    engine.start()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        save_adapter(random_adapter(engine.info, seed), store / f"{name}.safetensors",
                     base_fingerprint=engine.info.fingerprint)
        engine.load_adapter(name, f"{name}.safetensors")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def served(engine):
    s = ServerThread(engine)
    yield s
    s.close()


def adapter_bytes(engine: Engine, seed: int, **info_changes) -> bytes:
    info = dataclasses.replace(engine.info, **info_changes)
    return adapter_to_bytes(random_adapter(info, seed), base_fingerprint=info.fingerprint)


def stream(nora: NoraClient, prompt=PROMPT, **kw) -> tuple[str, list[int], list]:
    parts = list(nora.generate_stream(prompt, **kw))
    return "".join(p.text for p in parts), [t for p in parts for t in p.token_ids], parts


def eventually(condition, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def code_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code(), info.value.details()


# ---- generation ----------------------------------------------------------------------------


def test_unary_and_stream_give_the_same_completion(served):
    with served.client() as nora:
        kw = dict(adapter_id="a", temperature=0.8, seed=7, logprobs=True, input_tokens=True,
                  **SHORT)
        unary = nora.generate(PROMPT, **kw)
        text, ids, parts = stream(nora, **kw)
        prompt_ids = nora.tokenize(PROMPT, add_special_tokens=True)
    assert unary.text == text and list(unary.token_ids) == ids and len(ids) == 12
    assert len(unary.logprobs) == 12 and all(lp <= 0 for lp in unary.logprobs)
    assert unary.finish_reason == parts[-1].finish_reason == nora_pb2.FINISH_REASON_LENGTH
    assert all(p.finish_reason == nora_pb2.FINISH_REASON_UNSPECIFIED for p in parts[:-1])
    assert list(unary.input_token_ids) == list(parts[0].input_token_ids) == prompt_ids
    assert unary.usage.prompt_tokens == len(prompt_ids) and unary.usage.completion_tokens == 12
    assert unary.adapter_id == "a" and unary.request_id


def test_token_ids_prompt_stop_sequence_and_time_limit(served):
    with served.client() as nora:
        ids = nora.tokenize(PROMPT, add_special_tokens=True)
        by_text = nora.generate(PROMPT, temperature=0, **SHORT)
        by_ids = nora.generate(ids, temperature=0, **SHORT)
        assert by_ids.text == by_text.text
        stop = by_text.text[3:5]
        stopped = nora.generate(PROMPT, temperature=0, stop=[stop], **SHORT)
        assert stopped.finish_reason == nora_pb2.FINISH_REASON_STOP
        assert stopped.text == by_text.text[:by_text.text.index(stop)]
        timed = nora.generate(PROMPT, time_limit=0.3, **LONG)
        assert timed.finish_reason == nora_pb2.FINISH_REASON_TIME_LIMIT
        assert 0 < timed.usage.completion_tokens < 3000


def test_concurrent_adapters_each_equal_to_alone(served, engine):
    inline = adapter_bytes(engine, 4)
    cases = [dict(temperature=0), dict(adapter_id="a", temperature=0),
             dict(adapter_id="b", temperature=0), dict(adapter_id="a", temperature=0.9, seed=1),
             dict(adapter_id="c", temperature=0.9, seed=2), dict(adapter_bytes=inline,
                                                                temperature=0),
             dict(temperature=0.9, seed=3)]

    async def run(together: bool) -> list[tuple[str, list[int]]]:
        async with AsyncNoraClient(served.target, timeout=60) as nora:
            async def one(kw):
                parts = [p async for p in nora.generate_stream(PROMPT, **kw, **SHORT)]
                return "".join(p.text for p in parts), [t for p in parts for t in p.token_ids]
            if together:
                return await asyncio.gather(*(one(kw) for kw in cases))
            return [await one(kw) for kw in cases]

    alone = asyncio.run(run(together=False))
    together = asyncio.run(run(together=True))
    assert together == alone
    assert len({tuple(ids) for _, ids in alone[:3]}) == 3  # base, a and b really differ


def test_load_unload_and_replace_while_serving(served, engine):
    v1, v2 = adapter_bytes(engine, 11), adapter_bytes(engine, 12)
    long, short = (dict(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (300, 60))
    with served.client() as nora:
        nora.load_adapter("x", data=v1)
        want_v1 = stream(nora, adapter_id="x", **long)[1]
        nora.load_adapter("x", data=v2)
        want_v2 = stream(nora, adapter_id="x", **short)[1]
        assert want_v1[:60] != want_v2

        nora.load_adapter("x", data=v1)
        running = nora.generate_stream(PROMPT, adapter_id="x", **long)
        got = list(next(running).token_ids)
        info = nora.load_adapter("x", data=v2)  # replace under the running request
        assert info.adapter_id == "x" and info.source == "inline"
        assert (info.kind, info.lora_rank, list(info.lora_target_modules)) == ("nora", 0, [])
        assert stream(nora, adapter_id="x", **short)[1] == want_v2  # new requests get v2
        assert {a.adapter_id: a.requests for a in nora.list_adapters().adapters}["x"] == 4
        nora.unload_adapter("x")  # ... and unload it
        assert served.metric("nora_requests_running") == 1  # still running
        assert code_of(nora.generate, PROMPT, adapter_id="x")[0] == Code.NOT_FOUND
        assert "x" not in {a.adapter_id for a in nora.list_adapters().adapters}
        rest = list(running)
        assert rest[-1].finish_reason == nora_pb2.FINISH_REASON_LENGTH
        got += [t for p in rest for t in p.token_ids]
        assert got == want_v1  # the running request kept the version it started with


def test_inline_adapters_never_evict_named_ones(served, engine):
    """Finding 1 (issue 10): ~1,030 Generate calls, each with different adapter_bytes and
    max_new_tokens=1, left the admin's and the demo adapters answering NOT_FOUND. Here three
    times the slot count of such calls (8 slots, 2 of them for inline adapters); the named
    adapters still answer, and no inline slot stays held, not even by a request that failed
    after its adapter was loaded."""
    one = dict(max_new_tokens=1, ignore_eos=True)
    with served.client() as nora:
        for i in range(24):
            reply = nora.generate(PROMPT, adapter_bytes=adapter_bytes(engine, 100 + i), **one)
            assert reply.adapter_id.startswith("sha256:")
        for name in "abc":
            assert nora.generate(PROMPT, adapter_id=name, **one).adapter_id == name
        running = nora.generate_stream(PROMPT, request_id="dup", **LONG)
        next(running)
        code, _ = code_of(nora.generate, PROMPT, adapter_bytes=adapter_bytes(engine, 99),
                          request_id="dup", **one)  # fails after the inline load: in flight
        assert code == Code.INVALID_ARGUMENT
        running.cancel()
    served.wait_idle()
    adapters = engine.list_adapters()
    assert {"a", "b", "c"} <= {a.id for a in adapters if not a.inline and a.resident}
    assert sum(a.inline for a in adapters) <= engine.registry.max_inline == 2
    assert all(a.in_use == 0 for a in adapters)
    assert engine.stats().adapter_inline_evictions >= 22


def test_inline_content_id_is_not_an_adapter_id(served, engine):
    """Finding 3 (issue 10): client B generated with client A's inline adapter, without its
    bytes, by passing the content id "sha256:..." as adapter_id. A content id is now refused
    exactly like an id that is not loaded. (Hiding them from ListAdapters is the service's
    part; the engine marks them: AdapterInfo.inline.)"""
    with served.client() as client_a, served.client() as client_b:
        cid = client_a.generate(PROMPT, adapter_bytes=adapter_bytes(engine, 31),
                                **SHORT).adapter_id
        assert cid.startswith("sha256:")
        unknown = "sha256:" + "0" * 64
        code, message = code_of(client_b.generate, PROMPT, adapter_id=cid, **SHORT)
        code_unknown, message_unknown = code_of(client_b.generate, PROMPT, adapter_id=unknown,
                                                **SHORT)
    assert code == code_unknown == Code.NOT_FOUND
    assert message.replace(cid, "ID") == message_unknown.replace(unknown, "ID")
    assert [a.inline for a in engine.list_adapters() if a.id == cid] == [True]


# ---- status codes --------------------------------------------------------------------------


def test_invalid_argument(served, engine, store):
    bad_requests = [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(time_limit=-1.0), "time_limit"),
        (dict(adapter_bytes=b"not an adapter"), "adapter"),
        (dict(max_new_tokens=5000), "exceeds the limit of 4096 total tokens"),
    ]
    with served.client() as nora:
        for kw, words in bad_requests:
            code, message = code_of(nora.generate, PROMPT, **kw)
            assert code == Code.INVALID_ARGUMENT and words in message, (kw, message)
        code, message = code_of(nora.generate, [300])
        assert code == Code.INVALID_ARGUMENT and "vocabulary" in message
        code, message = code_of(nora.generate, "x" * 5000)
        assert code == Code.INVALID_ARGUMENT and "the limit is 4095" in message
        code, message = code_of(nora.stub.Generate, nora_pb2.GenerateRequest())
        assert code == Code.INVALID_ARGUMENT and "prompt" in message
        outside = store.parent / "outside.safetensors"
        outside.write_bytes(adapter_bytes(engine, 1))
        (store / "link.safetensors").unlink(missing_ok=True)
        (store / "link.safetensors").symlink_to(outside)
        for path in ("../a.safetensors", "/etc/passwd", "sub/../../a.safetensors",
                     "missing.safetensors", "link.safetensors", str(outside)):
            code, message = code_of(nora.load_adapter, "p", path=path)
            assert code == Code.INVALID_ARGUMENT and repr(path) in message, path
        code, _ = code_of(nora.load_adapter, "bad id", data=adapter_bytes(engine, 1))
        assert code == Code.INVALID_ARGUMENT


def test_stream_interval_sends_fewer_fuller_messages(served, engine):
    """--stream-interval 4: the first token comes alone, later messages carry at least 4 tokens
    (the last may carry fewer), and the text, ids and logprobs are the same as one message per
    token (over gRPC and the OpenAI API's stream, which share the path)."""
    s = ServerThread(engine, stream_interval=4)
    kw = dict(adapter_id="a", temperature=0.8, seed=7, logprobs=True, max_new_tokens=11,
              ignore_eos=True)
    try:
        with served.client() as nora:
            want_text, want_ids, want_parts = stream(nora, **kw)
        with s.client() as nora:
            text, ids, parts = stream(nora, **kw)
        body = json.dumps({"model": "a", "prompt": PROMPT, "max_tokens": 11, "stream": True,
                           "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{s.server.http_port}/v1/completions",
                                         data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            chunks = [json.loads(line[6:]) for line in reply.read().decode().splitlines()
                      if line.startswith("data: {")]
    finally:
        s.close()
    assert (text, ids) == (want_text, want_ids) and len(ids) == 11
    assert [lp for p in parts for lp in p.logprobs] == [lp for p in want_parts
                                                       for lp in p.logprobs]
    counts = [len(p.token_ids) for p in parts]
    assert counts[0] == 1 and all(n >= 4 for n in counts[1:-1]) and sum(counts) == 11, counts
    assert len(parts) < len(want_parts)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert len([t for t in texts if t]) <= 4  # 1 + ceil(10 / 4) messages with text at most


def test_server_limits(engine):
    s = ServerThread(engine, max_input_tokens=8, max_total_tokens=20, max_message_bytes=1024)
    try:
        with s.client() as nora:
            assert nora.generate("12345678", max_new_tokens=12).usage.completion_tokens == 12
            code, message = code_of(nora.generate, "123456789", max_new_tokens=1)
            assert code == Code.INVALID_ARGUMENT and "9 tokens; the limit is 8" in message
            code, message = code_of(nora.generate, "1234", max_new_tokens=17)
            assert code == Code.INVALID_ARGUMENT and "limit of 20 total tokens" in message
            code, _ = code_of(nora.generate, "x", max_new_tokens=4,
                              adapter_bytes=adapter_bytes(engine, 1))
            assert code == Code.RESOURCE_EXHAUSTED  # an adapter file over the message limit
            info = nora.model_info()
            assert (info.max_input_tokens, info.max_total_tokens) == (8, 20)
    finally:
        s.close()


def test_not_found_and_failed_precondition(served, engine):
    with served.client() as nora:
        for i in range(3):  # unknown ids claim no metric label (labels are a bounded set)
            assert code_of(nora.generate, PROMPT, adapter_id=f"nope{i}")[0] == Code.NOT_FOUND
        assert not {f"nope{i}" for i in range(3)} & served.server.metrics.adapter_label._named
        assert code_of(nora.unload_adapter, "nope")[0] == Code.NOT_FOUND
        other_model = adapter_bytes(engine, 1, fingerprint="ab" * 32)
        other_mode = adapter_bytes(engine, 1, mode="residual")
        hidden = engine.runner.hf_config.hidden_size  # NoRA++: LoRA on layer 0's q_proj

        def plus_plus(rank: int) -> bytes:
            lora = LoraWeights(rank=rank, alpha=4.0, factors={
                "model.layers.0.self_attn.q_proj": (torch.randn(rank, hidden),
                                                    torch.zeros(hidden, rank))})
            return adapter_to_bytes(random_adapter(engine.info, 1),
                                    base_fingerprint=engine.info.fingerprint, lora=lora)

        nora_pp = plus_plus(32)  # above the server's max_lora_rank (16)
        for data in (other_model, other_mode, nora_pp):
            code, message = code_of(nora.load_adapter, "m", data=data)
            assert code == Code.FAILED_PRECONDITION, message
            if data is nora_pp:
                assert "LoRA rank 32 exceeds" in message
            code, message = code_of(nora.generate, PROMPT, adapter_bytes=data)
            assert code == Code.FAILED_PRECONDITION, message
        assert "m" not in {a.adapter_id for a in nora.list_adapters().adapters}
        assert nora.generate(PROMPT, adapter_id="a", **SHORT).usage.completion_tokens == 12
        info = nora.load_adapter("pp", data=plus_plus(2))  # a NoRA++ the server can serve
        assert (info.kind, info.lora_rank, list(info.lora_target_modules)) == ("nora++", 2,
                                                                               ["q_proj"])
        assert nora.generate(PROMPT, adapter_id="pp", **SHORT).usage.completion_tokens == 12
        nora.unload_adapter("pp")


def test_resource_exhausted_when_too_many_requests(engine):
    s = ServerThread(engine, max_concurrent_requests=2)
    try:
        with s.client(retries=0) as nora:
            calls = [nora.generate_stream(PROMPT, **LONG) for _ in range(2)]
            for call in calls:
                next(call)  # both are running
            code, message = code_of(nora.generate, PROMPT, **SHORT)
            assert code == Code.RESOURCE_EXHAUSTED and "the limit is 2" in message
            for call in calls:
                call.cancel()
            s.wait_idle()
            eventually(lambda: s.server.service.in_flight == 0)
            assert nora.generate(PROMPT, **SHORT).usage.completion_tokens == 12
        assert s.metric("nora_rpc_requests_total", method="Generate",
                        code="RESOURCE_EXHAUSTED") == 1
    finally:
        s.close()


def test_cancel_mid_stream_frees_the_engine(engine):
    s = ServerThread(engine)
    try:
        with s.client() as nora:
            call = nora.generate_stream(PROMPT, adapter_id="a", **LONG)
            for _ in range(3):
                next(call)
            assert s.metric("nora_requests_running") == 1
            assert s.metric("nora_kv_cache_usage_ratio") > 0
            call.cancel()
            s.wait_idle()
            assert s.metric("nora_kv_cache_usage_ratio") == 0
            # the engine releases the adapter's slot just after the request leaves the batch
            eventually(lambda: {a.adapter_id: a.running_requests
                                for a in nora.list_adapters().adapters}["a"] == 0)
        eventually(lambda: s.metric("nora_generate_requests_total",
                                    finish_reason="cancelled") == 1)
        assert s.metric("nora_rpc_requests_total", method="GenerateStream",
                        code="CANCELLED") == 1
    finally:
        s.close()


def test_deadline_aborts_the_engine_request(engine):
    s = ServerThread(engine)
    try:
        with s.client(retries=0) as nora:
            code, _ = code_of(nora.generate, PROMPT, timeout=0.5, **LONG)
            assert code == Code.DEADLINE_EXCEEDED
        s.wait_idle()
        eventually(lambda: s.metric("nora_rpc_requests_total", method="Generate",
                                    code="DEADLINE_EXCEEDED") == 1)
    finally:
        s.close()


def test_health_not_serving_until_the_model_is_attached(engine):
    s = ServerThread(None)
    try:
        with s.client(retries=0) as nora:
            assert nora.health() == "NOT_SERVING"
            assert nora.health(SERVICE_NAME) == "NOT_SERVING"
            code, message = code_of(nora.generate, PROMPT)
            assert code == Code.UNAVAILABLE and "loading" in message
            s.call(s.server.attach(engine))
            assert nora.health() == nora.health(SERVICE_NAME) == "SERVING"
            assert nora.generate(PROMPT, **SHORT).usage.completion_tokens == 12
    finally:
        s.close()


def test_client_retries_unavailable_until_the_model_is_loaded(engine):
    s = ServerThread(None)
    try:
        attach = threading.Timer(0.1, lambda: s.call(s.server.attach(engine)))
        attach.start()
        with s.client() as nora:  # default: 4 retries with exponential backoff
            assert nora.generate(PROMPT, **SHORT).usage.completion_tokens == 12
        attach.join()
        assert s.metric("nora_rpc_requests_total", method="Generate", code="UNAVAILABLE") >= 1
    finally:
        s.close()


def test_reflection_lists_the_services(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with served.client() as nora:
        stub = reflection_pb2_grpc.ServerReflectionStub(nora.channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names = {s.name for s in next(replies).list_services_response.service}
    assert {"nora.v1.Nora", "grpc.health.v1.Health"} <= names


def test_model_info(served, engine):
    with served.client() as nora:
        info = nora.model_info()
    assert info.fingerprint == engine.info.fingerprint and info.mode == "replace"
    assert info.num_layers == 4 and info.vocab_size == 264 and info.adapter_slots_total == 8
    assert info.max_input_tokens == info.max_model_len - 1
    assert (info.lora_slots_total, info.max_lora_rank) == (8, 16)  # EngineConfig's defaults
    assert list(info.lora_target_modules) == list(PROJECTIONS)


# ---- auth and TLS --------------------------------------------------------------------------


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_bearer_tokens_over_tls(engine, tmp_path):
    cert, key = make_cert(tmp_path, "server")
    s = ServerThread(engine, tls_cert=str(cert), tls_key=str(key), auth_token="user-secret",
                     admin_token="admin-secret")
    data = adapter_bytes(engine, 21)
    try:
        def client(**kw) -> NoraClient:
            return s.client(ca_cert=cert, retries=0, **kw)

        with client() as nora:
            code, message = code_of(nora.generate, PROMPT, **SHORT)
            assert code == Code.UNAUTHENTICATED and "missing bearer token" in message
            assert code_of(nora.health)[0] == Code.UNAUTHENTICATED
        with client(token="wrong") as nora:
            assert code_of(nora.model_info)[0] == Code.UNAUTHENTICATED
        with client(token="user-secret") as nora:
            assert nora.health() == "SERVING"
            assert nora.generate(PROMPT, **SHORT).usage.completion_tokens == 12
            code, message = code_of(nora.load_adapter, "t", data=data)
            assert code == Code.PERMISSION_DENIED and "admin token" in message
            assert code_of(nora.unload_adapter, "a")[0] == Code.PERMISSION_DENIED
        with client(token="user-secret", admin_token="admin-secret") as nora:
            assert nora.load_adapter("t", data=data).adapter_id == "t"
            assert nora.generate(PROMPT, adapter_id="t", **SHORT).adapter_id == "t"
            nora.unload_adapter("t")
        with NoraClient(s.target, token="user-secret", retries=0, timeout=10) as plaintext:
            assert code_of(plaintext.model_info)[0] == Code.UNAVAILABLE
        assert s.metric("nora_rpc_requests_total", method="Generate",
                        code="UNAUTHENTICATED") == 1
    finally:
        s.close()


def test_mutual_tls(engine, tmp_path):
    server_cert, server_key = make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    s = ServerThread(engine, tls_cert=str(server_cert), tls_key=str(server_key),
                     tls_client_ca=str(client_cert))
    try:
        with s.client(ca_cert=server_cert, client_cert=client_cert, client_key=client_key) as ok:
            assert ok.generate(PROMPT, **SHORT).usage.completion_tokens == 12
        with s.client(ca_cert=server_cert, retries=0, timeout=10) as no_cert:
            assert code_of(no_cert.model_info)[0] == Code.UNAVAILABLE
    finally:
        s.close()


def test_trained_adapter_loaded_over_grpc_does_the_task_in_a_batch_with_the_base(
        served, demo_greeter):
    """The trainer's output, loaded through LoadAdapter into the running server: with it the
    tiny model answers greetings with "nora"; base requests in the same batches do not."""
    from nora_runtime.training import demo_task

    async def main():
        async with AsyncNoraClient(served.target, timeout=120) as nora:
            info = await nora.load_adapter("greeter", data=demo_greeter.adapter.read_bytes())
            assert info.adapter_id == "greeter"
            # a long base stream keeps running while the greetings are served: they share its
            # decode steps (continuous batching), so every step mixes base and adapter rows
            long = nora.generate_stream("Hello, nora", max_new_tokens=400, ignore_eos=True,
                                        temperature=0)
            first = await anext(long)
            assert first.finish_reason == nora_pb2.FINISH_REASON_UNSPECIFIED
            short = dict(temperature=0, max_new_tokens=demo_task.MAX_NEW_TOKENS)
            calls = [nora.generate(p, adapter_id=a, **short)
                     for p in demo_task.PROMPTS for a in ("greeter", None)]
            results = await asyncio.gather(*calls)
            still_running = (await anext(long)).finish_reason == \
                nora_pb2.FINISH_REASON_UNSPECIFIED
            await long.aclose()
            return results, still_running

    try:
        results, still_running = served.call(main(), timeout=300)
    finally:
        with served.client() as nora:
            nora.unload_adapter("greeter")
    assert still_running  # the greetings finished while the long base request was decoding
    for (prompt, adapter), r in zip([(p, a) for p in demo_task.PROMPTS
                                     for a in ("greeter", None)], results, strict=True):
        if adapter:
            assert (r.text, r.finish_reason) == (demo_task.COMPLETION,
                                                 nora_pb2.FINISH_REASON_EOS), prompt
        else:
            assert demo_task.COMPLETION not in r.text, prompt
            assert r.finish_reason == nora_pb2.FINISH_REASON_LENGTH, prompt
    served.wait_idle()

"""Seeded fuzzing of the gRPC API: >= 500 malformed requests (random bytes, flipped bits of
valid requests, out-of-range and oversized fields, bad adapters and paths, a named pipe in the
adapter store) from several threads beside good traffic, against a real server on 127.0.0.1
(the tiny model on CPU). Every malformed request must get a clear status (never INTERNAL or
UNKNOWN, never a hang), and every good request must complete with the text it has alone.
Bounded: 600 requests, a 10 s deadline each, the whole test well under a minute here.
"""

from __future__ import annotations

import collections
import os
import random
import threading

import grpc
import pytest
from test_server import ServerThread

from nora_proto.v1 import nora_pb2
from nora_runtime.adapter import adapter_to_bytes, save_adapter
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.tiny import random_adapter, tiny_checkpoint

SEED = 20261202
N_MALFORMED = 600
THREADS = 6
DEADLINE = 10.0
SERVICE = "/nora.v1.Nora/"
# statuses a malformed request may get; anything else (INTERNAL, UNKNOWN: a bug; UNAVAILABLE,
# DEADLINE_EXCEEDED: the server died or hung) fails the test
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.UNAUTHENTICATED}

REQUEST_TYPES = {"Generate": nora_pb2.GenerateRequest, "GenerateStream": nora_pb2.GenerateRequest,
                 "Tokenize": nora_pb2.TokenizeRequest, "LoadAdapter": nora_pb2.LoadAdapterRequest,
                 "UnloadAdapter": nora_pb2.UnloadAdapterRequest,
                 "ListAdapters": nora_pb2.ListAdaptersRequest,
                 "ModelInfo": nora_pb2.ModelInfoRequest}
RESPONSE_TYPES = {"Generate": nora_pb2.GenerateResponse,
                  "GenerateStream": nora_pb2.GenerateResponse,
                  "Tokenize": nora_pb2.TokenizeResponse,
                  "LoadAdapter": nora_pb2.LoadAdapterResponse,
                  "UnloadAdapter": nora_pb2.UnloadAdapterResponse,
                  "ListAdapters": nora_pb2.ListAdaptersResponse,
                  "ModelInfo": nora_pb2.ModelInfoResponse}

FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-300, 1e-45, 1e-39, 1e30,
          1e300, 3.5, -0.0, 2.0]
INTS = [-1, 0, 1, 2**31 - 1, -(2**31), 2**62, 10**9]
STRINGS = ["", " ", "x" * 20_000, "\x00", "a\nb", "sha256:" + "0" * 64, "../../etc/passwd",
           "/etc/passwd", "é" * 300, "\u202e", "demo", "a", "fifo.safetensors",
           "nested/../a.safetensors", "a.safetensors"]


class Fuzzer:
    """Makes malformed requests: (method, request bytes)."""

    def __init__(self, rng: random.Random, good_adapter: bytes, vocab: int) -> None:
        self.rng, self.good_adapter, self.vocab = rng, good_adapter, vocab

    def request(self) -> tuple[str, bytes]:
        r = self.rng
        kind = r.choice(("raw", "flip", "generate", "generate", "generate", "adapter",
                         "tokenize", "load", "load", "unload"))
        if kind == "raw":  # random bytes, any method
            return r.choice(list(REQUEST_TYPES)), r.randbytes(r.choice((1, 7, 64, 1000)))
        if kind == "flip":  # a valid request with flipped bytes (often invalid UTF-8 or tags)
            data = bytearray(self.generate().SerializeToString())
            for _ in range(r.randint(1, 4)):
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            return r.choice(("Generate", "GenerateStream")), bytes(data)
        if kind in ("generate", "adapter"):
            req = self.generate()
            if kind == "adapter":
                req.adapter_bytes = self.bad_adapter()
            return r.choice(("Generate", "GenerateStream")), req.SerializeToString()
        if kind == "tokenize":
            req = nora_pb2.TokenizeRequest(text=r.choice(STRINGS + ["x" * (3 << 20)]))
            if r.random() < 0.3:
                req.messages.add(role=r.choice(("user", "robot", "", "x" * 5000)),
                                 content=r.choice(STRINGS))
            return "Tokenize", req.SerializeToString()
        if kind == "load":
            req = nora_pb2.LoadAdapterRequest(adapter_id=r.choice(STRINGS))
            if r.random() < 0.5:
                req.path = r.choice(STRINGS)
            else:
                req.data = self.bad_adapter()
            return "LoadAdapter", req.SerializeToString()
        return "UnloadAdapter", nora_pb2.UnloadAdapterRequest(
            adapter_id=r.choice(STRINGS)).SerializeToString()

    def generate(self) -> nora_pb2.GenerateRequest:
        """A GenerateRequest with one to three bad (or odd) fields."""
        r = self.rng
        req = nora_pb2.GenerateRequest(prompt="Hello")
        req.stopping.max_new_tokens = 4
        for _ in range(r.randint(1, 3)):
            field = r.choice(("temperature", "top_p", "top_k", "repetition_penalty", "seed",
                              "max_new_tokens", "stop", "stop_token_ids", "time_limit",
                              "token_ids", "prompt", "messages", "request_id", "adapter_id",
                              "two_inputs", "empty"))
            if field in ("temperature", "top_p", "repetition_penalty"):
                setattr(req.sampling, field, r.choice(FLOATS))
            elif field in ("top_k", "seed", "max_new_tokens"):
                target = req.stopping if field == "max_new_tokens" else req.sampling
                limit = 2**64 - 1 if field == "seed" else 2**32 - 1  # uint64 / uint32
                setattr(target, field, min(abs(r.choice(INTS)), limit))
            elif field == "stop":
                req.stopping.stop.extend(r.choice(STRINGS) for _ in range(r.choice((1, 5, 100))))
            elif field == "stop_token_ids":
                req.stopping.stop_token_ids.extend(
                    min(abs(r.choice(INTS + [self.vocab])), 2**32 - 1) for _ in range(3))
            elif field == "time_limit":
                req.stopping.time_limit_seconds = r.choice(FLOATS)
            elif field == "token_ids":
                req.token_ids.ids.extend(r.choice((self.vocab, self.vocab + 1, 2**32 - 1, 5))
                                         for _ in range(r.randint(1, 4)))
            elif field == "prompt":
                req.prompt = r.choice(STRINGS + ["Hello " * 200_000])
            elif field == "messages":
                req.ClearField("input")
                req.messages.add(role=r.choice(("user", "system", "tool", "")),
                                 content=r.choice(STRINGS))
            elif field == "request_id":
                req.request_id = r.choice(STRINGS)
            elif field == "adapter_id":
                req.adapter_id = r.choice(STRINGS)
            elif field == "two_inputs":
                req.messages.add(role="user", content="hi")
            else:
                req.ClearField("input")
        return req

    def bad_adapter(self) -> bytes:
        r, data = self.rng, self.good_adapter
        choice = r.randrange(6)
        if choice == 0:
            return data[: r.randrange(len(data))]  # truncated
        if choice == 1:
            flipped = bytearray(data)
            flipped[r.randrange(len(flipped))] ^= 0xFF
            return bytes(flipped)
        if choice == 2:  # a header of deeply nested JSON
            header = b"[" * 100_000 + b"]" * 100_000
            return len(header).to_bytes(8, "little") + header
        if choice == 3:  # a header size beyond the data
            return (2**62).to_bytes(8, "little") + b"{}"
        if choice == 4:
            return r.randbytes(r.randint(0, 100))
        return data  # valid: loads (an inline adapter), the request may still be bad


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    engine = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", max_adapters=8,
                                 max_num_seqs=16), adapter_store=store).start()
    save_adapter(random_adapter(engine.info, 1), store / "a.safetensors",
                 base_fingerprint=engine.info.fingerprint)
    engine.load_adapter("good", "a.safetensors")  # an id the fuzzer never names
    os.mkfifo(store / "fifo.safetensors")  # a named pipe: LoadAdapter must not hang on it
    s = ServerThread(engine, max_total_tokens=256)
    yield s, engine
    s.close()
    engine.shutdown()


def call(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    """Send raw request bytes; the status code (reading a stream to its end)."""
    parse = RESPONSE_TYPES[method].FromString
    try:
        if method == "GenerateStream":
            for _ in channel.unary_stream(SERVICE + method, response_deserializer=parse)(
                    data, timeout=DEADLINE):
                pass
        else:
            channel.unary_unary(SERVICE + method, response_deserializer=parse)(
                data, timeout=DEADLINE)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_malformed_requests_get_clear_errors_and_good_traffic_is_untouched(server):
    served, engine = server
    good_adapter = adapter_to_bytes(random_adapter(engine.info, 9),
                                    base_fingerprint=engine.info.fingerprint)
    good = [nora_pb2.GenerateRequest(prompt=p, adapter_id=a, sampling={"temperature": 0},
                                      stopping={"max_new_tokens": 8, "ignore_eos": True})
            for p, a in (("Hello", ""), ("nora", "good"), ("the cat", "good"))]
    with grpc.insecure_channel(served.target) as ch:
        expected = [nora_pb2.GenerateResponse.FromString(
            ch.unary_unary(SERVICE + "Generate")(g.SerializeToString(), timeout=60)).text
            for g in good]

    statuses: collections.Counter[tuple[str, str]] = collections.Counter()
    lost: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def fuzz(worker: int) -> None:
        fuzzer = Fuzzer(random.Random(SEED + worker), good_adapter, engine.info.vocab_size)
        with grpc.insecure_channel(served.target) as ch:
            for _ in range(N_MALFORMED // THREADS):
                method, data = fuzzer.request()
                code = call(ch, method, data)
                with lock:
                    statuses[method, code.name] += 1

    def good_traffic() -> None:
        with grpc.insecure_channel(served.target) as ch:
            i = 0
            while not stop.is_set():
                g, want = good[i % len(good)], expected[i % len(good)]
                try:
                    out = nora_pb2.GenerateResponse.FromString(
                        ch.unary_unary(SERVICE + "Generate")(g.SerializeToString(), timeout=60))
                    if out.text != want:
                        lost.append(f"{g.prompt!r}: {out.text!r} != {want!r}")
                except grpc.RpcError as e:
                    lost.append(f"{g.prompt!r}: {e.code().name} {e.details()}")
                i += 1
            statuses["good", "sent"] += i

    workers = [threading.Thread(target=fuzz, args=(w,)) for w in range(THREADS)]
    goods = [threading.Thread(target=good_traffic) for _ in range(2)]
    for t in workers + goods:
        t.start()
    for t in workers:
        t.join(300)
    stop.set()
    for t in goods:
        t.join(120)
    assert not any(t.is_alive() for t in workers + goods), "a request hung"

    report = sorted(statuses.items())
    print("\n".join(f"{m:14s} {c:20s} {n}" for (m, c), n in report))
    tried = sum(n for (m, c), n in statuses.items() if m != "good")
    assert tried >= 500
    unclear = {k: n for k, n in statuses.items() if k[0] != "good" and grpc.StatusCode[k[1]]
               not in CLEAR}
    assert not unclear, unclear
    assert statuses["good", "sent"] > 0 and not lost, lost[:5]
    # the server still serves, and every adapter slot came back
    with grpc.insecure_channel(served.target) as ch:
        out = nora_pb2.GenerateResponse.FromString(
            ch.unary_unary(SERVICE + "Generate")(good[1].SerializeToString(), timeout=60))
    assert out.text == expected[1]
    served.wait_idle()
    assert all(a.in_use == 0 for a in engine.list_adapters())


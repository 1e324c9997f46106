"""The OpenAI-compatible HTTP API end to end: real NoraServers on 127.0.0.1 (test_server.py's
ServerThread: gRPC and HTTP on free ports, one engine of the tiny model, which has a chat
template), called with the official `openai` SDK; answers compared with gRPC's for the same
request. Covers models, chat and completions (unary and streamed), adapters as models, n with
seeds, usage, logprobs, error statuses and shapes, auth, quotas, health and readiness.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from test_server import ServerThread, adapter_bytes, eventually

from nora_runtime.adapter import adapter_to_bytes
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.tiny import random_adapter, tiny_checkpoint
from nora_server.app import ListenError, NoraServer
from nora_server.config import ServerConfig

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is nora?"}]
GREEDY = dict(temperature=0, max_tokens=10)
TOKEN = "t" * 20


@pytest.fixture(scope="module")
def engine():
    # replace mode: a random adapter visibly changes the tiny model's answers
    e = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                            max_adapters=8, max_num_seqs=16, kv_cache_tokens_cpu=8192)).start()
    for name, seed in (("a", 1), ("b", 2)):
        e.load_adapter(name, adapter_to_bytes(random_adapter(e.info, seed),
                                              base_fingerprint=e.info.fingerprint))
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def served(engine):
    s = ServerThread(engine)
    yield s
    s.close()


def sdk(server: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1",
                         api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def api(served) -> openai.OpenAI:
    return sdk(served)


def get(server: ServerThread, path: str) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{server.server.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def grpc_text(server: ServerThread, **request) -> str:
    with server.client() as nora:
        return nora.generate(**request).text


def test_models_are_the_base_and_named_adapters(served, api, engine):
    base = engine.info.name
    with served.client() as nora:  # an inline adapter is resident now: never a model
        nora.generate("Hi", adapter_bytes=adapter_bytes(engine, 9), max_new_tokens=1)
    models = {m.id: m for m in api.models.list()}
    assert set(models) == {base, "a", "b"}
    assert models[base].parent is None and models["a"].parent == base
    assert models["b"].owned_by == "nora" and models["b"].object == "model"
    assert api.models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("nope")


def test_chat_unary_and_streamed_give_the_same_text_as_grpc(served, api, engine):
    base = engine.info.name
    unary = api.chat.completions.create(model=base, messages=CHAT, **GREEDY)
    text = unary.choices[0].message.content
    assert unary.object == "chat.completion" and unary.choices[0].message.role == "assistant"
    assert text and unary.choices[0].finish_reason in ("stop", "length")
    chunks = list(api.chat.completions.create(model=base, messages=CHAT, stream=True, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    assert grpc_text(served, messages=CHAT, temperature=0, max_new_tokens=10) == text


def test_stream_ends_with_done_and_usage_chunk(served, engine):
    """The raw event stream: OpenAI's chunks, then `data: [DONE]`; with include_usage, a last
    chunk with no choices and the usage (the others have usage null)."""
    body = json.dumps({"model": engine.info.name, "messages": CHAT, "stream": True,
                       "stream_options": {"include_usage": True}, **GREEDY}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.server.http_port}/v1/chat/completions", data=body,
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completions_text_and_token_ids(served, api, engine):
    base = engine.info.name
    out = api.completions.create(model=base, prompt="Once upon a time", **GREEDY)
    text = out.choices[0].text
    assert out.object == "text_completion" and text
    assert text == grpc_text(served, prompt="Once upon a time", temperature=0,
                             max_new_tokens=10)
    streamed = list(api.completions.create(model=base, prompt="Once upon a time", stream=True,
                                           **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == text
    with served.client() as nora:
        ids = nora.tokenize("Once upon a time")
    assert api.completions.create(model=base, prompt=ids, **GREEDY).choices[0].text == text
    two = api.completions.create(model=base, prompt=["Once upon a time", "Hello"], **GREEDY)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text


def logprobs_of(out) -> list[float]:
    return [t.logprob for t in out.choices[0].logprobs.content]


def test_adapter_as_model_answers_as_grpc_with_that_adapter(served, api, engine):
    """Same text and logprobs as gRPC with adapter_id; other logprobs than the base model's
    (the tiny random model's greedy text is often the same for all)."""
    kw = dict(messages=CHAT, logprobs=True, **GREEDY)
    base = logprobs_of(api.chat.completions.create(model=engine.info.name, **kw))
    for name in ("a", "b"):
        out = api.chat.completions.create(model=name, **kw)
        assert out.model == name
        with served.client() as nora:
            reply = nora.generate(messages=CHAT, adapter_id=name, temperature=0,
                                  max_new_tokens=10, logprobs=True)
        assert out.choices[0].message.content == reply.text
        shown = len(logprobs_of(out))
        assert logprobs_of(out) == pytest.approx(list(reply.logprobs)[:shown], abs=1e-5)
        assert logprobs_of(out) != pytest.approx(base[:shown], abs=1e-3)
    completion = api.completions.create(model="a", prompt="Hello", **GREEDY)
    assert completion.choices[0].text == grpc_text(served, prompt="Hello", adapter_id="a",
                                                   temperature=0, max_new_tokens=10)


def test_unknown_model_is_not_found(api, engine):
    for model in ("nope", "sha256:" + "0" * 64, "x" * 500):
        with pytest.raises(openai.NotFoundError) as info:
            api.chat.completions.create(model=model, messages=CHAT, max_tokens=2)
        error = info.value.response.json()["error"]
        assert error["param"] == "model" and error["code"] == "model_not_found"
        assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_are_400_naming_the_parameter(served, api, engine):
    base = engine.info.name
    too_long = [1] * engine.max_model_len
    with pytest.raises(openai.BadRequestError, match="the prompt has"):
        api.completions.create(model=base, prompt=too_long, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="exceeds the limit"):
        api.completions.create(model=base, prompt="Hi", max_tokens=engine.max_model_len)
    refused = [
        ("logit_bias", dict(logit_bias={"5": 10})),
        ("response_format", dict(response_format={"type": "xml"})),
        ("top_logprobs", dict(top_logprobs=2)),  # without logprobs
        ("temperature", dict(temperature="hot")),
        ("messages", dict(messages=[])),
        ("n", dict(n=0)),
        ("stream_options", dict(stream_options={"include_usage": True})),
    ]
    for param, kw in refused:
        kw = {"messages": CHAT, **kw}
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model=base, max_tokens=2, **kw)
        assert info.value.response.json()["error"]["param"] == param, param
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        api.chat.completions.create(model=base, messages=CHAT, temperature=1e9, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=base, prompt="Hi", logprobs=6, max_tokens=2)
    assert info.value.response.json()["error"]["param"] == "logprobs"
    # neutral values of what the engine lacks are accepted
    ok = api.chat.completions.create(model=base, messages=CHAT, logit_bias={},
                                     response_format={"type": "text"}, **GREEDY)
    assert ok.choices[0].message.content
    status, body = get(served, "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_n_with_a_seed(api, engine):
    kw = dict(model=engine.info.name, messages=CHAT, temperature=1.0, max_tokens=12, seed=7,
              extra_body={"ignore_eos": True})
    two = api.chat.completions.create(n=2, **kw)
    texts = [c.message.content for c in two.choices]
    assert [c.index for c in two.choices] == [0, 1]
    assert texts[0] != texts[1]  # distinct seeds derived from 7
    assert [c.message.content for c in api.chat.completions.create(n=2, **kw).choices] == texts
    assert api.chat.completions.create(**kw).choices[0].message.content == texts[0]
    assert two.usage.completion_tokens == 24
    streamed = list(api.chat.completions.create(n=2, stream=True, **kw))
    for i in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == i) == texts[i]


def test_usage_and_logprobs(served, api, engine):
    with served.client() as nora:
        prompt_ids = nora.tokenize(messages=CHAT)
    out = api.chat.completions.create(model=engine.info.name, messages=CHAT, max_tokens=7,
                                      temperature=0, logprobs=True,
                                      extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == len(prompt_ids) + 7
    content = out.choices[0].logprobs.content
    assert len(content) == 7 and all(t.logprob <= 0 and t.top_logprobs == [] for t in content)
    assert "".join(t.token for t in content) == out.choices[0].message.content
    with served.client() as nora:
        reply = nora.generate(messages=CHAT, temperature=0, max_new_tokens=7, ignore_eos=True,
                              logprobs=True)
    assert [t.logprob for t in content] == pytest.approx(list(reply.logprobs), abs=1e-5)


def test_stop_strings(api, engine):
    full = api.completions.create(model=engine.info.name, prompt="Hello", **GREEDY)
    text = full.choices[0].text
    cut = text[2:4]
    out = api.completions.create(model=engine.info.name, prompt="Hello", stop=cut, **GREEDY)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[:text.index(cut)]


def test_bearer_tokens_and_health(engine):
    server = ServerThread(engine, auth_token=TOKEN, max_message_bytes=4096)
    try:
        with pytest.raises(openai.AuthenticationError):
            sdk(server, "wrong-" + TOKEN).models.list()
        with pytest.raises(openai.AuthenticationError):
            sdk(server, "wrong-" + TOKEN).chat.completions.create(
                model=engine.info.name, messages=CHAT, max_tokens=2)
        api = sdk(server, TOKEN)
        assert {m.id for m in api.models.list()} >= {"a", "b"}
        assert api.chat.completions.create(model="a", messages=CHAT, max_tokens=2).choices
        assert get(server, "/health") == (200, {"status": "serving"})  # probes need no token
        with pytest.raises(openai.APIStatusError) as info:  # over --max-message-bytes
            api.completions.create(model="a", prompt="x" * 5000, max_tokens=2)
        assert info.value.status_code == 413
    finally:
        server.close()


def test_health_before_the_model_and_while_draining(engine):
    server = ServerThread(None)
    try:
        assert get(server, "/health") == (503, {"status": "loading"})
        assert get(server, "/ready")[0] == 503
        with pytest.raises(openai.APIStatusError) as info:
            sdk(server).chat.completions.create(model="m", messages=CHAT, max_tokens=2)
        assert info.value.status_code == 503
        server.call(server.server.attach(engine))
        assert get(server, "/health") == (200, {"status": "serving"})
        assert get(server, "/ready") == (200, {"status": "ready"})
        server.server.service.accepting = False  # as stop() does first
        assert get(server, "/health") == (503, {"status": "draining"})
    finally:
        server.close()


def test_busy_is_429_and_a_disconnect_aborts_the_request(engine):
    server = ServerThread(engine, max_concurrent_requests=1)
    try:
        api = sdk(server)
        long = api.chat.completions.create(model=engine.info.name, messages=CHAT, stream=True,
                                           max_tokens=3000, extra_body={"ignore_eos": True})
        next(iter(long))
        with pytest.raises(openai.RateLimitError):
            api.chat.completions.create(model=engine.info.name, messages=CHAT, max_tokens=2)
        assert get(server, "/ready") == (503, {"status": "busy"})
        long.close()  # the client goes: the engine request is aborted, the seat freed
        eventually(lambda: server.server.service.in_flight == 0, 30)
        server.wait_idle()
        assert api.chat.completions.create(model=engine.info.name, messages=CHAT,
                                           max_tokens=2).choices
    finally:
        server.close()


def test_stop_drains_http_requests_in_flight(engine):
    """stop(grace) lets a running HTTP request finish, as gRPC's do."""
    server = ServerThread(engine)
    api = sdk(server)
    result = {}

    def call():
        result["out"] = api.completions.create(model=engine.info.name, prompt="Hi",
                                               max_tokens=40, temperature=0,
                                               extra_body={"ignore_eos": True})

    thread = threading.Thread(target=call)
    thread.start()
    eventually(lambda: server.server.service.in_flight == 1, 30)
    start = time.monotonic()
    server.call(server.server.stop(30))
    thread.join(30)
    assert result["out"].usage.completion_tokens == 40
    assert time.monotonic() - start < 30
    server.loop.call_soon_threadsafe(server.loop.stop)
    server.thread.join(10)


def test_http_port_in_use_is_a_listen_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = NoraServer(ServerConfig(port=0, metrics_port=None, http_port=busy))
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{busy} \\(HTTP\\)"):
            asyncio.run(server.start())


def test_server_starts_without_the_http_packages():
    """As with health checking and reflection: without uvicorn (the H200 image has none), gRPC
    serves and the log says that the HTTP API is off."""
    script = (
        "import asyncio, logging, sys\n"
        "sys.modules['uvicorn'] = None\n"
        "logging.basicConfig(level='INFO')\n"
        "from nora_server.app import NoraServer\n"
        "from nora_server.config import ServerConfig\n"
        "async def main():\n"
        "    server = NoraServer(ServerConfig(port=0, metrics_port=None, http_port=0))\n"
        "    await server.start()\n"
        "    print('started', server.port > 0, server.http_port, flush=True)\n"
        "    await server.stop(0)\n"
        "asyncio.run(main())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "started True None" in out.stdout
    assert "the OpenAI-compatible HTTP API is off: uvicorn is not installed" in out.stderr


def test_tenant_quota_counts_every_choice(engine, tmp_path):
    """Tenants and quotas as on gRPC: with two tenants and 8 seats, each tenant may have 4
    engine requests in flight; one request with n = 4 takes all of its tenant's."""
    acme, globex = "a" * 20, "g" * 20
    path = tmp_path / "tokens.txt"
    path.write_text(f"{acme} acme user\n{globex} globex user\n")
    server = ServerThread(engine, tokens_file=str(path), max_concurrent_requests=8)
    try:
        kw = dict(model=engine.info.name, messages=CHAT)
        held = sdk(server, acme).chat.completions.create(
            n=4, stream=True, max_tokens=3000, extra_body={"ignore_eos": True}, **kw)
        next(iter(held))
        with pytest.raises(openai.RateLimitError, match="tenant quota"):
            sdk(server, acme).chat.completions.create(max_tokens=2, **kw)
        assert sdk(server, globex).chat.completions.create(max_tokens=2, **kw).choices
        with pytest.raises(openai.BadRequestError, match="at most 4"):  # can never fit
            sdk(server, globex).chat.completions.create(n=5, max_tokens=2, **kw)
        held.close()
        eventually(lambda: server.server.service.in_flight == 0, 30)
    finally:
        server.close()


def test_http_requests_are_counted(served, api, engine):
    """nora_http_requests_total{path, status}, with bounded paths; generations through HTTP
    count in the generation metrics as gRPC's do."""
    def count(path, status):
        return served.metric("nora_http_requests_total", path=path, status=status)

    before = (count("/v1/chat/completions", "200"), count("/v1/chat/completions", "404"),
              count("other", "404"), served.metric("nora_generate_requests_total",
                                                    finish_reason="length"))
    api.chat.completions.create(model=engine.info.name, messages=CHAT, max_tokens=3,
                                extra_body={"ignore_eos": True})
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    get(served, "/no/such/path")
    after = (count("/v1/chat/completions", "200"), count("/v1/chat/completions", "404"),
             count("other", "404"), served.metric("nora_generate_requests_total",
                                                   finish_reason="length"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1, 1]

"""Metrics and the metrics port end to end: a real NoraServer on 127.0.0.1 serving the tiny test
model on CPU, driven over gRPC and the HTTP API, its metrics port scraped over HTTP. Covers the
request metrics (latencies from arrival, by finish reason; token, prefill and decode
histograms), the engine's (tokens and sequences per step, per-adapter running and waiting
requests, the routers' `nora_lora_requests_info`, adapter load latency), /health on the metrics
port, the Grafana dashboard's queries, and the naming rules `promtool check metrics` applies
(promtool itself too, where it is installed).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import (
    LONG,
    PROMPT,
    SHORT,
    ServerThread,
    adapter_bytes,
    code_of,
    eventually,
    stream,
)

import nora_server
from nora_runtime.adapter import save_adapter
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.histogram import Histogram, powers_of_two
from nora_runtime.tiny import random_adapter, tiny_checkpoint

DASHBOARD = Path(nora_server.__file__).parent / "grafana" / "nora.json"
NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def engine(store):
    """One running seat (so a second request waits) and 4 adapter slots (so named adapters get
    evicted and reloaded from the store)."""
    engine = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                                 max_adapters=4, max_num_seqs=1),
                    adapter_store=store)
    engine.start()
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)):
        save_adapter(random_adapter(engine.info, seed), store / f"{name}.safetensors",
                     base_fingerprint=engine.info.fingerprint)
    engine.load_adapter("a", "a.safetensors")
    yield engine
    engine.shutdown()


def get(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def fetch(server: ServerThread, path: str, token: str | None = None) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.server.metrics_port}{path}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def complete(server: ServerThread, **body) -> dict:
    """POST /v1/completions on the HTTP API."""
    url = f"http://127.0.0.1:{server.server.http_port}/v1/completions"
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def mixed_traffic(s: ServerThread, engine: Engine, token: str | None = None) -> None:
    """Generations of every kind (base, named, inline, streamed, HTTP, cancelled, time limit,
    refused), adapter loads and unloads, an eviction and a reload from the store."""
    with s.client(token=token) as nora:
        for name in "bcde":
            nora.load_adapter(name, path=f"{name}.safetensors")
        for name in "abcde":  # 5 named adapters, 4 slots: at least one is reloaded from the
            nora.generate(PROMPT, adapter_id=name, max_new_tokens=2)  # store (and one evicted)
        for name in "de":  # slots for inline adapters (which never evict named ones)
            nora.unload_adapter(name)
        nora.generate(PROMPT, adapter_bytes=adapter_bytes(engine, 50), **SHORT)
        nora.generate(PROMPT, **SHORT)
        stream(nora, adapter_id="b", **SHORT)
        nora.generate(PROMPT, time_limit=0.2, **LONG)
        call = nora.generate_stream(PROMPT, **LONG)
        next(call)
        call.cancel()
        code_of(nora.generate, PROMPT, adapter_id="nope")
        nora.model_info()
    if s.server.http_port is not None and token is None:
        complete(s, model="c", prompt=PROMPT, max_tokens=4)
    s.wait_idle()


# ---- the engine's histogram ----------------------------------------------------------------


def test_histogram_buckets_are_inclusive_and_cumulative():
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 1.5, 4, 5):
        h.observe(v)
    snap = h.snapshot()
    assert snap.bounds == (1.0, 2.0, 4.0) and snap.counts == (2, 3, 4, 5)
    assert snap.count == 5 and snap.sum == 12.0
    assert powers_of_two(5) == (1, 2, 4, 8) and powers_of_two(1) == (1,)
    with pytest.raises(ValueError):
        Histogram((2, 1))


# ---- request metrics -----------------------------------------------------------------------


def test_metrics_match_the_traffic(engine):
    s = ServerThread(engine, metrics_adapter_labels=1)
    try:
        with s.client() as nora:
            before = s.metrics()
            nora.load_adapter("a", path="a.safetensors")  # claims the one adapter label
            nora.load_adapter("b", path="b.safetensors")  # too late for a label of its own
            replies = [nora.generate(PROMPT, adapter_id="a", **SHORT),
                       nora.generate(PROMPT, adapter_id="b", **SHORT),
                       nora.generate(PROMPT, **SHORT),
                       nora.generate(PROMPT, adapter_bytes=adapter_bytes(engine, 40), **SHORT),
                       stream(nora, adapter_id="a", **SHORT)[2][-1]]
            code_of(nora.generate, PROMPT, adapter_id="nope")
            listed = nora.list_adapters()
        s.wait_idle()
        m = s.metrics()
    finally:
        s.close()

    n, k = len(replies), SHORT["max_new_tokens"]
    prompt_tokens = sum(r.usage.prompt_tokens for r in replies)
    assert get(m, "nora_rpc_requests_total", method="Generate", code="OK") == n - 1
    assert get(m, "nora_rpc_requests_total", method="GenerateStream", code="OK") == 1
    assert get(m, "nora_rpc_requests_total", method="Generate", code="NOT_FOUND") == 1
    assert get(m, "nora_rpc_requests_total", method="LoadAdapter", code="OK") == 2
    assert get(m, "nora_generate_requests_total", finish_reason="length") == n
    assert get(m, "nora_generate_requests_total", finish_reason="eos") == 0
    assert get(m, "nora_generated_tokens_total") == n * k
    assert get(m, "nora_prompt_tokens_total") == prompt_tokens
    assert get(m, "nora_time_to_first_token_seconds_count") == n
    assert get(m, "nora_inter_token_latency_seconds_count") == n * (k - 1)
    assert get(m, "nora_e2e_request_latency_seconds_count", finish_reason="length") == n
    assert not any(name == "nora_e2e_request_latency_seconds_count"
                   and dict(labels)["finish_reason"] != "length" for name, labels in m)
    assert get(m, "nora_request_queue_seconds_count") == n
    e2e = get(m, "nora_e2e_request_latency_seconds_sum", finish_reason="length")
    ttft = get(m, "nora_time_to_first_token_seconds_sum")
    assert 0 < ttft < e2e
    # per-request histograms
    assert get(m, "nora_request_prompt_tokens_count") == n
    assert get(m, "nora_request_prompt_tokens_sum") == prompt_tokens
    assert get(m, "nora_request_generated_tokens_count") == n
    assert get(m, "nora_request_generated_tokens_sum") == n * k
    assert get(m, "nora_request_generated_tokens_bucket", le="10.0") == 0
    assert get(m, "nora_request_generated_tokens_bucket", le="20.0") == n
    assert get(m, "nora_request_prefill_seconds_count") == n
    assert get(m, "nora_request_decode_seconds_count") == n
    prefill = get(m, "nora_request_prefill_seconds_sum")
    decode = get(m, "nora_request_decode_seconds_sum")
    assert 0 < prefill <= ttft and 0 < decode < e2e
    # bounded adapter labels: "a" has the one named label, "b" is "other"
    assert get(m, "nora_adapter_requests_total", adapter="a") == 2
    assert get(m, "nora_adapter_requests_total", adapter="other") == 1
    assert get(m, "nora_adapter_requests_total", adapter="base") == 1
    assert get(m, "nora_adapter_requests_total", adapter="inline") == 1
    assert get(m, "nora_adapter_generated_tokens_total", adapter="a") == 2 * k
    assert not any(dict(labels).get("adapter") == "b" for name, labels in m)
    assert {dict(labels)["adapter"] for name, labels in m
            if name == "nora_adapter_requests_running"} == {"a", "base", "inline", "other"}
    # engine state: the steps' histograms count every step (the engine is this test's alone)
    steps = get(m, "nora_engine_steps_total") - get(before, "nora_engine_steps_total")
    assert steps >= n * k
    for name in ("nora_engine_step_tokens", "nora_engine_step_sequences"):
        assert (get(m, name + "_count") - get(before, name + "_count")) == steps
        assert get(m, name + "_bucket", le="+Inf") == get(m, name + "_count")
    # one seat: every step computes one sequence; prefills add the prompts' tokens
    assert get(m, "nora_engine_step_sequences_sum") == get(m, "nora_engine_step_sequences_count")
    new_tokens = (get(m, "nora_engine_step_tokens_sum")
                  - get(before, "nora_engine_step_tokens_sum"))
    assert new_tokens == prompt_tokens + n * (k - 1)
    # LoadAdapter, by bytes: latency counted
    loads = (get(m, "nora_adapter_load_seconds_count", source="load")
             - get(before, "nora_adapter_load_seconds_count", source="load"))
    assert loads == 2
    assert get(m, "nora_adapter_load_seconds_count", source="inline") >= 1
    assert get(m, "nora_requests_running") == get(m, "nora_requests_waiting") == 0
    assert get(m, "nora_adapter_slots_capacity") == listed.slots_total == 4
    assert get(m, "nora_adapter_slots_used") == listed.slots_used
    assert 0 <= get(m, "nora_kv_cache_usage_ratio") <= 1 and get(m, "nora_batch_size") == 1


def test_latencies_count_from_arrival_on_both_edges(engine):
    """Time to first token, queue time and end-to-end latency start when the RPC or HTTP
    request arrives, before tokenizing and adapter loading (here made to take DELAY): they
    used to start at engine submit, hiding that time. Prefill time does not include it."""
    delay = 0.4
    s = ServerThread(engine)
    service = s.server.service
    tokenize = service.input_ids

    async def slow_input_ids(*args, **kw):
        await asyncio.sleep(delay)
        return await tokenize(*args, **kw)

    service.input_ids = slow_input_ids  # both edges tokenize through the service
    try:
        with s.client() as nora:
            nora.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
        complete(s, model=engine.info.name, prompt=PROMPT, max_tokens=2)
        s.wait_idle()
        m = s.metrics()
    finally:
        s.close()
    assert get(m, "nora_time_to_first_token_seconds_count") == 2
    assert get(m, "nora_time_to_first_token_seconds_sum") >= 2 * delay
    assert get(m, "nora_request_queue_seconds_sum") >= 2 * delay
    assert get(m, "nora_e2e_request_latency_seconds_sum", finish_reason="length") >= 2 * delay
    assert get(m, "nora_time_to_first_token_seconds_bucket", le="0.25") == 0
    assert get(m, "nora_request_prefill_seconds_sum") < delay


def test_end_to_end_latency_by_finish_reason(engine):
    """Cancelled and timed-out requests have their own `finish_reason` series, so that they do
    not pull the latency of completed ones."""
    s = ServerThread(engine)
    try:
        with s.client() as nora:
            nora.generate(PROMPT, **SHORT)
            nora.generate(PROMPT, time_limit=0.2, **LONG)
            call = nora.generate_stream(PROMPT, **LONG)
            next(call)
            call.cancel()
        eventually(lambda: s.metric("nora_e2e_request_latency_seconds_count",
                                    finish_reason="cancelled") == 1)
        s.wait_idle()
        m = s.metrics()
    finally:
        s.close()
    for reason in ("length", "time_limit", "cancelled"):
        assert get(m, "nora_e2e_request_latency_seconds_count", finish_reason=reason) == 1
        assert get(m, "nora_generate_requests_total", finish_reason=reason) == 1
    assert get(m, "nora_e2e_request_latency_seconds_sum", finish_reason="time_limit") >= 0.2
    assert get(m, "nora_request_generated_tokens_count") == 3
    assert get(m, "nora_request_decode_seconds_count") == 3  # each had its first token


# ---- engine metrics: adapters ---------------------------------------------------------------


def test_per_adapter_running_and_waiting_and_lora_requests_info(engine):
    """One seat: a request of adapter "a" runs, one of "b", one inline and one of the base
    wait. The bounded per-adapter gauges and the routers' info gauge (named ids only, the slot
    count as max_lora, the scrape time as value) say so; all back to 0 once they end."""
    s = ServerThread(engine)
    try:
        with s.client() as nora:
            nora.load_adapter("b", path="b.safetensors")
            running = nora.generate_stream(PROMPT, adapter_id="a", **LONG)
            next(running)
            waiting = [nora.generate_stream(PROMPT, adapter_id="b", **LONG),
                       nora.generate_stream(PROMPT, adapter_bytes=adapter_bytes(engine, 60),
                                            **LONG),
                       nora.generate_stream(PROMPT, **LONG)]
            eventually(lambda: s.metric("nora_requests_waiting") == 3)
            text = s.scrape()
            for call in [running, *waiting]:
                call.cancel()
        s.wait_idle()
        idle = s.metrics()
    finally:
        s.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def gauge(name):
        return {x.labels["adapter"]: x.value for x in families[name].samples}

    assert gauge("nora_adapter_requests_running") == {"a": 1, "b": 0, "base": 0, "inline": 0,
                                                      "other": 0}
    assert gauge("nora_adapter_requests_waiting") == {"a": 0, "b": 1, "base": 1, "inline": 1,
                                                      "other": 0}
    [info] = families["nora_lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "a", "waiting_lora_adapters": "b",
                           "max_lora": "4"}
    assert abs(info.value - time.time()) < 60
    assert not any(v for (name, _), v in idle.items()
                   if name in ("nora_adapter_requests_running", "nora_adapter_requests_waiting"))
    [(labels, _)] = [(dict(k), v) for (name, k), v in idle.items()
                     if name == "nora_lora_requests_info"]
    assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""


def test_scrapes_during_traffic_always_succeed(engine):
    """Scrapes copy the engine's running and waiting queues from the metrics thread while the
    loop thread changes them: many scrapes during a stream of short requests (one seat, so the
    waiting queue moves every few steps) all parse, with consistent counts."""
    s = ServerThread(engine)
    errors: list[Exception] = []

    async def traffic():
        from nora_client import AsyncNoraClient

        async with AsyncNoraClient(s.target, timeout=120) as nora:
            await asyncio.gather(*[nora.generate(PROMPT, adapter_id="a" if i % 2 else None,
                                                 max_new_tokens=3, ignore_eos=True)
                                   for i in range(24)])

    try:
        done = asyncio.run_coroutine_threadsafe(traffic(), s.loop)
        scrapes = 0
        while not done.done() or scrapes < 5:
            try:
                m = s.metrics()
                running = sum(v for (name, _), v in m.items()
                              if name == "nora_adapter_requests_running")
                assert running <= 1 and running + sum(
                    v for (name, _), v in m.items() if name == "nora_adapter_requests_waiting"
                ) <= 24
            except Exception as exc:  # reported below
                errors.append(exc)
                break
            scrapes += 1
        done.result(120)
    finally:
        s.close()
    assert not errors, errors
    assert scrapes >= 5


def test_adapter_load_latency_by_source(engine):
    """LoadAdapter, a named adapter reloaded from the store after its eviction, and inline
    bytes each count in `nora_adapter_load_seconds{source}`."""
    s = ServerThread(engine)
    try:
        before = s.metrics()
        mixed_traffic(s, engine)
        m = s.metrics()
    finally:
        s.close()

    def added(source):
        return (get(m, "nora_adapter_load_seconds_count", source=source)
                - get(before, "nora_adapter_load_seconds_count", source=source))

    assert added("load") == 4 and added("reload") >= 1 and added("inline") >= 1
    assert get(m, "nora_adapter_reloads_total") >= 1
    assert get(m, "nora_adapter_evictions_total") >= 1
    assert get(m, "nora_adapter_load_seconds_sum", source="load") > 0


# ---- the metrics port ----------------------------------------------------------------------


def test_metrics_port_health_and_paths(engine):
    """The metrics port answered 200 on any path, even while the model loaded. Now: /metrics,
    /health (200 only while serving; no token needed) and 404 elsewhere."""
    s = ServerThread(None, auth_token="secret-token-0123456789")
    try:
        assert fetch(s, "/health") == (503, '{"status": "loading"}')
        status, text = fetch(s, "/metrics", "secret-token-0123456789")
        assert status == 200 and "process_cpu_seconds_total" in text  # scrapes while loading
        assert "nora_requests_running" not in text  # no engine state yet
        assert fetch(s, "/metrics")[0] == 401
        assert fetch(s, "/")[0] == 404 and fetch(s, "/metricsx")[0] == 404
        assert fetch(s, "/health/x")[0] == 404
        s.call(s.server.attach(engine))
        assert fetch(s, "/health") == (200, '{"status": "serving"}')
        assert "nora_requests_running" in fetch(s, "/metrics", "secret-token-0123456789")[1]
        s.server.service.accepting = False  # as stop() does first
        assert fetch(s, "/health") == (503, '{"status": "draining"}')
        request = urllib.request.Request(
            f"http://127.0.0.1:{s.server.metrics_port}/health", b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405
    finally:
        s.server.service.accepting = True
        s.close()


# ---- names: the dashboard, promtool --------------------------------------------------------


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_grafana_dashboard_queries_served_metrics(engine):
    """Every metric name in every dashboard query (panels and variables) is a sample name a
    real server serves after mixed traffic (names drift otherwise)."""
    exprs = dashboard_queries()
    queried = {name for e in exprs for name in re.findall(r"\b(?:nora|process|python)_\w+", e)}
    s = ServerThread(engine)
    try:
        mixed_traffic(s, engine)
        served = {name for name, _ in s.metrics()}
    finally:
        s.close()
    assert len(exprs) >= 20 and queried <= served, sorted(queried - served)
    # and the new metrics are on the dashboard
    for name in ("nora_adapter_requests_running", "nora_lora_requests_info",
                 "nora_engine_step_tokens_bucket", "nora_request_prefill_seconds_bucket",
                 "nora_request_decode_seconds_bucket", "nora_adapter_load_seconds_bucket",
                 "nora_request_prompt_tokens_bucket", "nora_request_generated_tokens_bucket"):
        assert name in queried, name


def test_grafana_dashboard_queries_parse(tmp_path):
    """Every dashboard query is valid PromQL (Grafana's variables given values): promtool
    checks them as recording rules. Skipped without promtool."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    values = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(e for e in dashboard_queries() if not e.startswith("label_values")):
        for var, value in values.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"nora:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # YAML
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metrics_follow_promtool_naming_rules(engine):
    """A scrape after mixed traffic (auth on, so /metrics takes a token) keeps the naming rules
    `promtool check metrics` applies: counters' samples end in `_total`, nothing else does,
    histograms have `_bucket` (with +Inf) / `_sum` / `_count`, every family has help, names and
    labels are snake_case, no family repeats; and no `_created` series, process metrics present,
    `nora_model_info` set."""
    s = ServerThread(engine, auth_token="secret-token-0123456789")
    try:
        mixed_traffic(s, engine, token="secret-token-0123456789")
        text = s.scrape("secret-token-0123456789")
    finally:
        s.close()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    assert {"nora_adapter_slots_capacity", "process_cpu_seconds", "nora_lora_requests_info",
            "process_resident_memory_bytes", "python_gc_objects_collected"} <= set(names)
    for f in families:
        samples = {x.name for x in f.samples}
        assert f.documentation.strip(), f.name
        assert NAME.match(f.name) and f.name == f.name.lower(), f.name  # no camelCase
        assert not any(n.endswith("_created") for n in samples), f.name
        for x in f.samples:
            assert all(NAME.match(k) and k == k.lower() for k in x.labels), (f.name, x.labels)
        if f.type == "counter":
            assert all(n.endswith("_total") for n in samples), (f.name, samples)
        else:
            assert not f.name.endswith("_total"), f.name
            assert not any(n.endswith("_total") for n in samples), (f.name, samples)
        if f.type in ("histogram", "summary"):
            suffixes = {n[len(f.name):] for n in samples}
            want = {"_sum", "_count"} | ({"_bucket"} if f.type == "histogram" else set())
            assert want <= suffixes, (f.name, suffixes)
        if f.type == "histogram":
            assert any(x.labels.get("le") == "+Inf" for x in f.samples), f.name
        else:
            assert not any(n.endswith(("_bucket", "_sum", "_count")) for n in samples), f.name
    info = next(f for f in families if f.name == "nora_model_info")
    [sample] = info.samples
    assert sample.value == 1 and sample.labels["model"] == engine.info.name
    assert sample.labels["mode"] == "replace" and sample.labels["version"]
    # and promtool itself (Debian package `prometheus`), where installed
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): naming rules "
                    "checked with prometheus_client's parser only")
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr

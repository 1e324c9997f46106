"""Prometheus metrics of one server, on their own registry (so several servers can share a
process), served over HTTP with a health check (`Metrics.serve`: /metrics and /health).

Names follow Prometheus conventions: the `nora_` prefix, base units (`_seconds`, ratios in
[0, 1]), `_total` on counters. Engine state (running and waiting requests, KV cache usage,
batch size, per-adapter running and waiting requests, tokens per step, adapter slots, load
latency and load/eviction/failure counters) is read from `Engine.stats()` at scrape time;
request-path metrics are recorded by the servicer as requests run, each latency from the
request's arrival (before tokenizing and adapter loading) and once per request event or finish,
never per token in the engine loop. The registry
also carries prometheus_client's process, GC and platform collectors (`process_*`,
`python_gc_*`, `python_info`). No `_created` series: prometheus_client can only turn them off
process-wide (`disable_created_metrics()`, no per-registry switch), so `Metrics()` does that.

Per-adapter label cardinality is bounded (`AdapterLabels`): the first K adapter ids the server
loads or serves (K = ServerConfig.metrics_adapter_labels, default 32) get their own `adapter`
label value, kept for the life of the process so that counters stay monotonic across unloads
and replaces. Every later id counts under "other", inline adapters (content ids "sha256:...")
under "inline" and requests without an adapter under "base": at most K + 3 series per metric.
The one exception is `nora_lora_requests_info`, for routers (vLLM's `lora_requests_info`): a
single series whose labels list the adapter ids (named ones, unbounded) of the running and
waiting requests, replaced at every scrape.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nora_runtime.histogram import HistogramSnapshot
from nora_runtime.registry import INLINE_PREFIX

BASE, INLINE, OTHER = "base", "inline", "other"
FINISH_REASONS = ("length", "eos", "stop", "cancelled", "time_limit", "error")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)
PREFILL_BUCKETS = TTFT_BUCKETS
DECODE_BUCKETS = E2E_BUCKETS
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, 200000)


class AdapterLabels:
    """The `adapter` label value of an adapter id (rule in the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter_id: str | None) -> str:
        if not adapter_id:
            return BASE
        if adapter_id.startswith(INLINE_PREFIX):
            return INLINE
        with self._lock:
            if adapter_id in self._named:
                return adapter_id
            if len(self._named) < self.limit and adapter_id not in (BASE, INLINE, OTHER):
                self._named.add(adapter_id)
                return adapter_id
        return OTHER

    def labels(self) -> list[str]:
        """Every label value handed out so far, and the three fixed ones."""
        with self._lock:
            return [BASE, INLINE, OTHER, *self._named]


class EngineCollector(Collector):
    """Engine state, read once per scrape. `stats` returns an EngineStats or None (no model
    loaded yet: nothing to report); `adapter_label` maps an adapter id to its label."""

    def __init__(self, stats, model=lambda: None,
                 adapter_label: AdapterLabels | None = None) -> None:
        self.stats = stats
        self.model = model  # () -> (model name, mode) or None
        self.adapter_label = adapter_label if adapter_label is not None else AdapterLabels(0)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from nora_server import __version__

        model = self.model()
        if model is not None:
            info = GaugeMetricFamily("nora_model_info", "The served model (always 1)",
                                     labels=["model", "mode", "version"])
            info.add_metric([*model, __version__], 1)
            yield info
        s = self.stats()
        if s is None:
            return
        gauges = [
            ("nora_requests_running", "Requests in the running batch", s.num_running),
            ("nora_requests_waiting", "Requests queued for the engine", s.num_waiting),
            ("nora_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", s.kv_usage),
            ("nora_batch_size", "Sequences in the latest engine step", s.batch_size),
            ("nora_adapter_slots_used", "Adapter slots holding an adapter", s.slots_used),
            ("nora_adapter_slots_capacity", "Adapter slots of the coefficient table",
             s.slots_total),
            ("nora_adapters_registered", "Adapter ids registered (resident in a slot or not)",
             s.adapters_registered),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("nora_engine_steps", "Engine steps (forward passes)", s.steps),
            ("nora_preemptions", "Sequences preempted for KV cache space", s.preemptions),
            ("nora_adapter_loads", "Adapters loaded (including replaces)", s.adapter_loads),
            ("nora_adapter_evictions", "Idle adapters evicted for a slot", s.adapter_evictions),
            ("nora_adapter_inline_evictions", "Of the evictions, those of inline adapters",
             s.adapter_inline_evictions),
            ("nora_adapter_reloads", "Evicted named adapters reloaded from the store on use",
             s.adapter_reloads),
            ("nora_adapter_load_failures", "Adapter loads refused (bad file, path or model)",
             s.adapter_load_failures),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)  # exposed as <name>_total
        yield from self._adapters(s)
        histograms = [
            ("nora_engine_step_tokens", "Tokens computed per engine step (prefill chunks and "
             "decodes)", s.step_tokens),
            ("nora_engine_step_sequences", "Sequences per engine step", s.step_sequences),
        ]
        for name, doc, snap in histograms:
            if snap is not None:
                family = HistogramMetricFamily(name, doc)
                _add(family, [], snap)
                yield family
        loads = HistogramMetricFamily(
            "nora_adapter_load_seconds", "Adapter load latency (read, validate, store, install), "
            "by source: load (LoadAdapter, startup), reload (from the store on use after an "
            "eviction), inline (adapter bytes in a request)", labels=["source"])
        for source, snap in sorted(s.adapter_load_seconds.items()):
            _add(loads, [source], snap)
        yield loads

    def _adapters(self, s) -> Iterator[GaugeMetricFamily]:
        """Running and waiting requests per adapter label, and the router's info gauge."""
        running = GaugeMetricFamily("nora_adapter_requests_running",
                                    "Requests in the running batch, by adapter (bounded)",
                                    labels=["adapter"])
        waiting = GaugeMetricFamily("nora_adapter_requests_waiting",
                                    "Requests queued for the engine, by adapter (bounded)",
                                    labels=["adapter"])
        # every label handed out so far (0 when idle, so a series never vanishes mid-graph)
        by_label = {label: [0, 0] for label in self.adapter_label.labels()}
        for i, counts in enumerate((s.adapters_running, s.adapters_waiting)):
            for adapter_id, n in counts.items():
                by_label.setdefault(self.adapter_label(adapter_id), [0, 0])[i] += n
        for label, (r, w) in sorted(by_label.items()):
            running.add_metric([label], r)
            waiting.add_metric([label], w)
        yield running
        yield waiting
        info = GaugeMetricFamily(
            "nora_lora_requests_info", "Adapter ids (named) of the running and waiting requests, "
            "comma-separated, and the adapter slots (max_lora), for routers as vLLM's "
            "lora_requests_info; the value is the time of the scrape (Unix seconds)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        named = [",".join(sorted(i for i in ids if i and not i.startswith(INLINE_PREFIX)))
                 for ids in (s.adapters_running, s.adapters_waiting)]
        info.add_metric([*named, str(s.slots_total)], time.time())
        yield info


def _add(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    buckets = [(floatToGoString(b), n) for b, n in zip(snap.bounds, snap.counts, strict=False)]
    family.add_metric(labels, [*buckets, ("+Inf", snap.count)], snap.sum)


class Metrics:
    """Every metric of one server."""

    def __init__(self, stats, *, adapter_labels: int, model=lambda: None) -> None:
        disable_created_metrics()  # process-wide (see the module docstring)
        self.registry = r = CollectorRegistry()
        for collector in (ProcessCollector, GCCollector, PlatformCollector):
            collector(registry=r)
        self.adapter_label = AdapterLabels(adapter_labels)
        self.rpcs = Counter("nora_rpc_requests", "RPCs finished, by method and gRPC status code",
                            ["method", "code"], registry=r)
        self.http_requests = Counter(
            "nora_http_requests", "HTTP API requests finished, by path (the API's own, else "
            "'other') and status ('none': the client left before an answer)",
            ["path", "status"], registry=r)
        self.finished = Counter("nora_generate_requests",
                                "Generation requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:  # present (at 0) from the start
            self.finished.labels(reason)
        self.ttft = Histogram("nora_time_to_first_token_seconds",
                              "Arrival of the request (before tokenizing and adapter loading) "
                              "to its first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("nora_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("nora_e2e_request_latency_seconds",
                             "Arrival of a generation request to its end, by finish reason",
                             ["finish_reason"], buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("nora_request_queue_seconds",
                               "Arrival to the first scheduled engine step",
                               buckets=QUEUE_BUCKETS, registry=r)
        self.prefill = Histogram("nora_request_prefill_seconds",
                                 "First scheduled engine step to the first generated token "
                                 "(prefill, chunked or not)", buckets=PREFILL_BUCKETS,
                                 registry=r)
        self.decode = Histogram("nora_request_decode_seconds",
                                "First generated token to the end of the request (decode)",
                                buckets=DECODE_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram(
            "nora_request_prompt_tokens", "Prompt tokens per generation request",
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_generated_tokens = Histogram(
            "nora_request_generated_tokens", "Generated tokens per generation request",
            buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nora_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=r)
        self.generated_tokens = Counter("nora_generated_tokens", "Generated tokens", registry=r)
        self.adapter_requests = Counter("nora_adapter_requests",
                                        "Generation requests admitted, by adapter (bounded)",
                                        ["adapter"], registry=r)
        self.adapter_tokens = Counter("nora_adapter_generated_tokens",
                                      "Generated tokens, by adapter (bounded)", ["adapter"],
                                      registry=r)
        for label in (BASE, INLINE, OTHER):
            self.adapter_requests.labels(label)
            self.adapter_tokens.labels(label)
        r.register(EngineCollector(stats, model, self.adapter_label))
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1", *,
              authorize: Callable[[str | None], bool] | None = None,
              tls: tuple[str, str] | None = None,
              state: Callable[[], str] = lambda: "serving") -> int:
        """Serve over HTTP (HTTPS with `tls`: certificate and key PEM files): GET /metrics, and
        GET /health, 200 {"status": "serving"} while `state()` says "serving", else 503 with
        the state (loading, draining, stopped); any other path 404. Returns the bound port
        (`port` 0: any free one). With `authorize`, /metrics needs an `Authorization: Bearer
        <token>` header whose token it accepts (401 otherwise); /health needs none (load
        balancers and probes). Raises OSError when the port cannot be bound."""
        metrics = make_wsgi_app(self.registry)
        if authorize is not None:
            metrics = _guarded(metrics, authorize)
        app = _routes(metrics, state)
        host = host.strip("[]")  # "[::]" -> "::"
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
        http = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            http.socket = context.wrap_socket(http.socket, server_side=True)
        threading.Thread(target=http.serve_forever, name="nora-metrics", daemon=True).start()
        self._http = http
        return http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process up


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # no access log on stderr
        pass


def _routes(metrics, state: Callable[[], str]):
    """/metrics -> `metrics`, /health -> `state()`, else 404; GET and HEAD only."""

    def app(environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path not in ("/metrics", "/health"):
            return _reply(start_response, "404 Not Found", "not found: this port serves /metrics "
                          "and /health\n")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", f"{path} takes GET\n",
                          [("Allow", "GET, HEAD")])
        if path == "/metrics":
            return metrics(environ, start_response)
        now = state()
        return _reply(start_response, "200 OK" if now == "serving" else "503 Service Unavailable",
                      json.dumps({"status": now}), [("Cache-Control", "no-store")],
                      content_type="application/json")
    return app


def _reply(start_response, status: str, body: str, headers=(), *,
           content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(data))), *headers])
    return [data]


def _guarded(app, authorize: Callable[[str | None], bool]):
    """`app` behind a bearer-token check (401 without an accepted token)."""

    def guarded(environ, start_response):
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if not authorize(token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                 ("WWW-Authenticate", 'Bearer realm="nora"')])
            return [b"/metrics needs a bearer token (Authorization: Bearer <token>)\n"]
        return app(environ, start_response)
    return guarded

"""benchmarks/bench_serve.py --smoke: the real nora-serve (tiny model, CPU) and streaming asyncio
clients, closed loop and Poisson, with and without 100 adapters from the store; the JSON has the
rows and every request succeeded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_smoke(tmp_path):
    out = tmp_path / "serve-smoke"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"),
                           "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r["value"] for r in doc["rows"]}
    for name in ("serve_throughput_tok_s", "throughput_100_adapters_ratio", "ttft_p50_ms",
                 "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
        assert rows[name] > 0, name
    assert rows["requests_failed"] == 0
    for key in ("device", "date", "versions", "command"):
        assert doc[key]
    runs = doc["runs"]
    kinds = {(r["workload"], r["rate"], r["adapters"]) for r in runs}
    assert {("fixed", "closed", "none"), ("mixed", "50", "u100")} <= kinds
    closed = [r for r in runs if (r["workload"], r["rate"], r["adapters"])
              == ("fixed", "closed", "none")]
    assert len(closed) >= 3  # the row is the median of >= 3 closed-loop runs
    order = [r["adapters"] for r in runs if (r["workload"], r["rate"]) == ("fixed", "closed")]
    assert order[:6] == ["none", "z100", "u100"] * 2  # repeats go round the sets
    assert all(r["requests_failed"] == 0 and r["requests_ok"] == 8 for r in runs)
    assert doc["detail"]["adapters_made"] == 100
    assert doc["detail"]["warmup_failed"] == [0]
    assert out.with_suffix(".md").read_text().startswith("# Serving benchmark")


def test_bench_serve_client_processes(tmp_path):
    """Two client processes share a closed loop and a Poisson run: every request of mixed
    lengths is answered in full, and the CPU shares of client and server are measured."""
    out = tmp_path / "serve-procs-0.5"  # a dot in the name: all of it is kept
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"),
                           "--workloads", "mixed", "--rates", "closed,50", "--adapters", "none",
                           "--num-requests", "9", "--concurrency", "4", "--mixed-prompt", "4,16",
                           "--mixed-output", "2,12", "--repeats", "1", "--warmup", "0",
                           "--client-procs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "serve-procs-0.5.json").read_text())
    assert (tmp_path / "serve-procs-0.5.md").exists()
    runs = doc["runs"]
    assert [r["rate"] for r in runs] == ["closed", "50"]
    for r in runs:
        assert r["requests_ok"] == 9 and r["requests_failed"] == 0
        assert r["client_cpu_share_max"] > 0 and r["server_cpu_s_per_s"] > 0

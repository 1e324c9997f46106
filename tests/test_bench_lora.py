"""benchmarks/bench_lora.py --smoke: the H200 LoRA benchmark's code runs end to end on a tiny
model (CPU) and writes every row, so the GPU run is not the first run of the script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lora.py"


def test_bench_lora_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lora", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lora.json"
    doc = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == doc["rows"]
    assert not [k for k in doc["detail"] if k.endswith("_error")], doc["detail"]
    rows = {r["name"]: r["value"] for r in doc["rows"]}
    # every row of the default parts (the kernels part, each launch timed alone, is left to
    # the GPU: under Triton's interpreter it takes minutes; test_lora_kernels checks them)
    assert set(rows) == {name for name, _ in bench.ROWS if not name.startswith("kernels_")}
    assert all(v > 0 for v in rows.values())
    assert rows["lora_floor_ratio"] > 1.0

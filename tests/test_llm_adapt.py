"""benchmarks/llm_adapt.py end to end in its smoke mode (tiny random model, CPU): data, NoRA and
LoRA training, batched greedy evaluation, results files; and the facts task's data."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_adapt.py"


@pytest.fixture(scope="module")
def llm_adapt():
    spec = importlib.util.spec_from_file_location("llm_adapt", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["llm_adapt"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("llm_adapt", None)


def test_smoke_run_writes_results(llm_adapt, tmp_path):
    out = tmp_path / "llm-adapt"
    assert llm_adapt.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r["value"] for r in doc["rows"]}
    for method in ("nora", "lora_r1"):
        assert 0.0 <= rows[f"llm_adapt_facts_{method}_acc"] <= 1.0
        assert f"llm_adapt_facts_{method}_acc_seed0" in rows
        assert rows[f"llm_adapt_{method}_adapter_bytes"] > 0
    assert "llm_adapt_facts_base_acc" in rows
    # NoRA's paper defaults on the tiny model: 4 sites x (8 x 3 + 3 x 6 + 8 x 3 + 3 x 4)
    assert rows["llm_adapt_nora_trainable_parameters"] == 4 * 78
    assert len(doc["runs"]) == 2 and all(r["steps"] == doc["setup"]["steps"]
                                         for r in doc["runs"])
    md = out.with_suffix(".md").read_text()
    assert "Where NoRA loses" in md and "| nora |" in md


def test_facts_are_made_up_and_held_out_phrasings_are_new(llm_adapt):
    people, values = llm_adapt.facts(32)
    assert len({p["name"] for p in people}) == 32
    assert len(set(values["city"])) == 8
    task = llm_adapt.facts_task(llm_adapt.FULL)
    train_qs = {r["messages"][0]["content"] for r in task.train}
    assert len(task.train) == 32 * 2 * 3
    assert len(task.heldout) == 64
    assert not train_qs & {q for q, _ in task.heldout + task.val}
    # the check wants the right value and no other one
    person = people[0]
    other = next(c for c in values["city"] if c != person["city"])
    assert llm_adapt.names_only(f"They live in {person['city']}.", person["city"], values["city"])
    assert not llm_adapt.names_only(f"{person['city']} or {other}", person["city"],
                                    values["city"])
    assert not llm_adapt.names_only(f"They live in {other}.", person["city"], values["city"])

"""Adapter state survives SIGKILL (issue 10, finding 2): real subprocesses killed with SIGKILL
while they load, replace and unload adapters, then a fresh registry or engine over the same
store directory. Every id must serve its last acknowledged version, or the one in flight at the
kill; nothing half-written, no temp file taken for state.

Run as a script (`python tests/test_durability.py registry|engine ...`) this file is the child
process the tests kill.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_registry import adapter_bytes, expected, make_registry

from nora_runtime.adapter import adapter_to_bytes, load_adapter
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.registry import AdapterNotFound
from nora_runtime.sampling import SamplingParams
from nora_runtime.table import expand_groups
from nora_runtime.tiny import random_adapter, tiny_checkpoint

IDS = ("a", "b", "c", "p0", "p1")  # p0, p1: files at the store's top level, picked up at start
VARIANTS = 5
ROUNDS = 6
CAPACITY = 3  # fewer slots than ids: the checks reload evicted adapters from the store too


# ---- the child processes ------------------------------------------------------------------------


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # unbuffered, one write: whole lines reach the parent


def registry_child(store: str, variants: str, seed: int) -> None:
    """Restore, then load (bytes or path), replace and unload adapters until killed, saying
    "begin ..." before each operation and "ack ..." once it has returned."""
    reg = make_registry(capacity=CAPACITY, store_dir=Path(store))
    reg.restore()
    data = [Path(variants, f"v{k}.bin").read_bytes() for k in range(VARIANTS)]
    rng = random.Random(seed)
    say("ready")
    i = 0
    while True:
        op = rng.choice(("bytes", "bytes", "path", "path", "unload"))
        adapter_id, k = rng.choice(IDS), rng.randrange(VARIANTS)
        say(f"begin {i} {op} {adapter_id} {k}")
        try:
            if op == "bytes":
                reg.load(adapter_id, data[k])
            elif op == "path":
                reg.load(adapter_id, f"files/v{k}.safetensors")
            else:
                reg.unload(adapter_id)
        except AdapterNotFound:
            say(f"ack {i} absent")
        else:
            say(f"ack {i}")
        i += 1


def engine_child(store: str, seed_base: int) -> None:
    """An engine over the store: what the red team did through the server before its SIGKILL."""
    engine = Engine(tiny_config(), adapter_store=store)
    say("restored " + ",".join(engine.restored_adapters))
    engine.load_adapter("from-bytes", tiny_adapter(engine, seed_base + 5))
    engine.load_adapter("by-path", "sub/x.safetensors")
    engine.load_adapter("orig", tiny_adapter(engine, seed_base + 6))
    engine.unload_adapter("gone")
    say("done")
    time.sleep(600)


# ---- helpers --------------------------------------------------------------------------------


class Child:
    """A child process of this file, its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.decode().rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            assert line is not None, f"child exited ({self.proc.wait()}) before {prefix!r}"
            if line.startswith(prefix):
                return line

    def kill(self) -> list[str]:
        """SIGKILL it; the lines it wrote before dying."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        rest = []
        while (line := self.lines.get(timeout=30)) is not None:
            rest.append(line)
        return rest


def served_variant(reg, adapter_id: str, rows: list[torch.Tensor]) -> int | None:
    """Which variant a new request with `adapter_id` computes with; None: not loaded."""
    try:
        slot = reg.acquire(adapter_id)
    except AdapterNotFound:
        return None
    reg.release(slot)
    matches = [k for k, r in enumerate(rows) if torch.equal(reg.table.data[slot], r)]
    assert len(matches) == 1, f"{adapter_id} serves no adapter that was ever loaded"
    return matches[0]


def check_state_dir(store: Path, reg) -> None:
    """No temp file left, and exactly the blobs the manifest references."""
    state = store / ".nora"
    assert sorted(p.name for p in state.iterdir()) == ["blobs", "journal.jsonl", "manifest.json"]
    used = {r.sha256 for r in reg.store.records().values()}
    assert {p.name.removesuffix(".safetensors") for p in (state / "blobs").iterdir()} == used


def apply(model: dict[str, int | None], op: str, adapter_id: str, k: int) -> None:
    model[adapter_id] = None if op == "unload" else k


# ---- tests ----------------------------------------------------------------------------------


def test_sigkill_at_random_points_leaves_the_old_or_the_new_state(tmp_path: Path) -> None:
    """Finding 2 (issue 10): a child process loads (bytes and paths), replaces and unloads
    adapters in a loop and is SIGKILLed at a random moment, six times (seeded); after each
    kill a fresh registry over the same store must serve, for every id, its last acknowledged
    version, or for the id of the operation in flight either its old or its new one."""
    store, variants = tmp_path / "store", tmp_path / "variants"
    (store / "files").mkdir(parents=True)
    variants.mkdir()
    data = [adapter_bytes(k) for k in range(VARIANTS)]
    for k, d in enumerate(data):
        (variants / f"v{k}.bin").write_bytes(d)
        (store / "files" / f"v{k}.safetensors").write_bytes(d)
    (store / "p0.safetensors").write_bytes(data[0])
    (store / "p1.safetensors").write_bytes(data[1])
    rows = [expected(d) for d in data]
    model: dict[str, int | None] = {"a": None, "b": None, "c": None, "p0": 0, "p1": 1}
    rng = random.Random(20261206)
    acked = in_flight = 0
    for round_ in range(ROUNDS):
        child = Child("registry", str(store), str(variants), str(round_))
        child.wait_for("ready")
        time.sleep(rng.uniform(0.05, 0.6))
        pending = None
        for line in child.kill():
            word, *rest = line.split()
            if word == "begin":
                pending = rest[1:]  # op, id, variant
            elif word == "ack":
                if rest[1:] != ["absent"]:
                    apply(model, pending[0], pending[1], int(pending[2]))
                pending = None
                acked += 1
        reg = make_registry(capacity=CAPACITY, store_dir=store)
        reg.restore()
        check_state_dir(store, reg)
        for adapter_id in IDS:
            allowed = {model[adapter_id]}
            if pending is not None and pending[1] == adapter_id:
                after = dict(model)
                apply(after, pending[0], adapter_id, int(pending[2]))
                allowed.add(after[adapter_id])
            seen = served_variant(reg, adapter_id, rows)
            assert seen in allowed, (round_, adapter_id, seen, allowed, pending)
            model[adapter_id] = seen  # the in-flight operation's outcome, now known
        in_flight += pending is not None
    assert acked >= 2 * ROUNDS, "the children barely ran: the kills tested little"
    assert in_flight >= 1, "no kill landed inside an operation"


def tiny_config() -> EngineConfig:
    return EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                        max_adapters=4, kv_cache_tokens_cpu=512)


def tiny_adapter(engine: Engine, seed: int) -> bytes:
    return adapter_to_bytes(random_adapter(engine.info, seed),
                            base_fingerprint=engine.info.fingerprint)


def test_engine_restart_after_sigkill_restores_runtime_changes(tmp_path: Path) -> None:
    """Finding 2 (issue 10), end to end: an engine process loads an adapter from bytes, one by
    path under a new id, replaces one and unloads one, and is SIGKILLed; a new engine over the
    same store serves the first three as loaded and keeps the fourth unloaded, though its file
    is still in the store; generating with the replaced id equals generating with its new
    bytes."""
    probe = Engine(tiny_config())  # the model's fingerprint, for adapter files
    (tmp_path / "sub").mkdir()
    (tmp_path / "orig.safetensors").write_bytes(tiny_adapter(probe, 1))
    (tmp_path / "gone.safetensors").write_bytes(tiny_adapter(probe, 2))
    (tmp_path / "sub" / "x.safetensors").write_bytes(tiny_adapter(probe, 4))
    child = Child("engine", str(tmp_path), "0")
    assert child.wait_for("restored") == "restored gone,orig"
    child.wait_for("done")
    child.kill()

    engine = Engine(tiny_config(), adapter_store=tmp_path)
    assert engine.restored_adapters == ["orig", "from-bytes", "by-path"]
    groups = engine.registry.table.groups
    for adapter_id, seed in (("from-bytes", 5), ("by-path", 4), ("orig", 6)):
        want = expand_groups(load_adapter(tiny_adapter(probe, seed)).coefs, groups)
        slot = engine.registry.acquire(adapter_id)
        engine.registry.release(slot)
        assert torch.equal(engine.registry.table.data[slot], want), adapter_id
    greedy = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    with engine:
        with_id = [t for e in engine.generate("Hello", greedy, adapter="orig") for t in e.token_ids]
        inline = [t for e in engine.generate("Hello", greedy, adapter=tiny_adapter(probe, 6))
                  for t in e.token_ids]
        assert with_id == inline
        with pytest.raises(AdapterNotFound):  # it did come back before the fix
            engine.submit("Hello", greedy, adapter="gone", on_event=print)


if __name__ == "__main__":
    if sys.argv[1] == "registry":
        registry_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        engine_child(sys.argv[2], int(sys.argv[3]))

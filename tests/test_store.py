"""The durable adapter store (store.py) under a real registry: what a restart restores (issue
10, finding 2), the manifest and content-addressed blobs on disk, deduplication and garbage
collection, leftovers of a crash swept at open, corrupt state refused, inline adapters never
persisted, and memory-only registries leaving the directory alone."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from test_registry import FP, GROUPS, SITES, adapter_bytes, expected, make_adapter

from nora_runtime.adapter import save_adapter
from nora_runtime.rational import base_coefficients
from nora_runtime.registry import INLINE, AdapterNotFound, AdapterRegistry
from nora_runtime.store import AdapterStore, StoreError, read_state
from nora_runtime.table import CoefficientTable


def registry(store: Path, capacity: int = 8, **kw) -> AdapterRegistry:
    table = CoefficientTable(base_coefficients("silu"), slots=capacity + 1, groups=GROUPS,
                             sites=SITES)
    return AdapterRegistry(table, fingerprint=FP, mode="residual", act="silu", store_dir=store,
                           **kw)


def serves(reg: AdapterRegistry, adapter_id: str) -> torch.Tensor | None:
    """The rows a new request with `adapter_id` computes with (reloading it if need be), or
    None if the id is not loaded."""
    try:
        slot = reg.acquire(adapter_id)
    except AdapterNotFound:
        return None
    reg.release(slot)
    return reg.table.data[slot].clone()


def manifest(store: Path) -> dict:
    """The stored state (the manifest with the journal replayed), in the manifest's format."""
    records, unloaded, _ = read_state(store)
    return {"version": 1, "adapters": {k: dataclasses.asdict(r) for k, r in records.items()},
            "unloaded": sorted(unloaded)}


def blobs(store: Path) -> set[str]:
    return {p.name.removesuffix(".safetensors") for p in (store / ".nora" / "blobs").iterdir()}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_restart_restores_what_was_loaded_replaced_and_unloaded(tmp_path: Path) -> None:
    """Finding 2 (issue 10): after SIGKILL and restart with the same --adapter-dir, an adapter
    loaded from bytes was gone, one loaded by path under a new id was gone, a replaced one
    reverted to its old file, an unloaded one came back. The manifest now says what each id
    serves; files dropped in while the server was down are still picked up."""
    v = {k: adapter_bytes(k) for k in range(1, 8)}
    write(tmp_path / "orig.safetensors", v[1])
    write(tmp_path / "gone.safetensors", v[2])
    write(tmp_path / "edited.safetensors", v[3])
    write(tmp_path / "sub" / "x.safetensors", v[4])
    first = registry(tmp_path)
    assert first.restore() == ["edited", "gone", "orig"]
    first.load("from-bytes", v[5])
    first.load("by-path", "sub/x.safetensors")
    first.load("orig", v[6])  # replace: the file orig.safetensors keeps v1
    first.unload("gone")  # gone.safetensors stays in the directory
    del first  # a crash: no shutdown step exists to forget
    (tmp_path / "sub" / "x.safetensors").unlink()  # the operator tidies up while it is down
    write(tmp_path / "edited.safetensors", v[7])  # edits the file an id was loaded from
    write(tmp_path / "dropped.safetensors", v[2])  # and drops in a new one

    second = registry(tmp_path)
    assert second.restore() == ["edited", "orig", "from-bytes", "by-path", "dropped"]
    want = {"from-bytes": v[5], "by-path": v[4], "orig": v[6], "edited": v[7],
            "dropped": v[2], "gone": None}
    for adapter_id, data in want.items():
        rows = serves(second, adapter_id)
        if data is None:
            assert rows is None, adapter_id
        else:
            assert rows is not None and torch.equal(rows, expected(data)), adapter_id
    assert second.get("by-path").source == "sub/x.safetensors"
    assert second.get("from-bytes").source == INLINE
    second.load("gone", "gone.safetensors")  # loading it explicitly brings it back for good
    third = registry(tmp_path)
    third.restore()
    assert torch.equal(serves(third, "gone"), expected(v[2]))


def test_manifest_and_blobs_on_disk(tmp_path: Path) -> None:
    """Layout: one content-addressed blob per distinct adapter (two ids with the same bytes
    share it), the manifest's records, blobs deleted when no id references them any more."""
    v1, v2 = adapter_bytes(1), adapter_bytes(2)
    sha1, sha2 = (hashlib.sha256(d).hexdigest() for d in (v1, v2))
    reg = registry(tmp_path)
    reg.load("a", v1)
    reg.load("b", v1)
    assert blobs(tmp_path) == {sha1}
    assert manifest(tmp_path) == {
        "version": 1, "unloaded": [],
        "adapters": {k: {"sha256": sha1, "source": "inline", "nbytes": len(v1)} for k in "ab"}}
    reg.load("a", v2)
    assert blobs(tmp_path) == {sha1, sha2}
    reg.unload("b")
    assert blobs(tmp_path) == {sha2} and list(manifest(tmp_path)["adapters"]) == ["a"]
    assert manifest(tmp_path)["unloaded"] == ["b"]
    reg.unload("a")
    assert blobs(tmp_path) == set() and manifest(tmp_path)["adapters"] == {}
    assert sorted(p.name for p in (tmp_path / ".nora").iterdir()) == ["blobs", "journal.jsonl",
                                                                      "manifest.json"]


def test_inline_adapters_are_never_persisted(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    cid = reg.load_inline(adapter_bytes(1))
    assert blobs(tmp_path) == set() and manifest(tmp_path)["adapters"] == {}
    fresh = registry(tmp_path)
    assert fresh.restore() == [] and len(fresh) == 0
    with pytest.raises(AdapterNotFound):
        fresh.get(cid)


def test_memory_only_registries_leave_the_directory_alone(tmp_path: Path) -> None:
    """durable=False (the demo adapters' read-only package directory): paths are read, no state
    is written."""
    save_adapter(make_adapter(1), tmp_path / "a.safetensors", base_fingerprint=FP)
    reg = registry(tmp_path, durable=False)
    reg.load("a", "a.safetensors")
    reg.unload("a")
    assert reg.store is None and reg.restore() == []
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_open_sweeps_what_a_crash_left(tmp_path: Path) -> None:
    """Temp files of writes in flight and blobs no id references (orphaned between a manifest
    write and the collection) are deleted at open, never taken for state."""
    reg = registry(tmp_path)
    reg.load("a", adapter_bytes(1))
    state = tmp_path / ".nora"
    write(state / "tmp-123", b"half a manifest")
    write(state / "blobs" / f"{'0' * 64}.safetensors", adapter_bytes(2))
    before = manifest(tmp_path)
    fresh = registry(tmp_path)
    assert fresh.restore() == ["a"] and manifest(tmp_path) == before
    assert sorted(p.name for p in state.iterdir()) == ["blobs", "journal.jsonl", "manifest.json"]
    assert blobs(tmp_path) == {before["adapters"]["a"]["sha256"]}


def test_unreadable_state_is_refused(tmp_path: Path) -> None:
    """A manifest that does not parse stops the start (never silently emptied and rewritten);
    a corrupt blob is caught by its hash: skipped at restore (logged), an error at reload."""
    reg = registry(tmp_path, capacity=1)
    reg.load("a", adapter_bytes(1))
    reg.load("b", adapter_bytes(2))  # evicts "a" (stored): it reloads from its blob
    sha_a = manifest(tmp_path)["adapters"]["a"]["sha256"]
    blob = tmp_path / ".nora" / "blobs" / f"{sha_a}.safetensors"
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    with pytest.raises(StoreError, match="corrupt"):
        reg.acquire("a")
    assert torch.equal(serves(reg, "b"), expected(adapter_bytes(2)))
    fresh = registry(tmp_path)
    assert fresh.restore() == ["b"]  # "a" is logged and skipped; its record stays
    assert "a" in manifest(tmp_path)["adapters"]
    (tmp_path / ".nora" / "manifest.json").write_text('{"version": 1, "adapters": [')
    with pytest.raises(StoreError, match="unreadable"):
        AdapterStore(tmp_path)
    (tmp_path / ".nora" / "manifest.json").write_text('{"version": 2}')
    with pytest.raises(StoreError, match="malformed"):
        registry(tmp_path)


def test_more_stored_adapters_than_slots(tmp_path: Path) -> None:
    """A restart registers every stored id; free slots are filled in manifest order and the
    rest load on their first use (evicting the least recently used idle named adapter)."""
    v = {f"t{i}": adapter_bytes(i) for i in range(5)}
    first = registry(tmp_path, capacity=5)
    for k, data in v.items():
        first.load(k, data)
    fresh = registry(tmp_path, capacity=2)
    assert fresh.restore() == list(v)
    assert [i.resident for i in fresh.list()] == [True, True, False, False, False]
    for k in reversed(v):
        assert torch.equal(serves(fresh, k), expected(v[k])), k
    assert fresh.reloads == 5 and fresh.evictions == 5 and fresh.load_failures == 0


def test_changes_are_journal_lines_folded_into_the_manifest(tmp_path: Path) -> None:
    """A change appends one fsynced journal line instead of rewriting the manifest (rewriting
    it every time made loading N adapters O(N^2): 1,000 LoadAdapter calls took 20 s). The
    journal is folded into the manifest once it holds more lines than the manifest has ids (at
    least 64), and at open; a line a crash cut short was never acknowledged and is dropped."""
    state = tmp_path / ".nora"
    reg = registry(tmp_path, capacity=4)
    snapshot = (state / "manifest.json").read_bytes()
    for i in range(40):
        reg.load(f"id{i}", adapter_bytes(i % 3))
    assert (state / "manifest.json").read_bytes() == snapshot  # not rewritten 40 times
    assert len((state / "journal.jsonl").read_bytes().splitlines()) == 40
    assert list(manifest(tmp_path)["adapters"]) == [f"id{i}" for i in range(40)]
    for i in range(40):  # 80 lines > max(64, 40 ids): folded along the way
        reg.unload(f"id{i}")
    assert len((state / "journal.jsonl").read_bytes().splitlines()) < 64
    assert manifest(tmp_path)["adapters"] == {}
    reg.load("kept", adapter_bytes(1))
    with open(state / "journal.jsonl", "ab") as f:  # a crash in the middle of an append
        f.write(b'{"id": "torn", "record": nu')
    assert list(manifest(tmp_path)["adapters"]) == ["kept"]
    fresh = registry(tmp_path)
    assert fresh.restore() == ["kept"]
    assert (state / "journal.jsonl").read_bytes() == b""  # folded at open, torn line gone
    (state / "journal.jsonl").write_bytes(b'not json\n{"id": "x", "record": null, '
                                          b'"unloaded": false}\n')
    with pytest.raises(StoreError, match="line 1 is malformed"):
        registry(tmp_path)

"""Adapter registry: load from file and bytes, mismatches, path escapes, replace and unload
while requests run, LRU eviction that never takes a slot in use, inline dedupe, a 100,001-slot
table, and a threaded smoke test of the bookkeeping invariants. Issue 10: pinning (inline
traffic never evicts named adapters, named ones without a store are never evicted), the inline
budget, inline content ids unusable by id, holds from load to submit, dynamic reload of evicted
stored adapters, failure-safe install under fault injection, non-regular files refused."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch

from nora_runtime.adapter import (
    ActivationMismatch,
    AdapterFormatError,
    AdapterMismatchError,
    FingerprintMismatch,
    ModeMismatch,
    NoraAdapter,
    SiteCountMismatch,
    adapter_to_bytes,
    load_adapter,
    save_adapter,
)
from nora_runtime.rational import base_coefficients
from nora_runtime.registry import (
    INLINE,
    AdapterNotFound,
    AdapterPathError,
    AdapterRegistry,
    GroupCountMismatch,
    RegistryFull,
)
from nora_runtime.table import CoefficientTable, expand_groups

FP = "cd" * 32
SITES = 3
GROUPS = 4


def make_adapter(seed: int = 0, *, sites: int = SITES, groups: int = 2, act: str = "silu",
                 mode: str = "residual") -> NoraAdapter:
    """An adapter over the `act` base with nonzero B, so its coefficients differ from the base."""
    torch.manual_seed(seed)
    m = NoraAdapter(base_coefficients(act), rank=3, alpha=6.0, groups=groups,
                    site_names=[f"layers.{i}.mlp.act" for i in range(sites)], act=act, mode=mode)
    with torch.no_grad():
        m.num_B.normal_(0.0, 0.1)
        m.den_B.normal_(0.0, 0.1)
    return m


def adapter_bytes(seed: int = 0, *, fp: str = FP, **kw: object) -> bytes:
    return adapter_to_bytes(make_adapter(seed, **kw), base_fingerprint=fp)


def expected(data: bytes, groups: int = GROUPS) -> torch.Tensor:
    """The table rows [L, G, 10] an adapter's bytes should produce."""
    return expand_groups(load_adapter(data).coefs, groups)


def make_registry(capacity: int = 4, store_dir: Path | None = None, *, sites: int = SITES,
                  groups: int = GROUPS, table_type: type = CoefficientTable,
                  **kw: object) -> AdapterRegistry:
    table = table_type(base_coefficients("silu"), slots=capacity + 1, groups=groups,
                       sites=sites)
    return AdapterRegistry(table, fingerprint=FP, mode="residual", act="silu",
                           store_dir=store_dir, **kw)


def base_rows(reg: AdapterRegistry) -> torch.Tensor:
    return reg.table.data[0]


def check_idle_invariants(reg: AdapterRegistry) -> None:
    """No slot held: every slot is either some resident id's (distinct) or free and holding the
    base; ids not resident (stored, reloaded on use) have slot 0."""
    infos = reg.list()
    assert all(info.in_use == 0 for info in infos)
    slots = {info.slot for info in infos if info.resident}
    assert len(slots) == sum(info.resident for info in infos)
    assert all(info.slot == 0 for info in infos if not info.resident)
    assert len(slots) + reg.num_free == reg.capacity
    for s in set(range(1, reg.capacity + 1)) - slots:
        assert torch.equal(reg.table.data[s], base_rows(reg))
    assert sum(info.inline for info in infos) <= reg.max_inline


def test_load_from_file_and_bytes_writes_merged_coefficients(tmp_path: Path) -> None:
    save_adapter(make_adapter(1), tmp_path / "a.safetensors", base_fingerprint=FP)
    data_b = adapter_bytes(2)
    reg = make_registry(store_dir=tmp_path)
    a = reg.load("tenant-a", "a.safetensors")
    b = reg.load("tenant-b", data_b)
    assert a.slot != b.slot and 0 not in (a.slot, b.slot)
    file_bytes = (tmp_path / "a.safetensors").read_bytes()
    assert torch.equal(reg.table.data[a.slot], expected(file_bytes))
    assert torch.equal(reg.table.data[b.slot], expected(data_b))
    assert not torch.equal(reg.table.data[a.slot], base_rows(reg))
    assert (a.source, a.nbytes) == ("a.safetensors", len(file_bytes))
    assert (b.source, b.nbytes) == (INLINE, len(data_b))
    assert reg.loads == 2 and reg.acquire("tenant-a") == a.slot
    assert [i.id for i in reg.list()] == ["tenant-a", "tenant-b"]


def test_base_unknown_ids_and_bad_ids() -> None:
    reg = make_registry()
    assert reg.acquire(None) == 0 and reg.acquire("") == 0
    reg.release(0)  # the base is not refcounted
    for call in (reg.acquire, reg.get, reg.unload):
        with pytest.raises(AdapterNotFound, match="no adapter loaded under id 'nope'"):
            call("nope")
    data = adapter_bytes()
    for bad in ("", "a b", "tab\t", "nul\x00", "x" * 129, "sha256:abc"):
        with pytest.raises(ValueError, match="adapter id"):
            reg.load(bad, data)
    with pytest.raises(ValueError, match="slot 1 is not held"):
        reg.release(1)
    assert len(reg) == 0 and reg.load_failures == 0


@pytest.mark.parametrize(("kw", "error"), [
    ({"fp": "ee" * 32}, FingerprintMismatch),
    ({"mode": "replace"}, ModeMismatch),
    ({"act": "gelu"}, ActivationMismatch),
    ({"sites": SITES + 1}, SiteCountMismatch),
    ({"groups": 3}, GroupCountMismatch),  # 3 does not divide the table's 4 groups
])
def test_mismatch_is_counted_and_leaves_table_untouched(kw: dict, error: type) -> None:
    reg = make_registry()
    reg.load("ok", adapter_bytes(0))
    before = reg.table.data.clone()
    with pytest.raises(error) as e:
        reg.load("bad", adapter_bytes(1, **kw))
    assert isinstance(e.value, AdapterMismatchError)
    with pytest.raises(error):
        reg.load_inline(adapter_bytes(1, **kw))
    assert reg.load_failures == 2 and reg.loads == 1
    assert torch.equal(reg.table.data, before)
    assert [i.id for i in reg.list()] == ["ok"] and reg.num_free == reg.capacity - 1


def test_bad_file_is_counted() -> None:
    reg = make_registry()
    with pytest.raises(AdapterFormatError):
        reg.load("junk", b"not an adapter")
    assert reg.load_failures == 1 and len(reg) == 0


def test_path_sources_stay_inside_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "sub").mkdir(parents=True)
    save_adapter(make_adapter(), store / "sub" / "ok.safetensors", base_fingerprint=FP)
    save_adapter(make_adapter(), tmp_path / "outside.safetensors", base_fingerprint=FP)
    (store / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (store / "inside.safetensors").symlink_to(store / "sub" / "ok.safetensors")
    reg = make_registry(store_dir=store)
    assert reg.load("a", Path("sub/ok.safetensors")).source == "sub/ok.safetensors"
    assert reg.load("b", "inside.safetensors").slot > 0  # a symlink within the store is fine
    bad = {
        str(tmp_path / "outside.safetensors"): "must be relative",
        "../outside.safetensors": "must be relative",
        "sub/../../outside.safetensors": "must be relative",
        "nul\x00.safetensors": "must be relative",
        "": "must be relative",
        "escape.safetensors": "leads outside the store",
        "missing.safetensors": "cannot read adapter file 'missing.safetensors': No such file",
        "sub": "cannot read adapter file 'sub': Is a directory",
    }
    for source, msg in bad.items():
        with pytest.raises(AdapterPathError, match=msg) as e:
            reg.load("c", source)
        assert str(store) not in str(e.value)  # never reveal the server's directories
    assert reg.load_failures == len(bad) and len(reg) == 2
    with pytest.raises(AdapterPathError, match="disabled"):
        make_registry().load("c", "sub/ok.safetensors")


def test_replace_keeps_running_requests_on_the_old_coefficients() -> None:
    reg = make_registry(capacity=2)
    v1, v2, v3 = adapter_bytes(1), adapter_bytes(2), adapter_bytes(3)
    reg.load("a", v1)
    old = reg.acquire("a")
    new = reg.load("a", v2).slot
    assert new != old
    assert torch.equal(reg.table.data[old], expected(v1))  # the running request's view
    assert torch.equal(reg.table.data[new], expected(v2))
    assert reg.acquire("a") == new
    reg.count_tokens(old, 5)  # tokens of the old version still count for the id
    reg.release(old)
    assert reg.num_free == 1 and torch.equal(reg.table.data[old], base_rows(reg))
    # a replacement that finds every slot held fails and leaves the old version serving
    reg.load("b", v1)
    held_b = reg.acquire("b")
    with pytest.raises(RegistryFull):
        reg.load("a", v3)
    assert reg.get("a").slot == new and torch.equal(reg.table.data[new], expected(v2))
    info = reg.get("a")
    assert (info.requests, info.tokens, info.in_use) == (2, 5, 1)
    reg.release(new)
    reg.release(held_b)
    check_idle_invariants(reg)


def test_replace_of_an_idle_adapter_is_in_place_and_evicts_nothing() -> None:
    reg = make_registry(capacity=2)
    reg.load("a", adapter_bytes(1))
    slot = reg.load("b", adapter_bytes(2)).slot
    v3 = adapter_bytes(3)
    assert reg.load("b", v3).slot == slot
    assert torch.equal(reg.table.data[slot], expected(v3))
    assert reg.evictions == 0 and [i.id for i in reg.list()] == ["a", "b"]


def test_unload_while_in_use_frees_the_slot_after_release() -> None:
    reg = make_registry(capacity=2)
    data = adapter_bytes(1)
    reg.load("a", data)
    slot = reg.acquire("a")
    reg.unload("a")
    with pytest.raises(AdapterNotFound):
        reg.acquire("a")
    with pytest.raises(AdapterNotFound):
        reg.unload("a")
    assert torch.equal(reg.table.data[slot], expected(data))  # the holder still reads it
    assert reg.num_free == 1
    assert reg.load("a", adapter_bytes(2)).slot != slot  # a retired slot is not reused
    reg.count_tokens(slot, 3)
    reg.release(slot)
    assert reg.num_free == 1 and torch.equal(reg.table.data[slot], base_rows(reg))
    reg.unload("a")  # idle: freed at once
    assert reg.num_free == 2
    check_idle_invariants(reg)


def test_lru_never_evicts_an_adapter_in_use(tmp_path: Path) -> None:
    """Stored named adapters: LRU among the idle ones, never one in use; an evicted one stays
    registered (not resident) and its next acquire reloads it."""
    reg = make_registry(capacity=3, store_dir=tmp_path)
    data = {k: adapter_bytes(i) for i, k in enumerate("abcdefg")}
    for k in "abc":
        reg.load(k, data[k])
    reg.release(reg.acquire("a"))  # a becomes the most recently used: LRU order b, c, a
    d = reg.load("d", data["d"])  # evicts b
    assert {i.id for i in reg.list() if i.resident} == {"a", "c", "d"} and reg.evictions == 1
    assert not reg.get("b").resident and len(reg) == 4
    assert torch.equal(reg.table.data[d.slot], expected(data["d"]))
    held_c = reg.acquire("c")  # c is now the oldest but held: never evicted
    reg.load("e", data["e"])  # evicts a, the least recently used idle one
    assert {i.id for i in reg.list() if i.resident} == {"c", "d", "e"}
    held_d, held_e = reg.acquire("d"), reg.acquire("e")
    before = reg.table.data.clone()
    assert not reg.load("f", data["f"]).resident  # every slot held: registered, not resident
    with pytest.raises(RegistryFull):
        reg.acquire("f")  # ... and its reload finds no slot either
    with pytest.raises(RegistryFull):
        reg.load_inline(data["g"])
    assert torch.equal(reg.table.data, before) and reg.evictions == 2 and reg.loads == 6
    assert torch.equal(reg.table.data[held_c], expected(data["c"]))
    for s in (held_c, held_d, held_e):
        reg.release(s)
    slot_f = reg.acquire("f")  # c was released first: it is the LRU now, and f reloads there
    assert slot_f == held_c and torch.equal(reg.table.data[slot_f], expected(data["f"]))
    assert reg.reloads == 1 and {i.id for i in reg.list() if i.resident} == {"d", "e", "f"}
    reg.release(slot_f)
    check_idle_invariants(reg)


def test_inline_dedupe_uses_one_slot() -> None:
    reg = make_registry(capacity=3, max_inline=2)
    data = adapter_bytes(1)
    first = reg.load_inline(data)
    assert first.startswith("sha256:") and len(first) == 71
    assert reg.load_inline(data) == first
    assert len(reg) == 1 and reg.loads == 1 and reg.num_free == 2
    info = reg.get(first)
    assert info.source == INLINE and info.inline
    assert torch.equal(reg.table.data[info.slot], expected(data))
    assert reg.load_inline(adapter_bytes(2)) != first and len(reg) == 2


def test_inline_dedupe_refreshes_lru() -> None:
    reg = make_registry(capacity=4, max_inline=2)
    data = adapter_bytes(1)  # serialized once: safetensors' metadata order varies per call
    a = reg.load_inline(data)
    b = reg.load_inline(adapter_bytes(2))
    reg.load_inline(data)  # a used again: b is the LRU now
    c = reg.load_inline(adapter_bytes(3))
    assert {i.id for i in reg.list()} == {a, c} and b != c
    assert reg.evictions == reg.inline_evictions == 1


def test_hundred_thousand_slots() -> None:
    # 100,001 slots x 2 sites x 1 group x 40 B = 8 MB
    reg = make_registry(capacity=100_000, sites=2, groups=1)
    data = adapter_bytes(1, sites=2, groups=1)
    rows = expected(data, groups=1)
    for i in range(1000):
        reg.load(f"t{i}", data)
    slots = [reg.acquire(f"t{i}") for i in range(1000)]
    assert sorted(slots) == list(range(1, 1001))
    assert torch.equal(reg.table.data[1000], rows)
    for s in slots:
        reg.count_tokens(s, 1)
        reg.release(s)
    assert reg.num_free == 99_000 and reg.evictions == 0
    assert reg.get("t999").tokens == 1


def test_threads_keep_the_bookkeeping_consistent() -> None:
    reg = make_registry(capacity=4)
    blobs = [adapter_bytes(i) for i in range(4)]
    ids = [f"t{i}" for i in range(6)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                op = rng.random()
                try:
                    if op < 0.25:
                        reg.load(rng.choice(ids), rng.choice(blobs))
                    elif op < 0.3:
                        reg.load_inline(rng.choice(blobs))
                    elif op < 0.35:
                        reg.unload(rng.choice(ids))
                    else:
                        slot = reg.acquire(rng.choice(ids))
                        reg.count_tokens(slot, 1)
                        reg.release(slot)
                except (AdapterNotFound, RegistryFull):
                    pass
        except BaseException as e:  # surfaced below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert reg.load_failures == 0 and reg.loads > 0
    check_idle_invariants(reg)
    valid = [expected(b) for b in blobs]
    for info in reg.list():  # every id's slot holds one of the adapters that were loaded
        assert any(torch.equal(reg.table.data[info.slot], v) for v in valid)

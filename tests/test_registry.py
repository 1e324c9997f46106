"""Adapter registry: load from file and bytes, mismatches, path escapes, replace and unload
while requests run, LRU eviction that never takes a slot in use, inline dedupe, a 100,001-slot
table, and a threaded smoke test of the bookkeeping invariants. Issue 10: pinning (inline
traffic never evicts named adapters, named ones without a store are never evicted), the inline
budget, inline content ids unusable by id, holds from load to submit, dynamic reload of evicted
stored adapters, failure-safe install under fault injection, non-regular files refused."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
import torch

from nora_runtime.adapter import (
    MAX_FILE_BYTES,
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


@pytest.mark.parametrize("durable", [False, True])
def test_threads_keep_the_bookkeeping_consistent(tmp_path: Path, durable: bool) -> None:
    """Durable: loads and unloads also write the store, and acquires reload evicted adapters
    from it, racing replaces of the same ids."""
    reg = make_registry(capacity=4, store_dir=tmp_path if durable else None)
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
        slot = reg.acquire(info.id) if not info.inline else info.slot
        assert any(torch.equal(reg.table.data[slot], v) for v in valid)
        if not info.inline:
            reg.release(slot)
    if durable:  # and the store agrees with memory on what each id serves
        fresh = make_registry(capacity=4, store_dir=tmp_path)
        assert set(fresh.restore()) == {i.id for i in reg.list() if not i.inline}
        for info in reg.list():
            if not info.inline:
                slot, mine = fresh.acquire(info.id), reg.acquire(info.id)
                assert torch.equal(fresh.table.data[slot], reg.table.data[mine])
                fresh.release(slot)
                reg.release(mine)


# ---- issue 10: pinning, inline budget, holds, failure-safe install, regular files -----------


@pytest.mark.parametrize("durable", [False, True])
def test_inline_traffic_never_evicts_named_adapters(tmp_path: Path, durable: bool) -> None:
    """Finding 1 (issue 10): ~1,030 Generate calls, each with different inline adapter bytes,
    evicted the admin's adapter and the demo adapters (NOT_FOUND afterwards). Inline adapters
    now evict only each other, within their own budget."""
    reg = make_registry(capacity=6, store_dir=tmp_path if durable else None, max_inline=2)
    named = {k: adapter_bytes(i) for i, k in enumerate(("admin", "demo-1", "demo-2"))}
    for k, data in named.items():
        reg.load(k, data)
    for i in range(40):
        with reg.hold_inline(adapter_bytes(100 + i)) as hold:
            assert reg.table.data[hold.slot].ne(base_rows(reg)).any()
    for k, data in named.items():
        info = reg.get(k)
        assert info.resident and torch.equal(reg.table.data[info.slot], expected(data))
        reg.release(reg.acquire(k))
    assert reg.evictions == reg.inline_evictions == 38
    assert sum(i.inline for i in reg.list()) == 2 and reg.num_free == 1
    check_idle_invariants(reg)


def test_named_adapters_without_a_store_are_never_evicted() -> None:
    """Finding 1 (issue 10): LoadAdapter past the slot count evicted silently (3,979 evictions
    in a 5,000-load churn). A named adapter with no durable copy is never evicted: a load that
    finds no slot fails with RegistryFull and changes nothing. Idle inline adapters (a cache of
    what requests carry) do give way to a named load."""
    reg = make_registry(capacity=3, max_inline=1)
    reg.load("a", adapter_bytes(1))
    reg.load("b", adapter_bytes(2))
    inline = reg.load_inline(adapter_bytes(3))
    reg.load("c", adapter_bytes(4))  # takes the idle inline adapter's slot
    assert {i.id for i in reg.list()} == {"a", "b", "c"} and inline not in reg._ids
    before = (reg.table.data.clone(), [(i.id, i.slot) for i in reg.list()])
    for i in range(50):
        with pytest.raises(RegistryFull, match="pinned"):
            reg.load(f"churn-{i}", adapter_bytes(5))
    with pytest.raises(RegistryFull, match="named"):
        reg.load_inline(adapter_bytes(6))  # nor can inline traffic take a named slot
    assert torch.equal(reg.table.data, before[0])
    assert [(i.id, i.slot) for i in reg.list()] == before[1]
    assert reg.evictions == reg.inline_evictions == 1
    reg.load("b", adapter_bytes(7))  # a replace of an idle one still works (in place)
    check_idle_invariants(reg)


def test_inline_content_ids_are_usable_only_by_their_bytes() -> None:
    """Finding 3 (issue 10): client B generated with client A's inline adapter by passing its
    content id "sha256:..." as adapter_id, without ever having its bytes. A content id is now
    refused exactly as an id that is not loaded (the message does not reveal which)."""
    reg = make_registry(max_inline=2)
    data = adapter_bytes(1)
    cid = reg.load_inline(data)
    unknown = "sha256:" + "0" * 64
    for call in (reg.acquire, reg.hold):
        with pytest.raises(AdapterNotFound) as loaded:
            call(cid)
        with pytest.raises(AdapterNotFound) as absent:
            call(unknown)
        assert str(loaded.value).replace(cid, "ID") == str(absent.value).replace(unknown, "ID")
    info = reg.get(cid)  # listing (the server shows these to admins only) can tell them apart
    assert info.inline and info.requests == 1 and info.in_use == 0
    with reg.hold_inline(data) as hold:  # the bytes themselves still work
        assert hold.id == cid and torch.equal(reg.table.data[hold.slot], expected(data))


def test_inline_adapter_is_held_from_load_to_submit() -> None:
    """Code review (issue 10): an inline adapter could be evicted between its load and the
    request's acquire, so a request that carried its own adapter got NOT_FOUND. hold_inline
    loads and holds in one critical section; until the request takes the hold over (or it is
    released) no other load can have the slot."""
    reg = make_registry(capacity=2, max_inline=1)
    a, b = adapter_bytes(1), adapter_bytes(2)
    hold = reg.hold_inline(a)  # loaded, not yet submitted
    with pytest.raises(RegistryFull, match="inline"):
        reg.hold_inline(b)  # the inline budget's one slot is held: b must wait
    reg.load("named", adapter_bytes(3))  # takes the free slot, never the held one
    with pytest.raises(RegistryFull):
        reg.load("named-2", adapter_bytes(4))
    slot = hold.take()  # what Engine.submit does
    assert torch.equal(reg.table.data[slot], expected(a)) and reg.get(hold.id).in_use == 1
    with pytest.raises(ValueError, match="already taken"):
        hold.take()
    hold.release()  # taken: the request releases the slot, not the hold
    assert reg.get(hold.id).in_use == 1
    reg.release(slot)
    with reg.hold_inline(b) as hb:  # a is idle now: b evicts it
        assert hb.slot == slot and torch.equal(reg.table.data[slot], expected(b))
    assert reg.get(hb.id).in_use == 0  # an untaken hold is released on leaving the block
    check_idle_invariants(reg)


class FailingTable(CoefficientTable):
    """Fault injection: `write` raises on the chosen calls (1-based), before touching data."""

    fail_on: frozenset[int] = frozenset()
    calls = 0

    def write(self, slot: int, coefs: torch.Tensor) -> None:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("injected table write failure")
        super().write(slot, coefs)


def bookkeeping(reg: AdapterRegistry) -> tuple:
    """Everything a failed operation must leave as it was (the table compared separately)."""
    ids = [(i.id, i.slot, i.in_use, i.source, i.nbytes, i.resident) for i in reg.list()]
    store = reg.store.records() if reg.store else None
    return (ids, list(reg._free), list(reg._refs), sorted(reg._retired),
            list(reg._idle_inline), list(reg._idle_named), reg._n_inline, store)


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize("fail_on", [set(), *({n} for n in range(1, 11)), {2, 4, 6, 8}])
def test_failed_table_write_changes_nothing(tmp_path: Path, durable: bool,
                                            fail_on: set[int]) -> None:
    """Code review (issue 10): _install retired and claimed slots before the table write, so a
    write failing during a replace leaked a slot and later handed one tenant's coefficients to
    another id. The write now goes first: whichever write fails (new loads, replaces of idle
    and in-use adapters, inline loads, evictions, reloads from the store), every id, slot,
    refcount, LRU order and manifest record is as before it, and the end state is sound."""
    store = tmp_path / "store" if durable else None
    reg = make_registry(capacity=4, store_dir=store, table_type=FailingTable, max_inline=2)
    reg.table.fail_on = frozenset(fail_on)
    v = {i: adapter_bytes(i) for i in range(1, 10)}
    want: dict[str, bytes] = {}  # id -> the bytes it must serve
    holds: list[int] = []

    def load(adapter_id: str, k: int) -> None:
        reg.load(adapter_id, v[k])
        want[adapter_id] = v[k]

    def inline(k: int, keep: bool) -> None:
        hold = reg.hold_inline(v[k])
        want[hold.id] = v[k]
        if keep:
            holds.append(hold.take())
        else:
            hold.release()

    def reacquire(adapter_id: str) -> None:
        holds.append(reg.acquire(adapter_id))

    def release() -> None:  # the latest hold (an op before may have failed to take one)
        if holds:
            reg.release(holds.pop())

    ops = [
        lambda: load("a", 1),  # new
        lambda: load("b", 2),  # new
        lambda: load("a", 3),  # replace of an idle adapter: in place
        lambda: reacquire("a"),
        lambda: load("a", 4),  # replace of an adapter in use: a new slot, the old one retires
        lambda: inline(5, keep=True),  # inline into the last free slot
        release,
        lambda: inline(6, keep=False),  # evicts the idle inline adapter
        release,  # the old "a" retires for good: its slot is free
        lambda: load("c", 7),
        lambda: load("d", 8),  # evicts the idle inline adapter
        lambda: load("e", 9),  # durable: evicts idle "a"; memory only: RegistryFull
        lambda: reacquire("a"),  # durable: reloaded from the store, evicting "b"
    ]
    for op in ops:
        before, table = bookkeeping(reg), reg.table.data.clone()
        try:
            op()
        except (RuntimeError, RegistryFull) as exc:
            assert "injected" in str(exc) or isinstance(exc, RegistryFull)
            assert bookkeeping(reg) == before and torch.equal(reg.table.data, table)
    for slot in holds:
        reg.release(slot)
    check_idle_invariants(reg)
    reg.table.fail_on = frozenset()
    for info in reg.list():  # every id serves exactly its last successfully loaded adapter
        slot = reg.acquire(info.id) if not info.inline else info.slot
        assert torch.equal(reg.table.data[slot], expected(want[info.id])), info.id
        if not info.inline:
            reg.release(slot)
    if durable:  # and the store agrees: a fresh registry over it serves the same
        fresh = make_registry(capacity=4, store_dir=store)
        named = {i.id for i in reg.list() if not i.inline}
        assert set(fresh.restore()) == named
        for adapter_id in named:
            slot = fresh.acquire(adapter_id)
            assert torch.equal(fresh.table.data[slot], expected(want[adapter_id]))
            fresh.release(slot)


def test_non_regular_files_are_refused_without_blocking(tmp_path: Path) -> None:
    """Finding 7 (issue 10): a named pipe in the adapter store hung LoadAdapter in open()
    (and with it the server's shutdown). Anything but a regular file is refused before a byte
    is read, as is a file over the size limit, both at LoadAdapter and at startup."""
    os.mkfifo(tmp_path / "pipe.safetensors")
    with open(tmp_path / "huge.safetensors", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    save_adapter(make_adapter(1), tmp_path / "ok.safetensors", base_fingerprint=FP)
    reg = make_registry(store_dir=tmp_path)
    outcome: list[object] = []

    def attempt() -> None:
        for name in ("pipe.safetensors", "huge.safetensors"):
            try:
                reg.load("x", name)
            except AdapterPathError as e:
                outcome.append(str(e))
        outcome.append(reg.restore())  # startup skips both (logged) and loads the good one

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "reading a named pipe blocked"
    assert outcome == ["cannot read adapter file 'pipe.safetensors': not a regular file",
                       "cannot read adapter file 'huge.safetensors': larger than the "
                       f"{MAX_FILE_BYTES}-byte limit", ["ok"]]
    assert reg.load_failures == 4

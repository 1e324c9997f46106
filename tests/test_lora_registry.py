"""The registry with LoRA kinds (issue 13): LoRA and NoRA++ adapters take a LoRA pool row with
their table slot; rows are freed with their slot and reused; a replace under a running request
keeps its LoRA; with every row taken, named loads evict the least recently used idle stored
adapter holding a row (slot and row together) and inline loads only inline ones, within their
budget; a failed write changes nothing. Small CPU pools, packed PEFT files made without peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nora_runtime.adapter import NoraAdapter, UnsupportedAdapter, adapter_to_bytes
from nora_runtime.lora import PROJECTIONS, pack_peft_files
from nora_runtime.lora_pool import LoraPool, LoraShapeMismatch
from nora_runtime.rational import base_coefficients
from nora_runtime.registry import AdapterRegistry, RegistryFull
from nora_runtime.table import CoefficientTable

FP = "cd" * 32
SITES, GROUPS, H, I = 2, 4, 8, 12
SHAPES = {"q_proj": (H, H), "k_proj": (H, 4), "v_proj": (H, 4), "o_proj": (H, H),
          "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def peft_bytes(seed: int, r: int = 2, targets=("q_proj", "down_proj"), **cfg) -> bytes:
    """A packed PEFT LoRA for the tiny shapes above (both layers, random factors)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for l in range(SITES):
        for m in targets:
            n_in, n_out = SHAPES[m]
            part = "self_attn" if m in PROJECTIONS[:4] else "mlp"
            key = f"base_model.model.model.layers.{l}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g)
    from safetensors.torch import save
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
              "bias": "none", "use_dora": False, **cfg}
    return pack_peft_files(config, save(tensors))


def nora(seed: int):
    torch.manual_seed(seed)
    m = NoraAdapter(base_coefficients("silu"), rank=3, alpha=6.0, groups=2,
                    site_names=[f"layers.{i}.mlp.act" for i in range(SITES)], act="silu",
                    mode="residual")
    with torch.no_grad():
        m.num_B.normal_(0.0, 0.1)
    return m


def nora_bytes(seed: int, lora: bool = False) -> bytes:
    lw = None
    if lora:
        from nora_runtime.adapter import LoraWeights
        g = torch.Generator().manual_seed(seed)
        lw = LoraWeights(rank=2, alpha=4.0, factors={
            "model.layers.0.self_attn.v_proj": (torch.randn(2, H, generator=g),
                                                torch.randn(4, 2, generator=g))})
    return adapter_to_bytes(nora(seed), base_fingerprint=FP, lora=lw)


class FailingTable(CoefficientTable):
    fail = False

    def write(self, slot: int, coefs: torch.Tensor) -> None:
        if self.fail:
            raise RuntimeError("injected table write failure")
        super().write(slot, coefs)


def make(capacity: int = 4, rows: int = 2, store: Path | None = None,
         **kw) -> AdapterRegistry:
    table = FailingTable(base_coefficients("silu"), slots=capacity + 1, groups=GROUPS,
                         sites=SITES)
    pool = LoraPool(slots=rows, rank=4, layers=SITES, shapes=SHAPES,
                    table_slots=table.num_slots)
    return AdapterRegistry(table, fingerprint=FP, mode="residual", act="silu", store_dir=store,
                           lora_pool=pool, **kw)


def lora_of(reg: AdapterRegistry, slot: int) -> torch.Tensor:
    """Pool row contents of `slot`'s adapter: q_proj A of layer 0 (zeros: none)."""
    pool = reg.lora_pool
    return pool.A[0, "q_proj"][pool.row[slot]].clone()


def check_invariants(reg: AdapterRegistry) -> None:
    """Nothing held: every row is free or the row of exactly one resident adapter with LoRA,
    and the pool's map agrees with the registry's."""
    infos = reg.list()
    rows = [i.lora_row for i in infos if i.lora_row]
    assert len(rows) == len(set(rows)) and len(rows) + reg.num_free_lora == reg.lora_capacity
    assert sorted(rows + reg._free_rows) == list(range(1, reg.lora_capacity + 1))
    for i in infos:
        assert (i.lora_row != 0) == (i.resident and i.kind in ("lora", "nora++")), i
        if i.resident:
            assert reg.lora_pool.row[i.slot] == i.lora_row
            assert reg.lora_pool.lora_only[i.slot] == (i.kind == "lora")
    assert sum(i.inline and i.lora_row != 0 for i in infos) <= reg.max_inline_lora


def test_kinds_take_rows_and_rows_are_freed_and_reused():
    reg = make()
    a = reg.load("a", peft_bytes(1))
    b = reg.load("b", nora_bytes(2, lora=True))
    n = reg.load("n", nora_bytes(3))
    assert [(i.kind, i.lora_rank, i.lora_targets) for i in (a, b, n)] == [
        ("lora", 2, ("q_proj", "down_proj")), ("nora++", 2, ("v_proj",)), ("nora", 0, ())]
    assert a.lora_row and b.lora_row and not n.lora_row and reg.num_free_lora == 0
    pool = reg.lora_pool
    assert pool.lora_only[a.slot] and not pool.lora_only[b.slot]
    assert torch.equal(reg.table.data[a.slot], reg.table.data[0])  # LoRA alone: base coefs
    assert pool.scale[0, "q_proj"][a.lora_row] == 2.0 and pool.scale[0, "k_proj"][a.lora_row] == 0
    assert torch.equal(pool.A[0, "q_proj"][a.lora_row][2:], torch.zeros(2, H))  # r 2 of 4
    with pytest.raises(RegistryFull, match="LoRA pool rows"):  # memory only: pinned
        reg.load("c", peft_bytes(4))
    reg.unload("a")
    assert reg.num_free_lora == 1 and pool.row[a.slot] == 0
    c = reg.load("c", peft_bytes(4))
    assert c.lora_row == a.lora_row
    reg.load("b", nora_bytes(5))  # replaced in place by a NoRA adapter: its row is freed
    assert reg.get("b").lora_row == 0 and reg.num_free_lora == 1
    check_invariants(reg)


def test_replace_under_a_running_request_keeps_its_lora():
    reg = make(rows=3)
    reg.load("a", peft_bytes(1))
    old = reg.acquire("a")
    before = lora_of(reg, old)
    new = reg.load("a", peft_bytes(2))
    assert new.slot != old and new.lora_row != reg.lora_pool.row[old]
    assert torch.equal(lora_of(reg, old), before)  # the running request's view
    assert not torch.equal(lora_of(reg, new.slot), before)
    reg.release(old)
    assert reg.lora_pool.row[old] == 0 and reg.num_free_lora == 2
    check_invariants(reg)


def test_lru_eviction_of_rows_with_a_durable_store(tmp_path):
    reg = make(capacity=6, rows=2, store=tmp_path)
    reg.load("a", peft_bytes(1))
    want_b = lora_of(reg, reg.load("b", peft_bytes(2)).slot)
    reg.load("n", nora_bytes(3))
    reg.release(reg.acquire("a"))  # a is the most recently used: b is evicted next
    reg.load("c", peft_bytes(4))
    assert not reg.get("b").resident and reg.get("a").resident and reg.get("n").resident
    assert reg.evictions == 1 and reg.num_free == 6 - 3
    held = [reg.acquire("a"), reg.acquire("c")]
    assert not reg.load("d", peft_bytes(5)).resident  # every row held: registered only
    with pytest.raises(RegistryFull, match="LoRA pool rows"):
        reg.acquire("b")
    for s in held:
        reg.release(s)
    slot_b = reg.acquire("b")  # reloaded from the store into a's row (a was released first)
    assert reg.get("b").lora_row and not reg.get("a").resident and reg.reloads == 1
    assert torch.equal(lora_of(reg, slot_b), want_b)
    reg.release(slot_b)
    check_invariants(reg)


def test_inline_lora_budget_evicts_only_inline_adapters():
    reg = make(capacity=6, rows=3, max_inline=4, max_inline_lora=1)
    reg.load("named", peft_bytes(1))
    first = reg.load_inline(peft_bytes(2))
    second = reg.load_inline(peft_bytes(3))  # over the inline budget: evicts the first
    assert {i.id for i in reg.list()} == {"named", second} and first != second
    with reg.hold_inline(peft_bytes(4)) as hold:  # evicts the second, then is held
        with pytest.raises(RegistryFull, match="inline LoRA pool rows are held"):
            reg.hold_inline(peft_bytes(5))
        assert reg.get(hold.id).kind == "lora"
    assert reg.load_inline(nora_bytes(6)).startswith("sha256:")  # NoRA inline: no row needed
    off = make(rows=2, max_inline_lora=0)
    with pytest.raises(RegistryFull, match="inline adapters with LoRA are disabled"):
        off.load_inline(peft_bytes(1))
    check_invariants(reg)


def test_failed_write_changes_nothing_and_mismatches_are_refused():
    reg = make(rows=2)
    reg.load("a", peft_bytes(1))
    reg.load("b", nora_bytes(2, lora=True))
    state = (reg.list(), list(reg._free), list(reg._free_rows), list(reg._row),
             list(reg.lora_pool.row))
    rows = {k: v.clone() for k, v in reg.lora_pool.A.items()}
    reg.table.fail = True
    with pytest.raises(RuntimeError, match="injected"):
        reg.load("b", nora_bytes(3, lora=True))  # replace in place: the table write fails
    reg.table.fail = False
    assert (reg.list(), list(reg._free), list(reg._free_rows), list(reg._row),
            list(reg.lora_pool.row)) == state
    assert all(torch.equal(rows[k], reg.lora_pool.A[k]) for k in rows)
    with pytest.raises(UnsupportedAdapter, match="rank 8 exceeds"):
        reg.load("big", peft_bytes(4, r=8))
    with pytest.raises(LoraShapeMismatch, match="q_proj is in=8"):
        reg.load("shape", _reshaped())
    check_invariants(reg)


def _reshaped() -> bytes:
    """A LoRA whose q_proj A has in=5 (the model's is 8)."""
    from safetensors.torch import save
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 5),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)}
    return pack_peft_files({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, save(t))


@pytest.mark.parametrize("durable", [False, True])
def test_random_operations_keep_slots_and_rows_consistent(tmp_path, durable):
    """600 seeded operations over all three kinds (loads, replaces, unloads, inline holds,
    acquires and releases, failures included): whenever nothing is held, every row and slot is
    accounted for, and every resident adapter reads its own latest factors."""
    import random

    rng = random.Random(0)
    reg = make(capacity=5, rows=3, store=tmp_path if durable else None, max_inline=2,
               max_inline_lora=1)
    makers = [lambda k: peft_bytes(k), lambda k: nora_bytes(k, lora=True), nora_bytes]
    held: list = []
    latest: dict[str, bytes] = {}
    for step in range(600):
        op = rng.random()
        k = rng.randrange(1000)
        data = makers[rng.randrange(3)](k % 7)
        try:
            if op < 0.3:
                adapter_id = rng.choice("abcdef")
                reg.load(adapter_id, data)
                latest[adapter_id] = data
            elif op < 0.4:
                reg.unload(rng.choice("abcdef"))
            elif op < 0.6:
                held.append(reg.acquire(rng.choice("abcdef")))
            elif op < 0.75:
                h = reg.hold_inline(data)
                held.append(h.take())
            elif held:
                reg.release(held.pop(rng.randrange(len(held))))
        except (RegistryFull, KeyError):
            pass
        if not held or step == 599:
            for s in held:
                reg.release(s)
            held = []
            check_invariants(reg)
    assert reg.loads > 100 and reg.inline_evictions > 10 and (reg.reloads > 5 or not durable)
    for info in reg.list():
        if info.inline or not info.resident:
            continue
        fresh = make(capacity=1, rows=1)
        want = fresh.load("x", latest[info.id])
        assert torch.equal(lora_of(reg, info.slot), lora_of(fresh, want.slot)), info.id
        assert torch.equal(reg.table.data[info.slot], fresh.table.data[want.slot]), info.id

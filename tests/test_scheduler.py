"""Scheduler and block allocator, pure Python: a simulated engine loop runs random requests to
completion with the bookkeeping invariants checked every step, against a fake KV cache that
catches blocks shared between sequences or KV that was dropped and not recomputed; chunked
prefill, abort, KV exhaustion (preemption), impossible requests and the tenant fairness guard."""

from __future__ import annotations

import ast
import itertools
import random
import zlib
from pathlib import Path

import pytest

from nora_runtime import scheduler as scheduler_module
from nora_runtime.config import EngineConfig
from nora_runtime.scheduler import (
    BlockAllocator,
    ScheduledBatch,
    Scheduler,
    SeqStatus,
    Sequence,
    cdiv,
)


def config(**kw: object) -> EngineConfig:
    # admission_skip_seconds=0: admission stops at the first seq that does not fit (FCFS)
    base = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, block_size=4,
                admission_skip_seconds=0.0)
    return EngineConfig(**{**base, **kw})


_arrivals = itertools.count()


def seq(rid: str, prompt_len: int, new_tokens: int, tenant: str = "", slot: int = 0) -> Sequence:
    """A request whose prompt tokens are derived from its id (so mix-ups show)."""
    prompt = [next_token(rid, i) for i in range(prompt_len)]
    return Sequence(rid, prompt, max_tokens=prompt_len + new_tokens, slot=slot, tenant=tenant,
                    arrival=next(_arrivals))


def next_token(rid: str, index: int) -> int:
    """The fake model's token at `index` of request `rid`: deterministic, so a recomputed
    (preempted) sequence must end with exactly the tokens it would have had."""
    return zlib.crc32(f"{rid}:{index}".encode()) % 50_000


class FakeRunner:
    """Stands in for the model runner: builds its inputs from the batch's flat views, writes
    (request, position, token) into a KV array through the block tables, and on every sampled
    row checks that the whole context reads back as the seq's own tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.kv: list[tuple[str, int, int] | None] = [None] * (num_blocks * block_size)
        self.bs = block_size
        self.computed: dict[str, list[int]] = {}  # request -> positions computed, in order

    def row(self, table: list[int], pos: int) -> int:
        return table[pos // self.bs] * self.bs + pos % self.bs

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        owners = [i for i, n in enumerate(batch.num_new_tokens) for _ in range(n)]
        assert len(owners) == len(batch.token_ids) == len(batch.positions) == len(batch.slots)
        tables = batch.block_tables
        for i, tok, pos, slot in zip(owners, batch.token_ids, batch.positions, batch.slots,
                                     strict=True):
            s = batch.seqs[i]
            assert slot == s.slot and tok == s.tokens[pos]
            self.kv[self.row(tables[i], pos)] = (s.request_id, pos, tok)
            self.computed.setdefault(s.request_id, []).append(pos)
        out: list[int | None] = []
        for i, s in enumerate(batch.seqs):
            ctx = batch.context_lens[i]
            if not batch.sample[i]:
                out.append(None)
                continue
            assert ctx == s.num_tokens
            got = [self.kv[self.row(tables[i], p)] for p in range(ctx)]
            assert got == [(s.request_id, p, t) for p, t in enumerate(s.tokens)]
            out.append(next_token(s.request_id, ctx))
        assert [owners[j] for j in batch.sample_indices] == [
            i for i, want in enumerate(batch.sample) if want]
        return out


def check_invariants(sched: Scheduler, batch: ScheduledBatch | None = None) -> None:
    cfg, alloc = sched.config, sched.allocator
    tables = [b for s in sched.running for b in s.block_table]
    assert len(tables) == len(set(tables)), "a block in two tables"
    assert alloc.num_free + len(tables) == alloc.num_blocks, "blocks leaked or double counted"
    assert not {id(s) for s in sched.waiting} & {id(s) for s in sched.running}
    assert all(s.status is SeqStatus.WAITING and not s.block_table and s.num_computed == 0
               for s in sched.waiting)
    assert all(s.status is SeqStatus.RUNNING for s in sched.running)
    assert [s.arrival for s in sched.running] == sorted(s.arrival for s in sched.running)
    assert sched.num_running <= cfg.max_num_seqs
    for s in sched.running:  # blocks cover the KV written so far
        assert len(s.block_table) >= cdiv(s.num_computed, cfg.block_size)
    if batch is not None:
        assert batch.num_tokens <= cfg.max_num_batched_tokens
        assert len(batch.seqs) <= cfg.max_num_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        for s, c, n in zip(batch.seqs, batch.num_cached, batch.num_new_tokens, strict=True):
            assert n >= 1 and len(s.block_table) >= cdiv(c + n, cfg.block_size)


def step(sched: Scheduler, runner: FakeRunner) -> ScheduledBatch | None:
    """One engine iteration: schedule, run, postprocess, finish at the length cap."""
    batch = sched.schedule()
    if batch is None:
        return None
    check_invariants(sched, batch)
    sched.postprocess(batch, runner.run(batch))
    for s, want in zip(batch.seqs, batch.sample, strict=True):
        if want and s.num_tokens == s.max_tokens:
            sched.finish(s, "length")
    check_invariants(sched)
    return batch


def make(cfg: EngineConfig, num_blocks: int) -> tuple[Scheduler, FakeRunner]:
    return Scheduler(cfg, num_blocks), FakeRunner(num_blocks, cfg.block_size)


def expected_output(s: Sequence) -> list[int]:
    n = len(s.prompt_ids)
    return [next_token(s.request_id, i) for i in range(n, s.max_tokens)]


@pytest.mark.parametrize("seats,budget,blocks,bs,tenants,abort_p", [
    (8, 32, 400, 4, 1, 0.0),   # generous KV: no preemption, FCFS admission checked
    (8, 16, 20, 4, 1, 0.0),    # tight KV: preemptions
    (16, 16, 40, 2, 1, 0.0),   # budget equal to the seat count
    (4, 64, 10, 8, 3, 0.0),    # three tenants, tight KV, big blocks
    (8, 24, 30, 4, 4, 0.02),   # tenants and random aborts
])
def test_random_requests_run_to_completion(seats: int, budget: int, blocks: int, bs: int,
                                           tenants: int, abort_p: float) -> None:
    cfg = config(max_num_seqs=seats, max_num_batched_tokens=budget, block_size=bs,
                 max_model_len=min(64, blocks * bs))
    sched, runner = make(cfg, blocks)
    rng = random.Random(seats * 1000 + budget)
    pending = []
    for i in range(200):
        plen = rng.randint(1, cfg.max_model_len - 1)
        pending.append(seq(f"r{i}", plen, rng.randint(1, cfg.max_model_len - plen),
                           tenant=f"t{rng.randrange(tenants)}", slot=rng.randrange(5)))
    added, aborted, admitted = [], set(), []
    for _ in range(100_000):
        for _ in range(min(rng.randint(0, 3), len(pending))):  # requests join between steps
            added.append(pending.pop(0))
            sched.add(added[-1])
        if rng.random() < abort_p and sched.has_work:
            victim = rng.choice([s for s in added if s.status is not SeqStatus.FINISHED])
            assert sched.abort(victim.request_id) is victim and not victim.block_table
            aborted.add(victim.request_id)
            check_invariants(sched)
        batch = step(sched, runner)
        if batch is not None:
            admitted += [s.request_id for s, c in zip(batch.seqs, batch.num_cached, strict=True)
                         if c == 0 and s.request_id not in admitted]
        if not pending and not sched.has_work:
            break
        assert batch is not None or not sched.has_work, "stalled with work left"
    else:
        pytest.fail("requests did not finish")
    assert sched.allocator.num_free == blocks and sched.kv_usage == 0.0
    for s in added:
        assert s.status is SeqStatus.FINISHED
        if s.request_id not in aborted:
            assert s.finish_reason == "length" and s.output_ids == expected_output(s)
            computed = runner.computed[s.request_id]  # every position, the last one excepted
            assert set(computed) == set(range(s.max_tokens - 1))
    if tenants == 1:  # one tenant: first admissions in arrival order
        assert admitted == [s.request_id for s in added if s.request_id in admitted]
    if blocks <= 20:
        assert sched.preemptions > 0


def test_chunked_prefill_covers_the_prompt_once() -> None:
    cfg = config(max_num_batched_tokens=8)
    sched, runner = make(cfg, 64)
    old = seq("old", 3, 20)
    sched.add(old)
    step(sched, runner)  # old is now decoding
    long = seq("long", 30, 2)
    sched.add(long)
    chunks = []
    while long.status is not SeqStatus.FINISHED:
        batch = step(sched, runner)
        assert batch is not None
        # the decode goes first, then the prefill chunk takes the rest of the budget
        assert batch.seqs[0] is old and batch.num_new_tokens[0] == 1
        i = batch.seqs.index(long)
        chunks.append((batch.num_cached[i], batch.num_new_tokens[i], batch.sample[i]))
    assert chunks == [(0, 7, False), (7, 7, False), (14, 7, False), (21, 7, False),
                      (28, 2, True), (30, 1, True)]
    assert runner.computed["long"] == list(range(31))
    assert long.output_ids == expected_output(long)


def test_prefill_is_not_chunked_when_it_fits() -> None:
    sched, runner = make(config(max_num_batched_tokens=64), 64)
    a, b = seq("a", 20, 1), seq("b", 30, 1)
    sched.add(a)
    sched.add(b)
    batch = step(sched, runner)
    assert batch is not None and batch.num_new_tokens == (20, 30) and batch.sample == (True, True)
    assert batch.positions == [*range(20), *range(30)] and batch.sample_indices == [19, 49]
    assert batch.context_lens == [20, 30]


def test_abort_waiting_and_running_frees_blocks_at_once() -> None:
    cfg = config(max_num_seqs=2)
    sched, runner = make(cfg, 64)
    seqs = [seq(f"r{i}", 10, 50) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched, runner)
    assert [s.status for s in seqs] == [SeqStatus.RUNNING] * 2 + [SeqStatus.WAITING]
    used = 64 - sched.allocator.num_free
    assert used == sum(len(s.block_table) for s in seqs[:2]) > 0

    assert sched.abort("r2") is seqs[2]  # waiting
    assert seqs[2].status is SeqStatus.FINISHED and seqs[2].finish_reason == "abort"
    assert sched.num_waiting == 0

    freed = len(seqs[0].block_table)
    assert sched.abort("r0") is seqs[0]  # running: blocks back before the next step
    assert sched.allocator.num_free == 64 - used + freed and not seqs[0].block_table
    assert sched.num_running == 1 and sched.abort("r0") is None and sched.abort("nope") is None
    check_invariants(sched)

    batch = sched.schedule()  # aborted mid-step: postprocess skips it
    assert batch is not None and batch.seqs == (seqs[1],)
    sched.abort("r1")
    sched.postprocess(batch, [123])
    assert seqs[1].output_ids == [next_token("r1", 10)]
    assert sched.allocator.num_free == 64 and not sched.has_work


def test_kv_exhaustion_preempts_and_every_request_finishes() -> None:
    cfg = config(max_num_seqs=6, block_size=4)
    sched, runner = make(cfg, 12)  # 48 tokens of KV for 6 requests of up to 40 tokens
    seqs = [seq(f"r{i}", 4, 36) for i in range(6)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work:
        assert step(sched, runner) is not None, "stalled"
        steps += 1
        assert steps < 10_000
    assert sched.preemptions > 0
    assert all(s.output_ids == expected_output(s) and len(s.output_ids) == 36 for s in seqs)
    assert sched.allocator.num_free == 12


def test_preempted_sequence_keeps_its_output_and_goes_first() -> None:
    cfg = config(max_num_seqs=4, block_size=4)
    sched, runner = make(cfg, 4)
    old, new, later = seq("old", 4, 12), seq("new", 4, 12), seq("later", 1, 1)
    sched.add(old)
    sched.add(new)
    for _ in range(4):  # both decode through their first block, into a second
        step(sched, runner)
    sched.add(later)
    while new.status is SeqStatus.RUNNING:
        step(sched, runner)
    # new, the more recent arrival, was preempted: its KV is dropped, its output kept
    assert new.status is SeqStatus.WAITING and new.output_ids and new.num_computed == 0
    assert list(sched.waiting) == [new, later]
    n_out = len(new.output_ids)
    while sched.has_work:
        step(sched, runner)
    assert runner.computed["new"][:new.num_tokens].count(0) == 2  # recomputed from position 0
    assert new.output_ids[:n_out] == expected_output(new)[:n_out]
    assert new.output_ids == expected_output(new) and old.output_ids == expected_output(old)


def test_impossible_requests_are_rejected_at_add() -> None:
    sched = Scheduler(config(max_model_len=100, block_size=4), num_blocks=20)  # 80 KV tokens
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(seq("long", 10, 91))
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(seq("big", 10, 71))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(seq("empty", 0, 5))
    with pytest.raises(ValueError, match="no room"):
        sched.add(Sequence("zero", [1, 2, 3], max_tokens=3))
    sched.add(seq("fits", 10, 70))  # exactly the whole cache
    with pytest.raises(ValueError, match="already in flight"):
        sched.add(seq("fits", 1, 1))
    assert sched.num_waiting == 1
    runner = FakeRunner(20, 4)
    while sched.has_work:
        step(sched, runner)
    assert sched.allocator.num_free == 20


def test_unfinished_sequence_at_max_tokens_is_an_engine_error() -> None:
    sched, runner = make(config(), 16)
    s = seq("r", 3, 1)
    sched.add(s)
    batch = sched.schedule()
    assert batch is not None
    sched.postprocess(batch, runner.run(batch))
    with pytest.raises(RuntimeError, match="must finish"):
        sched.schedule()
    with pytest.raises(RuntimeError, match="twice"):
        sched.postprocess(batch, [1])


def run_until(sched: Scheduler, runner: FakeRunner, done, max_steps: int) -> int:
    for n in range(1, max_steps + 1):
        step(sched, runner)
        if done():
            return n
    pytest.fail(f"not done after {max_steps} steps")


@pytest.mark.parametrize("b_arrives_late", [False, True])
def test_one_tenants_burst_does_not_starve_another(b_arrives_late: bool) -> None:
    cfg = config(max_num_seqs=8, max_num_batched_tokens=512, tenant_share=0.5)
    sched, runner = make(cfg, 1000)
    burst = [seq(f"a{i}", 8, 20, tenant="A") for i in range(100)]
    others = [seq(f"b{i}", 8, 20, tenant="B") for i in range(5)]
    for s in burst:
        sched.add(s)
    if b_arrives_late:  # A alone fills every seat first
        step(sched, runner)
        assert [s.tenant for s in sched.running] == ["A"] * 8
    for s in others:
        sched.add(s)
    # B needs at most one A request's lifetime (21 steps) for a first free seat, and one more
    # lifetime for its fifth request; A's 100 requests take more than 12 lifetimes
    steps = run_until(sched, runner, lambda: all(s.status is not SeqStatus.WAITING
                                                 for s in others), max_steps=2 * 21 + 1)
    assert sum(s.status is SeqStatus.FINISHED for s in burst) < 20
    if not b_arrives_late:
        assert steps == 21  # four seats each at once; b4 takes the first seat that frees
    while sched.has_work:  # skipped, not dropped
        step(sched, runner)
    assert all(s.output_ids == expected_output(s) for s in burst + others)


def test_a_tenant_alone_fills_every_seat() -> None:
    sched, runner = make(config(max_num_seqs=8, tenant_share=0.25), 1000)
    for i in range(20):
        sched.add(seq(f"a{i}", 2, 5, tenant="A"))
    batch = step(sched, runner)
    assert batch is not None and len(batch.seqs) == 8 and sched.num_running == 8


def test_guarded_tenants_still_fill_free_seats() -> None:
    """Two tenants each at a quarter share: the guard must not leave half the seats empty."""
    sched, runner = make(config(max_num_seqs=8, tenant_share=0.25), 1000)
    for i in range(10):
        sched.add(seq(f"a{i}", 2, 5, tenant="A"))
        sched.add(seq(f"b{i}", 2, 5, tenant="B"))
    step(sched, runner)
    assert sched.num_running == 8


def test_guard_skips_only_the_over_share_tenant_in_order() -> None:
    sched, runner = make(config(max_num_seqs=4, tenant_share=0.5), 1000)
    order = [("a0", "A"), ("a1", "A"), ("a2", "A"), ("b0", "B"), ("a3", "A"), ("c0", "C")]
    seqs = {rid: seq(rid, 2, 5, tenant=t) for rid, t in order}
    for s in seqs.values():
        sched.add(s)
    step(sched, runner)
    assert [s.request_id for s in sched.running] == ["a0", "a1", "b0", "c0"]
    assert [s.request_id for s in sched.waiting] == ["a2", "a3"]  # kept, in order


def test_guard_keeps_each_tenants_own_order() -> None:
    """a3 is held back while b0 waits; once b0 is in, A's one free seat is a3's, not a4's."""
    sched, runner = make(config(max_num_seqs=5, tenant_share=0.6), 1000)  # 3 seats per tenant
    for i in range(3):
        sched.add(seq(f"a{i}", 2, 9, tenant="A"))
    step(sched, runner)
    for rid, tenant in (("a3", "A"), ("b0", "B"), ("a4", "A")):
        sched.add(seq(rid, 2, 9, tenant=tenant))
    step(sched, runner)
    assert [s.request_id for s in sched.running] == ["a0", "a1", "a2", "a3", "b0"]
    assert [s.request_id for s in sched.waiting] == ["a4"]


def test_block_allocator() -> None:
    alloc = BlockAllocator(4, 16)
    a = alloc.allocate(3)
    assert sorted(a) == [0, 1, 2] and alloc.num_free == 1 and alloc.can_allocate(1)
    with pytest.raises(RuntimeError):
        alloc.allocate(2)
    assert alloc.num_free == 1
    alloc.free(a[:1])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a[:2])  # a[0] again: nothing is freed
    assert alloc.num_free == 2
    alloc.free(a[1:])
    assert alloc.num_free == 4 and sorted(alloc.allocate(4)) == [0, 1, 2, 3]


def test_sequence_token_views() -> None:
    s = Sequence("r", [1, 2, 3], max_tokens=10, output_ids=[4, 5])
    assert s.tokens == [1, 2, 3, 4, 5] and s.num_tokens == 5
    for start, stop in itertools.combinations(range(6), 2):
        assert s.token_slice(start, stop) == s.tokens[start:stop]
    assert s.num_pending == 5 and s.is_prefill
    s.num_computed = 4
    assert not s.is_prefill and s.blocks_needed(1, 4) == 2
    s.block_table = [7]
    assert s.blocks_needed(1, 4) == 1 and s.blocks_needed(0, 4) == 0


def test_scheduler_module_does_not_import_torch() -> None:
    """DESIGN.md s2: the scheduler never touches torch.cuda; it does not even import torch."""
    tree = ast.parse(Path(scheduler_module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    runtime = [m for m in names if m != "nora_runtime.config"]  # only under TYPE_CHECKING
    assert not [m for m in runtime if m.split(".")[0] in ("torch", "triton", "nora_runtime")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_blocked_long_prompt_lets_small_ones_pass_for_a_bounded_time_only() -> None:
    """A prompt whose blocks do not fit no longer holds back small prompts that fit (issue 10:
    "admission stops at the first prompt that does not fit"), but only for
    admission_skip_seconds: then admission waits for it, so it is never starved."""
    cfg = config(max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
                 admission_skip_seconds=5.0, kv_watermark=0.0)
    sched, runner = make(cfg, 16)  # 64 tokens of KV
    sched.clock = clock = FakeClock()
    hog = seq("hog", 40, 8)  # 10 blocks, 12 with its output
    sched.add(hog)
    step(sched, runner)
    long = seq("long", 32, 4)  # 8 blocks: does not fit next to the hog
    sched.add(long)
    small = seq("small", 4, 4)
    sched.add(small)
    step(sched, runner)
    assert long.status is SeqStatus.WAITING and small.status is SeqStatus.RUNNING
    clock.now = 5.0  # long has waited its bounded time: nothing passes it any more
    late = seq("late", 4, 4)
    sched.add(late)
    while long.status is SeqStatus.WAITING:  # the hog's blocks go to long, not late first
        step(sched, runner)
        assert late.status is SeqStatus.WAITING or long.status is not SeqStatus.WAITING
    while sched.has_work:
        step(sched, runner)
    assert long.output_ids == expected_output(long) and late.output_ids == expected_output(late)


def test_admission_leaves_the_watermark_free_for_running_seqs() -> None:
    cfg = config(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_watermark=0.25)
    sched, runner = make(cfg, 16)  # watermark: 4 blocks
    first = seq("first", 48, 4)  # 12 blocks: admitted, nothing runs yet
    sched.add(first)
    step(sched, runner)
    assert first.status is SeqStatus.RUNNING
    second = seq("second", 4, 4)  # 1 block would leave 3 < 4 free
    sched.add(second)
    step(sched, runner)
    assert second.status is SeqStatus.WAITING
    while first.status is not SeqStatus.FINISHED:
        step(sched, runner)
    step(sched, runner)
    assert second.status is not SeqStatus.WAITING


def test_config_refuses_a_token_budget_below_the_seats() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=16, max_num_batched_tokens=8)
    for bad in ({"kv_watermark": 1.0}, {"kv_watermark": -0.1},
                {"admission_skip_seconds": float("inf")}, {"admission_skip_seconds": -1.0},
                {"max_consecutive_step_failures": 0}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)

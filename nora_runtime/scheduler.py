"""Continuous-batching scheduler and paged-KV block allocator (DESIGN.md s2). Pure Python: the
model runner owns every tensor, including the KV cache that the block ids here index.

The engine loop is three calls:

    batch = scheduler.schedule()            # who computes which tokens this step
    sampled = ...runner.run(batch)...       # one token per seq with batch.sample[i], else None
    scheduler.postprocess(batch, sampled)   # advance the seqs; the engine then finish()es stops

Requests join (`add`) and leave (`finish`, `abort`) between steps. One step, in this order:

1. Decodes: running seqs with one pending token, oldest arrival first, 1 token each. They go
   first so that running requests keep their inter-token latency.
2. Continuing prefills: running seqs with more pending tokens get chunks of the budget left.
3. Admission: waiting seqs, first come first served, while the token budget
   (max_num_batched_tokens), the seats (max_num_seqs) and free KV blocks allow. A prompt longer
   than the budget left is chunked (chunked prefill): it computes what fits now, the rest in
   later steps (2.). Admission leaves a watermark of free blocks (kv_watermark of the cache)
   for running seqs to grow into, unless nothing runs.

KV blocks. Admission reserves blocks for every known token of the seq at once, so a chunked
prefill never stalls halfway for lack of blocks; after that a seq grows by one block every
block_size decoded tokens. When a decode needs a block and none is free, the newest running seq
(largest arrival) is preempted: its blocks are freed, its KV is dropped (num_computed = 0, its
output_ids are kept) and it returns to the front of the waiting queue, to recompute prompt and
output as one prefill when readmitted. The oldest running seq can therefore always grow (`add`
rejects a request whose full length exceeds the whole cache), so every request finishes.
A waiting seq whose blocks do not fit is skipped, and smaller ones behind it are admitted, for
at most admission_skip_seconds from the first time it did not fit; after that admission stops
at it until it fits, so a long prompt (or a preempted seq, back at the front) holds back the
others for a bounded time at most and is never starved by them.

Fairness guard. While requests of other tenants are waiting, one tenant may hold at most
max(1, int(tenant_share * max_num_seqs)) running seats; its waiting requests are skipped (kept
in place, in order) in favour of the next tenant's. When no other tenant waits, or every waiting
tenant already holds its share, the seats left go first come first served: the guard reorders
admission, it never leaves a seat empty. Nor does it preempt: a tenant that arrives while a
burst holds all seats gets the next seat that frees, ahead of the burst's remaining requests.

Not thread-safe: the engine calls every method from its loop thread, and applies aborts that
arrive from elsewhere at a step boundary.
"""

from __future__ import annotations

import bisect
import enum
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: importing the config module would import torch
    from nora_runtime.config import EngineConfig


def cdiv(a: int, b: int) -> int:
    """Ceiling division: blocks that hold `a` tokens at `b` tokens per block."""
    return -(-a // b)


class BlockAllocator:
    """Free list of KV cache blocks. Block b is rows b * block_size .. (b + 1) * block_size - 1
    of the runner's KV tensors; the allocator hands out ids and never sees the tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks, block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop from the end: low ids first
        self._in_use = [False] * num_blocks  # catches double frees before they corrupt the list

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n free block ids; raises RuntimeError (and allocates nothing) if fewer are free."""
        if not 0 <= n <= len(self._free):
            raise RuntimeError(f"cannot allocate {n} KV blocks: {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._in_use[b] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list; all or nothing, so a bad call leaves no half state."""
        if len(set(blocks)) != len(blocks) or not all(self._in_use[b] for b in blocks):
            raise ValueError(f"freeing blocks that are not allocated (double free?): {blocks}")
        for b in blocks:
            self._in_use[b] = False
        self._free.extend(reversed(blocks))


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two requests with equal fields are still two requests
class Sequence:
    """One request's tokens and cache state. Tokens 0 .. num_computed - 1 have their KV in the
    cache (in the blocks of block_table); tokens num_computed .. num_tokens - 1 are pending and
    are computed in the seq's next steps. In decode exactly one token (the last sampled) is
    pending; a new or preempted seq has all its tokens pending."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # cap on prompt + generated tokens: the total length the seq may reach
    slot: int = 0  # coefficient-table slot of its adapter (0 = base), acquired by the engine
    tenant: str = ""  # the unit of the fairness guard (the engine: the caller's tenant)
    adapter: str = ""  # its adapter's id ("": the base), for per-adapter metrics only
    arrival: float = field(default_factory=time.monotonic)  # FCFS and preemption order
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    blocked_since: float | None = None  # when admission first found its blocks did not fit

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens(self) -> list[int]:
        """All known token ids (a new list): prompt then output."""
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        """Tokens to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_pending > 1

    def token_slice(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop] without concatenating the whole sequence (decode reads one)."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(start - p, 0):max(stop - p, 0)]

    def blocks_needed(self, n: int, block_size: int) -> int:
        """Blocks to add to block_table so that the KV of n more tokens fits."""
        return max(cdiv(self.num_computed + n, block_size) - len(self.block_table), 0)


@dataclass(frozen=True)
class ScheduledBatch:
    """One step: seqs[i] computes tokens num_cached[i] .. num_cached[i] + num_new_tokens[i] - 1
    (a prefill chunk, or 1 token in decode) and, when sample[i], a token is sampled from the
    logits of its last one. num_cached is a snapshot taken at schedule(), so the flat views below
    stay right after postprocess() advances the seqs; block_tables are the seqs' live tables,
    valid until the engine finishes or aborts a seq."""

    seqs: tuple[Sequence, ...]
    num_new_tokens: tuple[int, ...]
    num_cached: tuple[int, ...]
    sample: tuple[bool, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def token_ids(self) -> list[int]:
        """Input token ids of all seqs, concatenated in seq order: [num_tokens]."""
        return [t for s, c, n in self._spans() for t in s.token_slice(c, c + n)]

    @property
    def positions(self) -> list[int]:
        """Position of each input token in its own sequence: [num_tokens]."""
        return [p for _, c, n in self._spans() for p in range(c, c + n)]

    @property
    def slots(self) -> list[int]:
        """Adapter slot of each input token: [num_tokens]."""
        return [s.slot for s, _, n in self._spans() for _ in range(n)]

    @property
    def context_lens(self) -> list[int]:
        """KV length each seq attends over once this step's tokens are written: [num_seqs]."""
        return [c + n for _, c, n in self._spans()]

    @property
    def block_tables(self) -> list[list[int]]:
        return [s.block_table for s in self.seqs]

    @property
    def sample_indices(self) -> list[int]:
        """Rows of the flat token list whose logits are sampled: [sum(sample)]."""
        ends, total = [], 0
        for n, want in zip(self.num_new_tokens, self.sample, strict=True):
            total += n
            if want:
                ends.append(total - 1)
        return ends

    def _spans(self) -> zip[tuple[Sequence, int, int]]:
        return zip(self.seqs, self.num_cached, self.num_new_tokens, strict=True)


def _decrement(counter: Counter[str], key: str) -> None:
    """Counter minus one, dropping zero entries so that len(counter) counts live keys."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


class Scheduler:
    """Decides each step's batch (see the module docstring for the rules); never touches torch."""

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.config = config
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()  # admission order; preempted seqs at the front
        self.running: list[Sequence] = []  # sorted by arrival: the newest is the victim
        self.preemptions = 0  # total, for metrics
        self._live: dict[str, Sequence] = {}
        self._seat_cap = max(1, int(config.tenant_share * config.max_num_seqs))
        self._watermark = int(config.kv_watermark * num_blocks)  # blocks admission leaves free
        self.clock = time.monotonic  # replaceable in tests
        self._running_per_tenant: Counter[str] = Counter()
        self._waiting_per_tenant: Counter[str] = Counter()  # keys = tenants that have waiters

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def add(self, seq: Sequence) -> None:
        """Queue a new request. Raises ValueError for a request that could never run (the
        server maps it to INVALID_ARGUMENT), so that no request is accepted and then stuck."""
        bs, blocks = self.config.block_size, self.allocator.num_blocks
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        if seq.status is not SeqStatus.WAITING or seq.num_computed or seq.block_table:
            raise ValueError(f"request {seq.request_id!r}: only a new sequence can be added")
        if not seq.prompt_ids:
            raise ValueError(f"request {seq.request_id!r}: empty prompt")
        if seq.max_tokens <= seq.num_tokens:
            raise ValueError(f"request {seq.request_id!r}: max_tokens {seq.max_tokens} leaves "
                             f"no room to generate after {seq.num_tokens} tokens")
        if seq.max_tokens > self.config.max_model_len:
            raise ValueError(f"request {seq.request_id!r}: {seq.max_tokens} tokens exceed "
                             f"max_model_len {self.config.max_model_len}")
        if cdiv(seq.max_tokens, bs) > blocks:
            raise ValueError(f"request {seq.request_id!r}: {seq.max_tokens} tokens exceed the "
                             f"KV cache ({blocks * bs} tokens)")
        self._live[seq.request_id] = seq
        self.waiting.append(seq)
        self._waiting_per_tenant[seq.tenant] += 1

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a waiting or running request now, freeing its blocks; None if unknown."""
        seq = self._live.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a seq for good and free its blocks (the engine decides when: stop token,
        stop string, length, abort)."""
        if self._live.get(seq.request_id) is not seq:
            raise ValueError(f"request {seq.request_id!r} is not in flight")
        del self._live[seq.request_id]
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            _decrement(self._running_per_tenant, seq.tenant)
            self._release(seq)
        else:
            self.waiting.remove(seq)
            _decrement(self._waiting_per_tenant, seq.tenant)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing can run."""
        for seq in self.running:
            if seq.num_tokens >= seq.max_tokens:
                raise RuntimeError(f"request {seq.request_id!r} reached max_tokens but was "
                                   "not finished: the engine must finish() it")
        plan: list[tuple[Sequence, int]] = []
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_decodes(plan, budget)
        budget = self._schedule_prefills(plan, budget)
        self._admit(plan, budget)
        if not plan:
            return None
        seqs = tuple(s for s, _ in plan)
        return ScheduledBatch(
            seqs=seqs,
            num_new_tokens=tuple(n for _, n in plan),
            num_cached=tuple(s.num_computed for s in seqs),
            sample=tuple(s.num_computed + n == s.num_tokens for s, n in plan),
        )

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """Advance the batch's seqs: num_computed by their chunk, and the sampled token appended
        where batch.sample. sampled[i] belongs to batch.seqs[i] (None where not sampled). A seq
        aborted while its step ran is skipped. Stopping is the engine's call (finish)."""
        for seq, start, n, want, token in zip(batch.seqs, batch.num_cached,
                                              batch.num_new_tokens, batch.sample, sampled,
                                              strict=True):
            if seq.status is not SeqStatus.RUNNING:
                continue
            if seq.num_computed != start:
                raise RuntimeError(f"request {seq.request_id!r}: batch postprocessed twice")
            seq.num_computed += n
            if want:
                if token is None:
                    raise ValueError(f"request {seq.request_id!r}: no token sampled")
                seq.output_ids.append(token)

    def _schedule_decodes(self, plan: list[tuple[Sequence, int]], budget: int) -> int:
        """One token per decoding seq, oldest first, preempting the newest for blocks. The
        newest running seq is never one already planned: those are all older than the current
        seq, since both lists are in arrival order."""
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is SeqStatus.RUNNING and not seq.is_prefill and self._grow(seq):
                plan.append((seq, 1))
                budget -= 1
        return budget

    def _schedule_prefills(self, plan: list[tuple[Sequence, int]], budget: int) -> int:
        """Chunks for running seqs still in prefill; their blocks were reserved at admission."""
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefill:
                n = min(seq.num_pending, budget)
                plan.append((seq, n))
                budget -= n
        return budget

    def _admit(self, plan: list[tuple[Sequence, int]], budget: int) -> None:
        """Admit waiting seqs FCFS under the budget, seat and block limits, first with the
        fairness guard, then, if only guarded tenants are left waiting, without it."""
        budget, exhausted = self._admit_pass(plan, budget, fair=True)
        if exhausted:
            self._admit_pass(plan, budget, fair=False)

    def _admit_pass(self, plan: list[tuple[Sequence, int]], budget: int,
                    fair: bool) -> tuple[int, bool]:
        """One FCFS pass over the waiting queue; returns the budget left and whether the pass
        ran out of candidates (rather than of budget, seats or blocks). Once a tenant is
        skipped, its later requests are skipped too, which keeps each tenant's order FCFS."""
        skipped: list[Sequence] = []
        blocked: set[str] = set()
        exhausted = False
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            if not self.waiting:
                exhausted = True
                break
            seq = self.waiting.popleft()
            if fair and (seq.tenant in blocked or self._over_share(seq.tenant)):
                blocked.add(seq.tenant)
                skipped.append(seq)
                continue
            need = seq.blocks_needed(seq.num_pending, self.config.block_size)
            if not self._fits(need):
                if self._may_skip(seq):
                    skipped.append(seq)  # smaller ones behind it may fit
                    continue
                self.waiting.appendleft(seq)  # waited long enough: hold the blocks for it
                break
            self._start(seq, need)
            n = min(seq.num_pending, budget)
            plan.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget, exhausted

    def _fits(self, need: int) -> bool:
        """Whether admitting a seq that needs `need` blocks leaves the watermark free (or,
        with nothing running, whether the blocks are there at all)."""
        reserve = self._watermark if self.running else 0
        return self.allocator.num_free - need >= reserve

    def _may_skip(self, seq: Sequence) -> bool:
        """Whether admission may pass over `seq`, whose blocks do not fit, to smaller seqs
        behind it: for admission_skip_seconds from the first time it did not fit."""
        now = self.clock()
        if seq.blocked_since is None:
            seq.blocked_since = now
        return now - seq.blocked_since < self.config.admission_skip_seconds

    def _start(self, seq: Sequence, num_blocks: int) -> None:
        """Waiting -> running, with the blocks for all its known tokens."""
        seq.blocked_since = None
        seq.block_table += self.allocator.allocate(num_blocks)
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)
        _decrement(self._waiting_per_tenant, seq.tenant)
        self._running_per_tenant[seq.tenant] += 1

    def _over_share(self, tenant: str) -> bool:
        """Whether the fairness guard holds this tenant back: it has its share of seats and
        another tenant is waiting (the tenant itself has a waiter: the seq being admitted)."""
        others_waiting = len(self._waiting_per_tenant) > 1
        return others_waiting and self._running_per_tenant[tenant] >= self._seat_cap

    def _grow(self, seq: Sequence) -> bool:
        """Give a decoding seq the block its next token needs, preempting the newest running
        seqs until one is free. False if seq itself had to be preempted."""
        need = seq.blocks_needed(1, self.config.block_size)
        while not self.allocator.can_allocate(need):
            if self._preempt_newest() is seq:
                return False
        seq.block_table += self.allocator.allocate(need)
        return True

    def _preempt_newest(self) -> Sequence:
        """Preempt by recomputation: drop the newest running seq's KV (keeping its tokens) and
        put it at the front of the waiting queue."""
        seq = self.running.pop()
        _decrement(self._running_per_tenant, seq.tenant)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self._waiting_per_tenant[seq.tenant] += 1
        self.preemptions += 1
        return seq

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []

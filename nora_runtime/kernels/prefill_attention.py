"""Variable-length causal attention over a paged KV cache for prompt chunks and mixed steps:
every sequence of a step in one launch (flash-attention style, online softmax in float32).

Semantics (torch notation; sequence b's n[b] = q_start[b + 1] - q_start[b] new tokens are rows
q_start[b] .. q_start[b + 1] - 1 of q, at positions ctx[b] - n[b] .. ctx[b] - 1; rows(b) = the
cache rows of its first ctx[b] tokens, found through its block table; GQA: query head h reads
KV head h // g, g = nh / nkv):
    out[q_start[b] + i, h] = softmax(q[q_start[b] + i, h] @ K[rows(b)[:p + 1], h // g].T * scale)
                             @ V[rows(b)[:p + 1], h // g],   p = ctx[b] - n[b] + i
A decode row is the case n[b] = 1, so prefill and decode rows of one step share the launch.

Grid (tile, KV head). A tile is BLOCK_Q consecutive new tokens of one sequence (`prefill_tiles`
builds the int32 table tile -> (sequence, first token) on the host, once per step, the tiles
that read the most keys first); a program takes a tile and one KV head with all g query heads
that share it, so its score block has BLOCK_M = BLOCK_Q * g (g padded to a power of two) rows
and each key and value it reads serves all of them. The kernel builds no [n, ctx] mask:
causality is a per-block comparison of key index against each row's position, and a tile stops
reading keys at its last token's position. (`paged_prefill_attention_ref`, the CPU path and the
tests' reference, does build one per sequence.)

Block sizes, tuned on the H200 (benchmarks/bench_attention.py --sweep, bf16 d = 128 g = 4,
2026-12-02: block_m 32-128 x block_n 32-128 x 4/8 warps x 1-3 stages over four cases):
BLOCK_M = 64 score rows (BLOCK_Q = 64 // g tokens, 16 for Llama-3-8B's g = 4; rows are padded
to 16, tl.dot's minimum, when BLOCK_Q * g is less), so a decode row in a mixed step wastes at
most BLOCK_Q - 1 tokens' rows of tensor-core work; BLOCK_N = 64 keys per inner step; 4 warps,
3 stages: 23% less time than the untuned 8 warps and default stages over the four cases (64
prompts of 128 tokens: 0.101 ms; 4 of 2,048: 0.501 ms, 200 TFLOP/s). head_dim is padded to a
power of two >= 16, at most 256. Every key block is masked (no separate unmasked loop below the
diagonal), and a long prompt gets no split along the context: attention is 2% of a prompt
step's device time at the 8B shape (benchmarks/results/profile-step-h200.md), the GEMMs the
rest.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nora_runtime.kernels._rational_math import fast_math

BLOCK_M = 64  # score rows per program (query tokens x group heads); untuned
BLOCK_N = 64  # keys per inner step; untuned


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, ctx_ptr, qstart_ptr, tiles_ptr,
    scale, stride_qn, stride_qh, stride_on, stride_oh, stride_kr, stride_kh, stride_tb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(tiles_ptr + tile * 2)  # sequence of this tile
    i0 = tl.load(tiles_ptr + tile * 2 + 1)  # its first new token (0-based within the seq)
    q0 = tl.load(qstart_ptr + b)
    n = tl.load(qstart_ptr + b + 1) - q0
    ctx = tl.load(ctx_ptr + b)
    # score row r = token i0 + r // GROUP_PAD, query head kvh * GROUP + r % GROUP_PAD; rows
    # past BLOCK_Q * GROUP_PAD only pad BLOCK_M to tl.dot's minimum of 16
    r = tl.arange(0, BLOCK_M)
    i = i0 + r // GROUP_PAD  # [M]
    g = r % GROUP_PAD
    rmask = (i < n) & (g < GROUP) & (r < BLOCK_Q * GROUP_PAD)
    pos = ctx - n + i  # [M] position of each row's token: it sees keys 0 .. pos
    d = tl.arange(0, D)
    # a mask along d only where d is padded (a non-uniform mask would cost vector loads)
    qmask = rmask[:, None] if HEAD_DIM == D else rmask[:, None] & (d < HEAD_DIM)[None, :]
    tok = (q0 + i).to(tl.int64)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + tok[:, None] * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=qmask, other=0.0)  # [M, D]
    if UPCAST:  # Triton's interpreter multiplies bf16 wrongly: do its dots in float32
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # keys past the tile's last token are seen by none of its rows
    kv_end = ctx - n + tl.minimum(i0 + BLOCK_Q, n)
    qk_scale = scale * 1.4426950408889634  # exp2 below: fold log2(e) into the scale
    for t0 in range(0, kv_end, BLOCK_N):
        keys = t0 + tl.arange(0, BLOCK_N)  # [BN]
        kmask = keys < kv_end
        blk = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + keys // BLOCK_SIZE, mask=kmask,
                      other=0).to(tl.int64)
        rows = blk * BLOCK_SIZE + keys % BLOCK_SIZE  # [BN] cache rows
        kv_off = rows[:, None] * stride_kr + kvh * stride_kh + d[None, :]
        kvmask = kmask[:, None] if HEAD_DIM == D else kmask[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)  # [BN, D]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale  # [M, BN]
        # key 0 is visible to every row, so the first block makes each row's max finite
        s = tl.where((keys[None, :] <= pos[:, None]) & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)  # [BN, D]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + tok[:, None] * stride_on + heads[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=qmask)


def group_pad(nh: int, nkv: int) -> int:
    """Query heads per KV head, padded to a power of two (score rows per token of a tile)."""
    return triton.next_power_of_2(nh // nkv)


def prefill_block_q(nh: int, nkv: int, block_m: int = BLOCK_M) -> int:
    """Tokens per tile: block_m score rows over the padded group (at least one token)."""
    return max(1, block_m // group_pad(nh, nkv))


def prefill_tiles(q_lens: np.ndarray, block_q: int,
                  ctx_lens: np.ndarray | None = None) -> np.ndarray:
    """The tile table [T, 2] int32: (sequence, first new token) of each run of block_q new tokens
    of each sequence. q_lens: [B] new tokens per sequence (>= 1). Without ctx_lens the tiles are
    in sequence order; with ctx_lens ([B], context after the step) the tiles that read the most
    keys come first (a tile reads keys up to its last token's position), so that the longest
    programs start first and the short ones fill the tail of the launch (order is free: tiles
    write disjoint rows)."""
    q_lens = np.asarray(q_lens, dtype=np.int64)
    counts = -(-q_lens // block_q)  # tiles per sequence
    seq = np.repeat(np.arange(len(q_lens), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # each sequence's first tile
    start = (np.arange(len(seq)) - first[seq]) * block_q  # [T] first new token of each tile
    if ctx_lens is not None:
        ctx = np.asarray(ctx_lens, dtype=np.int64)[seq]
        keys = ctx - q_lens[seq] + np.minimum(start + block_q, q_lens[seq])  # [T] keys read
        order = np.argsort(-keys, kind="stable")
        seq, start = seq[order], start[order]
    return np.stack([seq, start], axis=1).astype(np.int32)


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    ctx_lens: torch.Tensor, q_start: torch.Tensor, block_size: int,
    tiles: torch.Tensor | None = None, block_q: int | None = None, *, block_n: int = BLOCK_N,
    num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context (one launch).

    q: [N, nh, d] (all sequences' new tokens, flattened in sequence order; rope applied);
    k_cache, v_cache: [rows, nkv, d] (one layer, the new tokens' keys and values already
    written); block_tables: [B, max_blocks] int32; ctx_lens: [B] int32 (context after this
    step, new tokens included); q_start: [B + 1] int32 cumulative new-token counts (q_start[0]
    = 0, q_start[B] = N, every sequence >= 1 token); tiles: [T, 2] int32 from
    `prefill_tiles(n, block_q, ctx)` with block_q = `prefill_block_q(nh, nkv)` (None: built here
    from q_start, which syncs with the device). block_n, num_warps and num_stages are tuning
    knobs (None: 4 warps and 3 stages, the H200's best; see the module docstring). Returns
    [N, nh, d] in q's dtype.
    """
    N, nh, d = q.shape
    nkv = k_cache.shape[1]
    if nh % nkv or d > 256:
        raise ValueError(f"need nh % nkv == 0 and d <= 256 (nh={nh}, nkv={nkv}, d={d})")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have one shape and layout")
    if q.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("q and the caches must be contiguous along d")
    if k_cache.shape[2] != d or k_cache.dtype != q.dtype:
        raise ValueError(f"caches {tuple(k_cache.shape)} {k_cache.dtype} do not match q "
                         f"{tuple(q.shape)} {q.dtype}")
    B = ctx_lens.shape[0]
    for name, t in (("block_tables", block_tables), ("ctx_lens", ctx_lens),
                    ("q_start", q_start)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if q_start.shape != (B + 1,) or block_tables.shape[0] != B:
        raise ValueError(f"q_start {tuple(q_start.shape)} and block_tables "
                         f"{tuple(block_tables.shape)} do not match {B} sequences")
    if block_q is None:
        block_q = prefill_block_q(nh, nkv)
    if tiles is None:
        lens = np.diff(q_start.cpu().numpy())
        tiles = torch.from_numpy(prefill_tiles(lens, block_q, ctx_lens.cpu().numpy()))
        tiles = tiles.to(q.device)
    if tiles.dtype != torch.int32 or tiles.ndim != 2 or tiles.shape[1] != 2:
        raise ValueError(f"tiles must be [T, 2] int32, got {tuple(tiles.shape)} {tiles.dtype}")
    gp = group_pad(nh, nkv)
    if block_q * gp & (block_q * gp - 1):
        raise ValueError(f"block_q * padded group ({block_q} * {gp}) must be a power of two")
    out = torch.empty(N, nh, d, dtype=q.dtype, device=q.device)
    if tiles.shape[0] == 0:
        return out
    _paged_prefill_kernel[(tiles.shape[0], nkv)](
        q, k_cache, v_cache, out, block_tables, ctx_lens, q_start, tiles,
        d ** -0.5, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), block_tables.stride(0),
        GROUP=nh // nkv, GROUP_PAD=gp, HEAD_DIM=d, D=max(16, triton.next_power_of_2(d)),
        BLOCK_Q=block_q, BLOCK_M=max(16, block_q * gp), BLOCK_SIZE=block_size,
        BLOCK_N=block_n, UPCAST=not fast_math(),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32, not TF32
        num_warps=num_warps or 4, num_stages=num_stages or 3,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    ctx_lens: torch.Tensor, q_start: torch.Tensor, block_size: int,
) -> torch.Tensor:
    """Torch reference (and the CPU path): per sequence, gather its ctx rows through its block
    table and run SDPA with the causal mask of n queries at the last n of ctx positions. Math
    in float32 (float64 for float64 inputs); returns q's dtype. Reads q_start and ctx_lens on
    the host."""
    N, nh, d = q.shape
    group = nh // k_cache.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(N, nh, d, dtype=q.dtype, device=q.device)
    starts, ctxs = q_start.tolist(), ctx_lens.tolist()
    tables = block_tables.long()
    for b, ctx in enumerate(ctxs):
        s, e = starts[b], starts[b + 1]
        toks = torch.arange(ctx, device=q.device)
        rows = tables[b, toks // block_size] * block_size + toks % block_size
        k = k_cache[rows].to(dt).repeat_interleave(group, dim=1).transpose(0, 1)  # [nh, ctx, d]
        v = v_cache[rows].to(dt).repeat_interleave(group, dim=1).transpose(0, 1)
        mask = None
        if e - s > 1:  # query i sits at position ctx - n + i and sees keys 0 .. ctx - n + i
            pos = torch.arange(ctx - (e - s), ctx, device=q.device)
            mask = toks[None, :] <= pos[:, None]  # [n, ctx]
        o = F.scaled_dot_product_attention(q[s:e].to(dt).transpose(0, 1), k, v, attn_mask=mask)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out

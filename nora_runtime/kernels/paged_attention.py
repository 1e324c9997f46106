"""Decode attention over a paged KV cache (one new query token per sequence), split along the
context ("flash-decoding") so that a batch of one still fills the GPU.

Semantics (torch notation; rows(b) = the cache rows of sequence b's first ctx[b] tokens, found
through its block table; GQA: query head h reads KV head h // (nh / nkv)):
    out[b, h] = softmax(q[b, h] @ K[rows(b), h // g].T * scale) @ V[rows(b), h // g]

Each program takes one sequence, one KV head (all g query heads that share it, so each key and
value is read once) and one partition of PART context tokens, and writes its partial softmax
state (max, sum, weighted values); a second launch (`_combine_kernel`, one program per sequence
and query head) combines the partitions, where torch took about eight elementwise and reduce
launches. All shapes are static given the batch size, so a decode step can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nora_runtime.kernels._rational_math import fast_math


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, m_ptr, l_ptr, acc_ptr,
    scale, stride_qb, stride_qh, stride_kr, stride_kh, stride_tb, n_parts,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PART: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g  # [GP] query heads of this KV head
    gmask = g < GROUP
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0)  # [GP, D]
    if UPCAST:  # Triton's interpreter multiplies bf16 wrongly: do its dots in float32
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    start = part * PART
    end = tl.minimum(start + PART, ctx)
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        blk = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + toks // BLOCK_SIZE, mask=tmask,
                      other=0).to(tl.int64)
        rows = blk * BLOCK_SIZE + toks % BLOCK_SIZE  # [BN] cache rows
        kv_off = rows[:, None] * stride_kr + kvh * stride_kh + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=tmask[:, None], other=0.0)  # [BN, D]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale  # [GP, BN]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=tmask[:, None], other=0.0)  # [BN, D]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m_i = m_new
    # partial state of (b, heads, part); an empty partition leaves m = -inf, l = 0, acc = 0
    row = (b.to(tl.int64) * GROUP * tl.num_programs(1) + heads) * n_parts + part  # [GP]
    tl.store(m_ptr + row, m_i, mask=gmask)
    tl.store(l_ptr + row, l_i, mask=gmask)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, n_parts, stride_ob, stride_oh,
                    NH: tl.constexpr, D: tl.constexpr, P_PAD: tl.constexpr):
    """out[b, h] = sum_p w_p acc[b, h, p] / sum_p w_p l[b, h, p], w_p = exp(m_p - max_p m_p):
    the partitions' softmax states merged (an empty partition has m = -inf and weighs 0)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, D)
    row = (b.to(tl.int64) * NH + h) * n_parts + p  # [P]
    pmask = p < n_parts
    m = tl.load(m_ptr + row, mask=pmask, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))  # [P]
    w = tl.where(pmask, w, 0.0)
    den = tl.sum(w * tl.load(l_ptr + row, mask=pmask, other=0.0), axis=0)
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=pmask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / den  # [D]
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
             out.to(o_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    ctx_lens: torch.Tensor, block_size: int, *, part: int = 256, block_n: int = 64,
) -> torch.Tensor:
    """Decode attention for B sequences, one query token each.

    q: [B, nh, d]; k_cache, v_cache: [rows, nkv, d] (rows = num_blocks * block_size, one layer);
    block_tables: [B, max_blocks] int32 (entries past a sequence's blocks are ignored);
    ctx_lens: [B] int32, >= 1 (tokens to attend to, the new one included, already in the cache).
    Returns [B, nh, d] in q's dtype.
    """
    B, nh, d = q.shape
    nkv = k_cache.shape[1]
    if nh % nkv or d & (d - 1) or d < 16:
        raise ValueError(f"need nh % nkv == 0 and d a power of two >= 16 (nh={nh}, nkv={nkv}, "
                         f"d={d})")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have one shape and layout")
    if q.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("q and the caches must be contiguous along d")
    if block_tables.dtype != torch.int32 or ctx_lens.dtype != torch.int32:
        raise ValueError("block_tables and ctx_lens must be int32")
    group = nh // nkv
    n_parts = triton.cdiv(block_tables.shape[1] * block_size, part)
    m = torch.empty(B, nh, n_parts, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, nh, n_parts, d, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(B, nkv, n_parts)](
        q, k_cache, v_cache, block_tables, ctx_lens, m, l, acc,
        d ** -0.5, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), n_parts,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PART=part, UPCAST=not fast_math(),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32, not TF32
    )
    out = torch.empty_like(q)
    _combine_kernel[(B, nh)](m, l, acc, out, n_parts, out.stride(0), out.stride(1), NH=nh, D=d,
                             P_PAD=triton.next_power_of_2(n_parts))
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, ctx_lens, block_size):
    """Plain torch reference (float32): gather each sequence's rows and attend."""
    B, nh, d = q.shape
    group = nh // k_cache.shape[1]
    out = torch.empty(B, nh, d, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(ctx_lens[b])
        toks = torch.arange(n, device=q.device)
        rows = block_tables[b, toks // block_size].long() * block_size + toks % block_size
        k = k_cache[rows].float().repeat_interleave(group, dim=1)  # [n, nh, d]
        v = v_cache[rows].float().repeat_interleave(group, dim=1)
        att = torch.einsum("hd,nhd->hn", q[b].float(), k) * d ** -0.5
        out[b] = torch.einsum("hn,nhd->hd", att.softmax(-1), v)
    return out.to(q.dtype)

"""RoPE fused with the KV-cache write: one launch where the torch code runs about a dozen (two
rotate-half RoPEs with their float32 casts, chunks, multiplies and concatenations, then two
index_copy_ into the cache), once per decoder layer.

Semantics (torch notation; nora_runtime.llama.apply_rope's rotate-half convention, float32
math, rounded to the inputs' dtype; c, s = cos[t], sin[t], x = (x1, x2) its two halves):
    rope(x)[t] = (x1 * c - x2 * s, x2 * c + x1 * s)
    q_out = rope(q);   k_cache[kv_index] = rope(k);   v_cache[kv_index] = v
Returns q_out.

q: [N, nh, d], k, v: [N, nkv, d] (views of the projections' outputs are fine: contiguous
along d); cos, sin: [N, d / 2] float32; kv_index: [N] int64 cache rows; k_cache, v_cache:
[rows, nkv, d] of q's dtype, contiguous. One program per (token, head): query heads, then KV
heads (which also copy v). d even, at most 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, idx_ptr, qo_ptr, kc_ptr, vc_ptr,
    NH, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    stride_ot, stride_oh, stride_cr, stride_ch,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    c = tl.load(cos_ptr + t * stride_ct + i, mask=m, other=0.0)
    s = tl.load(sin_ptr + t * stride_ct + i, mask=m, other=0.0)
    if h < NH:  # a query head: rotated into q_out
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = qo_ptr + t * stride_ot + h * stride_oh
    else:  # a KV head: k rotated into the cache, v copied there
        j = h - NH
        row = tl.load(idx_ptr + t)
        src = k_ptr + t * stride_kt + j * stride_kh
        dst = kc_ptr + row * stride_cr + j * stride_ch
        v = tl.load(v_ptr + t * stride_vt + j * stride_vh + i, mask=m)
        tl.store(vc_ptr + row * stride_cr + j * stride_ch + i, v, mask=m)
        v2 = tl.load(v_ptr + t * stride_vt + j * stride_vh + HALF + i, mask=m)
        tl.store(vc_ptr + row * stride_cr + j * stride_ch + HALF + i, v2, mask=m)
    x1 = tl.load(src + i, mask=m, other=0.0)
    x2 = tl.load(src + HALF + i, mask=m, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst + i, (x1f * c - x2f * s).to(x1.dtype), mask=m)
    tl.store(dst + HALF + i, (x2f * c + x1f * s).to(x1.dtype), mask=m)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, kv_index: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> torch.Tensor:
    """rope(q); k_cache[kv_index] = rope(k); v_cache[kv_index] = v: one launch (module
    docstring). Returns the rotated queries [N, nh, d]."""
    N, nh, d = q.shape
    nkv = k.shape[1]
    if d % 2 or d > 256 or k.shape != (N, nkv, d) or v.shape != k.shape:
        raise ValueError(f"need q [N, nh, d], k and v [N, nkv, d], d even <= 256; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError("q, k, v and the caches must have one dtype")
    if any(x.stride(2) != 1 for x in (q, k, v)) or not (k_cache.is_contiguous()
                                                        and v_cache.is_contiguous()):
        raise ValueError("q, k, v must be contiguous along d and the caches contiguous")
    if k_cache.shape != v_cache.shape or k_cache.shape[1:] != (nkv, d):
        raise ValueError(f"caches must be [rows, {nkv}, {d}], got {tuple(k_cache.shape)}")
    if cos.shape != (N, d // 2) or sin.shape != cos.shape or cos.dtype != torch.float32 \
            or sin.stride() != cos.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos and sin must be float32 [N={N}, {d // 2}], contiguous along d/2")
    if kv_index.shape != (N,) or kv_index.dtype != torch.int64:
        raise ValueError(f"kv_index must be int64 [N={N}]")
    q_out = torch.empty((N, nh, d), dtype=q.dtype, device=q.device)
    if N:
        _rope_cache_kernel[(N, nh + nkv)](
            q, k, v, cos, sin, kv_index, q_out, k_cache, v_cache, nh,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), q_out.stride(0), q_out.stride(1), k_cache.stride(0),
            k_cache.stride(1), HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
            num_warps=1 if d <= 128 else 2,
        )
    return q_out

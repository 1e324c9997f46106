"""Multi-tenant LoRA: each token adds its own adapter's low-rank delta to a projection's output.

Semantics (torch notation; s = idx[t], rows with s <= 0 have no LoRA and are left untouched):
    h[t] = A[s] @ x[t]                        (shrink)   h: [T, R] float32
    y[t] += scale[s] * (B[s] @ h[t])          (expand)

A pool row holds one adapter's factors zero-padded to the pool's rank R (nora_runtime.lora_pool),
so adapters of any rank <= R share one launch and padded ranks contribute exactly zero.
Row 0 of a pool is never written (all zeros): index 0 and -1 both mean "no LoRA".

BGMV style (Punica's per-token gathered matrix-vector): one program per token and K-split
(shrink: partial sums, which the expand adds) or per token and BLOCK_N output columns
(expand); a token's adapter row is gathered through `idx`.
Tokens of one adapter read its factors again from L2, which is what decode steps (one token
per sequence) want; long prefills of one adapter would do better segment-grouped (SGMV).
int64 offsets, masked loads, float32 accumulation; y is read and written in its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, idx_ptr, h_ptr,
    K, R, stride_xt, stride_as, stride_ar, stride_ht, stride_hs,
    K_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (t, j): token t's partial sum over K columns [j * K_SPLIT, (j + 1) * K_SPLIT)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    s = tl.load(idx_ptr + t).to(tl.int64)
    # a row without LoRA (s <= 0) masks every load: its extents are zero
    K_live = tl.where(s > 0, K, 0)
    r = tl.arange(0, BLOCK_R)
    rmask = r < tl.where(s > 0, R, 0)
    a_rows = a_ptr + s * stride_as + r.to(tl.int64)[:, None] * stride_ar  # [BR, 1]
    x_row = x_ptr + t * stride_xt
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        k = j * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
        kmask = k < K_live
        xv = tl.load(x_row + k, mask=kmask, other=0.0).to(tl.float32)  # [BK]
        av = tl.load(a_rows + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    tl.store(h_ptr + t * stride_ht + j * stride_hs + r, acc, mask=r < R)


@triton.jit
def _lora_expand_kernel(
    h_ptr, b_ptr, idx_ptr, scale_ptr, y_ptr,
    N, R, S, stride_ht, stride_hs, stride_bs, stride_bn, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s = tl.load(idx_ptr + t).to(tl.int64)
    # a row without LoRA (s <= 0) masks every load and the store: y keeps its value
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < tl.where(s > 0, N, 0)
    r = tl.arange(0, BLOCK_R)
    rmask = r < tl.where(s > 0, R, 0)
    j = tl.arange(0, BLOCK_S)  # the shrink's K-split partial sums, added here
    hv = tl.sum(tl.load(h_ptr + t * stride_ht + j[:, None] * stride_hs + r[None, :],
                        mask=(j < S)[:, None] & rmask[None, :], other=0.0), axis=0)  # [BR]
    bv = tl.load(b_ptr + s * stride_bs + n[:, None] * stride_bn + r[None, :],
                 mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # [BN, BR]
    scale = tl.load(scale_ptr + tl.maximum(s, 0))  # row 0 of a pool: scale 0
    delta = tl.sum(bv * hv[None, :], axis=1) * scale  # [BN]
    y_row = y_ptr + t * stride_yt + n
    y = tl.load(y_row, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_row, (y + delta).to(y_ptr.dtype.element_ty), mask=nmask)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_idx(idx: torch.Tensor, T: int, device: torch.device) -> None:
    if idx.shape != (T,) or idx.dtype != torch.int32 or (T > 1 and idx.stride(0) != 1):
        raise ValueError(f"idx must be contiguous int32 [T={T}], got {idx.dtype} "
                         f"{tuple(idx.shape)} stride {idx.stride()}")
    if idx.device != device:
        raise ValueError("idx must be on the activations' device")


# The shrink splits K over programs (each token's A row is read once, by several programs at
# once: with only T programs a decode step of 128 tokens streamed 128 rows of 128-458 KB one
# program each, far below the memory bandwidth): about SHRINK_PROGRAMS programs in all, at most
# MAX_SPLITS per token, whose partial sums the expand adds.
SHRINK_PROGRAMS = 1024
MAX_SPLITS = 32


def k_split(T: int, K: int, block_k: int) -> int:
    """K columns per shrink program for T tokens (a power of two, a multiple of block_k)."""
    want = min(MAX_SPLITS, max(1, triton.cdiv(SHRINK_PROGRAMS, max(T, 1))))
    return max(block_k, triton.next_power_of_2(triton.cdiv(K, want)))


def _shrink(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, block_k: int,
            num_warps: int, split: int | None) -> torch.Tensor:
    """Partial sums h[t, j] = A[idx[t]][:, cols j] @ x[t, cols j]: [T, S, R] float32."""
    if x.dim() != 2 or x.dtype not in _FLOATS or x.stride(1) != 1:
        raise ValueError(f"x must be a float [T, K] tensor contiguous along K, got {x.dtype} "
                         f"{tuple(x.shape)} stride {x.stride()}")
    T, K = x.shape
    if A.dim() != 3 or A.shape[2] != K or A.dtype != x.dtype or A.stride(2) != 1:
        raise ValueError(f"A must be [P, R, K={K}] of x's dtype {x.dtype}, contiguous along K; "
                         f"got {A.dtype} {tuple(A.shape)} stride {A.stride()}")
    if A.device != x.device:
        raise ValueError("A must be on x's device")
    _check_idx(idx, T, x.device)
    R = A.shape[1]
    bk = min(block_k, triton.next_power_of_2(K))
    split = split or k_split(T, K, bk)
    if split < 1 or split & (split - 1):
        raise ValueError(f"split must be a power of two, got {split}")
    bk = min(bk, split)  # a program's blocks cover its split exactly
    S = triton.cdiv(K, split)
    h = torch.empty((T, S, R), dtype=torch.float32, device=x.device)
    if T:
        _lora_shrink_kernel[(T, S)](
            x, A, idx, h, K, R, x.stride(0), A.stride(0), A.stride(1), h.stride(0),
            h.stride(1), K_SPLIT=split, BLOCK_R=triton.next_power_of_2(R), BLOCK_K=bk,
            num_warps=num_warps,
        )
    return h


def lora_shrink(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor,
                out: torch.Tensor | None = None, block_k: int = 256,
                num_warps: int = 4, split: int | None = None) -> torch.Tensor:
    """Gathered shrink h[t] = A[idx[t]] @ x[t] (zero rows where idx[t] <= 0).

    x: [T, K] bf16/fp16/fp32, contiguous along K. A: [P, R, K] (a pool), same dtype as x,
    contiguous along K. idx: [T] int32, each token's pool row (<= 0: none). split: K columns
    per program (default: k_split). Returns h: [T, R] float32 (or `out`).
    """
    h = _shrink(x, A, idx, block_k, num_warps, split)
    T, _, R = h.shape
    if out is None:
        out = torch.empty((T, R), dtype=torch.float32, device=x.device)
    if out.shape != (T, R) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be float32 [T={T}, R={R}], contiguous along R")
    return torch.sum(h, dim=1, out=out)


def lora_expand(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                idx: torch.Tensor, block_n: int = 256, num_warps: int = 4) -> torch.Tensor:
    """Gathered expand, in place: y[t] += scale[idx[t]] * (B[idx[t]] @ h[t]) where idx[t] > 0.

    y: [T, N] bf16/fp16/fp32, contiguous along N (a row stride is fine: a column slice of a
    fused gate-up output works). h: [T, R] float32 (lora_shrink's), or [T, S, R] partial sums
    whose sum over S is used. B: [P, N, R] of y's dtype, contiguous along R. scale: [P]
    float32. idx: [T] int32. Returns y.
    """
    if y.dim() != 2 or y.dtype not in _FLOATS or y.stride(1) != 1:
        raise ValueError(f"y must be a float [T, N] tensor contiguous along N, got {y.dtype} "
                         f"{tuple(y.shape)} stride {y.stride()}")
    T, N = y.shape
    if B.dim() != 3 or B.shape[1] != N or B.dtype != y.dtype or B.stride(2) != 1:
        raise ValueError(f"B must be [P, N={N}, R] of y's dtype {y.dtype}, contiguous along R; "
                         f"got {B.dtype} {tuple(B.shape)} stride {B.stride()}")
    P, _, R = B.shape
    hs = h.unsqueeze(1) if h.dim() == 2 else h
    if hs.dim() != 3 or hs.shape[0] != T or hs.shape[2] != R or h.dtype != torch.float32 \
            or hs.stride(2) != 1:
        raise ValueError(f"h must be float32 [T={T}, R={R}] or [T, S, R], contiguous along R; "
                         f"got {h.dtype} {tuple(h.shape)}")
    if scale.shape != (P,) or scale.dtype != torch.float32 or scale.stride(0) != 1:
        raise ValueError(f"scale must be contiguous float32 [P={P}], got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if not (y.device == h.device == B.device == scale.device):
        raise ValueError("y, h, B and scale must be on one device")
    _check_idx(idx, T, y.device)
    if T == 0:
        return y
    S = hs.shape[1]
    bn = min(block_n, triton.next_power_of_2(N))
    _lora_expand_kernel[(T, triton.cdiv(N, bn))](
        hs, B, idx, scale, y, N, R, S, hs.stride(0), hs.stride(1), B.stride(0), B.stride(1),
        y.stride(0), BLOCK_N=bn, BLOCK_R=triton.next_power_of_2(R),
        BLOCK_S=triton.next_power_of_2(S), num_warps=num_warps,
    )
    return y


def lora_forward(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scale: torch.Tensor, idx: torch.Tensor, *, block_k: int = 256,
                 block_n: int = 256, num_warps: int = 4,
                 split: int | None = None) -> torch.Tensor:
    """y[t] += scale[s] * B[s] @ (A[s] @ x[t]), s = idx[t] > 0, in place (shrink + expand).
    Shapes and tuning arguments as in lora_shrink / lora_expand; returns y."""
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must be pools of the same "
                         "rows and rank")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, y {y.shape[0]}")
    return lora_expand(y, _shrink(x, A, idx, block_k, num_warps, split), B, scale, idx,
                       block_n=block_n, num_warps=num_warps)


def lora_ref(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             scale: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Torch reference of lora_forward (same semantics, in place on y, float32 math): one
    matmul pair per distinct adapter of the batch (what the CPU path serves with)."""
    live = idx > 0
    if not bool(live.any()):
        return y
    for s in torch.unique(idx[live]).tolist():
        rows = (idx == s).nonzero().squeeze(1)
        h = x[rows].float() @ A[s].float().T  # [n, R]
        delta = (h @ B[s].float().T) * scale[s]  # [n, N]
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y

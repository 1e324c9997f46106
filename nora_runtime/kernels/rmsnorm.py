"""Fused residual add + RMSNorm: one launch where the torch code runs about eight (the add, the
float32 cast, square, mean, rsqrt, two multiplies, the casts back), twice per decoder layer.

Semantics (torch notation; the decoder layer's `x = x + delta; h = norm(x)`, rounded as torch
rounds it in x's dtype):
    s = (x + delta)                                     (in x's dtype)
    h = weight * (s.float() * rsqrt(mean(s.float() ** 2, -1) + eps)).to(x.dtype)
Returns (h, s): h feeds the next projection, s is the new residual stream.

x, delta: [T, H] of one dtype, rows contiguous; weight: [H] of that dtype. One program per row
(H <= 16,384: a row fits one block), float32 math, the torch code's roundings in its order:
the add is exact as torch's; h differs only by the float32 reduction's order (the tests: 1e-5
relative in float32, one rounding step in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, d_ptr, w_ptr, h_ptr, s_ptr, H, eps, stride_x, stride_d, stride_h, stride_s,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_H)
    m = c < H
    x = tl.load(x_ptr + t * stride_x + c, mask=m, other=0.0)
    d = tl.load(d_ptr + t * stride_d + c, mask=m, other=0.0)
    s = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # torch's x + delta: f32, rounded
    tl.store(s_ptr + t * stride_s + c, s, mask=m)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / H + eps)
    n = (sf * rstd).to(x.dtype)  # torch: h.to(x.dtype) before the weight
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    h = (w.to(tl.float32) * n.to(tl.float32)).to(x.dtype)
    tl.store(h_ptr + t * stride_h + c, h, mask=m)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + delta), x + delta) in one launch (module docstring)."""
    if x.dim() != 2 or x.shape != delta.shape or x.dtype != delta.dtype:
        raise ValueError(f"x and delta must be [T, H] of one dtype, got {tuple(x.shape)} "
                         f"{x.dtype} and {tuple(delta.shape)} {delta.dtype}")
    T, H = x.shape
    if weight.shape != (H,) or weight.dtype != x.dtype or H > MAX_HIDDEN:
        raise ValueError(f"weight must be [H={H}] of x's dtype (H <= {MAX_HIDDEN}), got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if x.stride(1) != 1 or delta.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("x, delta and weight must be contiguous along H")
    h, s = torch.empty_like(x), torch.empty_like(x)
    if T:
        _add_rmsnorm_kernel[(T,)](
            x, delta, weight, h, s, H, eps, x.stride(0), delta.stride(0), h.stride(0),
            s.stride(0), BLOCK_H=triton.next_power_of_2(H),
            num_warps=8 if H >= 4096 else 4,
        )
    return h, s


def add_rmsnorm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch code the kernel fuses (nora_runtime.llama.RMSNorm after the residual add)."""
    s = x + delta
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), s

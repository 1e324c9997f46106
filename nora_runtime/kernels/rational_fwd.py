"""Multi-tenant rational forward: each token's activation with its own adapter's coefficients.

Semantics (torch notation, g(c) = c // (C // G), ACT the base activation, L = clamp):
    replace:   y[t, c] = R(x[t, c]; table[slot[t], g(c)])
    residual:  y[t, c] = ACT(x[t, c]) + (slot[t] != 0) * (R(xc; table[slot[t], g(c)])
                                                          - R(xc; table[0, g(c)])),
               xc = clamp(x[t, c], -L, L)
    gated (SwiGLU): the above times up[t, c].

Residual mode keeps slot 0 (no adapter) exactly the original activation, and evaluates an
adapter's change at x clamped to the fit range: a 5/4 rational grows linearly, so the change
R_s - R_0 would grow without bound for the |x| ~ 50 an LLM's MLP sees; clamped it stays bounded
by its maximum on [-L, L] (and is constant beyond it).

Each program covers BLOCK_T rows x BLOCK_C channels inside one group, so it loads each row's 10
coefficients once (a [BLOCK_T] gather from the table, cached) and streams x at full width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nora_runtime.kernels._rational_math import base_act, fast_div, fast_math, load_coefs, pq
from nora_runtime.rational import ACTIVATIONS, MODES, N_COEF


@triton.jit
def _rational_fwd_kernel(
    x_ptr, up_ptr, y_ptr, slot_ptr, tab_ptr,
    T, GS, stride_xt, stride_ut, stride_yt, stride_ts, stride_tg, clamp,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FAST: tl.constexpr,
):
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cin = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] channel inside group
    rmask = rows < T
    mask = rmask[:, None] & (cin < GS)[None, :]
    rows64 = rows.to(tl.int64)
    cols = g.to(tl.int64) * GS + cin  # [BC]

    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cptr = tab_ptr + slot * stride_ts + g * stride_tg  # [BT]
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = load_coefs(cptr, rmask)

    x = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if RESIDUAL:
        xc = tl.minimum(tl.maximum(x, -clamp), clamp)
        p, q = pq(xc, a0[:, None], a1[:, None], a2[:, None], a3[:, None], a4[:, None],
                  a5[:, None], b0[:, None], b1[:, None], b2[:, None], b3[:, None])
        c0, c1, c2, c3, c4, c5, d0, d1, d2, d3 = load_coefs(tab_ptr + g * stride_tg, g >= 0)
        p0, q0 = pq(xc, c0, c1, c2, c3, c4, c5, d0, d1, d2, d3)
        delta = fast_div(p * q0 - p0 * q, q * q0, FAST)  # one division for R_s - R_0
        y = base_act(x, ACT) + tl.where((slot != 0)[:, None], delta, 0.0)
    else:
        p, q = pq(x, a0[:, None], a1[:, None], a2[:, None], a3[:, None], a4[:, None],
                  a5[:, None], b0[:, None], b1[:, None], b2[:, None], b3[:, None])
        y = fast_div(p, q, FAST)
    if GATED:
        u = tl.load(up_ptr + rows64[:, None] * stride_ut + cols[None, :], mask=mask, other=0.0)
        y = y * u.to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_yt + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


def check_args(x: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, act: str, mode: str):
    """Shared argument checks of the rational kernels; returns (T, C, G)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, C], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along channels (stride(1) == 1)")
    if table.dim() != 3 or table.shape[2] != N_COEF or table.dtype != torch.float32:
        raise ValueError(f"table must be float32 [S, G, {N_COEF}], got "
                         f"{table.dtype} {tuple(table.shape)}")
    if table.stride(2) != 1:
        raise ValueError("table rows must be contiguous (stride(2) == 1)")
    T, C = x.shape
    G = table.shape[1]
    if C % G:
        raise ValueError(f"channels C={C} must be a multiple of groups G={G}")
    if slot.shape != (T,) or slot.dtype != torch.int32 or (T > 1 and slot.stride(0) != 1):
        raise ValueError(f"slot must be contiguous int32 [T={T}], got {slot.dtype} "
                         f"{tuple(slot.shape)} stride {slot.stride()}")
    if not (x.device == table.device == slot.device):
        raise ValueError("x, table and slot must be on one device")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return T, C, G


def blocks(T: int, GS: int, residual: bool) -> tuple[int, int]:
    """BLOCK_T x BLOCK_C tile: up to 256 channels of one group; 1024 elements a program, 2048
    in residual mode (the best of each in the H200 sweep, benchmarks/results/)."""
    block_c = min(256, triton.next_power_of_2(GS))
    block_t = min(max(1, (2048 if residual else 1024) // block_c), triton.next_power_of_2(T))
    return block_t, block_c


def rational_forward(
    x: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, *, act: str = "silu",
    mode: str = "replace", clamp: float = 4.0, up: torch.Tensor | None = None,
    out: torch.Tensor | None = None, block: tuple[int, int] | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """Multi-tenant rational activation (optionally SwiGLU-gated by `up`).

    x: [T, C] bf16/fp16/fp32, channel-contiguous (a row stride is fine: a view of a [T, 2C]
       gate-up tensor works). table: [S, G, 10] float32 (a [:, layer] view of a [S, L, G, 10]
       table works). slot: [T] int32, each token's table row. up: [T, C] like x, or None.
    Returns y: [T, C] in x's dtype (or `out`).
    """
    T, C, G = check_args(x, table, slot, act, mode)
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.stride(1) != 1
                           or up.device != x.device):
        raise ValueError("up must match x in shape, dtype, device and channel contiguity")
    y = torch.empty((T, C), dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (T, C) or y.stride(1) != 1:
        raise ValueError("out must be [T, C], channel-contiguous")
    if T == 0:
        return y
    GS = C // G
    bt, bc = block or blocks(T, GS, mode == "residual")
    grid = (triton.cdiv(T, bt), G, triton.cdiv(GS, bc))
    _rational_fwd_kernel[grid](
        x, up if up is not None else x, y, slot, table,
        T, GS, x.stride(0), (up if up is not None else x).stride(0), y.stride(0),
        table.stride(0), table.stride(1), float(clamp),
        ACT=ACTIVATIONS.index(act), RESIDUAL=mode == "residual", GATED=up is not None,
        BLOCK_T=bt, BLOCK_C=bc, FAST=fast_math(), num_warps=num_warps,
    )
    return y


def rational_swiglu(
    gate: torch.Tensor, up: torch.Tensor | None, table: torch.Tensor, slot: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """Fused y = R(gate) * up. Either two [T, C] tensors, or gate = one [T, 2C] gate-up tensor
    (first half gate, second half up, as in a fused gate_up projection) and up=None."""
    if up is None:
        if gate.dim() != 2 or gate.shape[1] % 2:
            raise ValueError(f"a fused gate-up tensor must be [T, 2C], got {tuple(gate.shape)}")
        C = gate.shape[1] // 2
        gate, up = gate[:, :C], gate[:, C:]
    return rational_forward(gate, table, slot, up=up, **kwargs)

"""Backward of the multi-tenant rational activation: dx and coefficient gradients.

Semantics (torch notation, forward as in rational_fwd; R' = dR/dx):
    replace:   dx[t, c] = dy * R'(x; table[slot[t], g(c)])
               dtable[s, g, k] = sum over t with slot[t] = s, c in g of dy * dR/dcoef_k(x)
    residual:  dx = dy * (ACT'(x) + (slot != 0) * (|x| <= L) * (R'_s(xc) - R'_0(xc)))
               dtable[s != 0] as above at xc; the base row (slot 0) is frozen: no gradient.
    dR/da_i = x^i / Q,  dR/db_j = -sign(b_j) |x|^(j+1) P / Q^2.

Coefficient gradients are reduced inside each program (over its BLOCK_C channels, per row)
before one float32 atomic per (row, coefficient): BLOCK_C times fewer atomics than one per
element, the cost KAT pays (FlashKAT reports 86.5x from fixing it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nora_runtime.kernels._rational_math import base_act_grad, load_coefs, pq
from nora_runtime.kernels.rational_fwd import blocks, check_args
from nora_runtime.rational import ACTIVATIONS


@triton.jit
def _sign(b):
    return tl.where(b > 0, 1.0, tl.where(b < 0, -1.0, 0.0))


@triton.jit
def _add_row_sums(ptr, v, rmask):
    tl.atomic_add(ptr, tl.sum(v, axis=1), mask=rmask)


@triton.jit
def _rational_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, slot_ptr, tab_ptr, dtab_ptr,
    T, GS, stride_dyt, stride_xt, stride_dxt, stride_ts, stride_tg, stride_ds, stride_dg, clamp,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cin = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < T
    mask = rmask[:, None] & (cin < GS)[None, :]
    rows64 = rows.to(tl.int64)
    cols = g.to(tl.int64) * GS + cin

    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = load_coefs(tab_ptr + slot * stride_ts + g * stride_tg,
                                                        rmask)
    a0 = a0[:, None]
    a1 = a1[:, None]
    a2 = a2[:, None]
    a3 = a3[:, None]
    a4 = a4[:, None]
    a5 = a5[:, None]
    b0 = b0[:, None]
    b1 = b1[:, None]
    b2 = b2[:, None]
    b3 = b3[:, None]

    x = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dyt + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    if RESIDUAL:
        inside = tl.abs(x) <= clamp
        xe = tl.minimum(tl.maximum(x, -clamp), clamp)
        # slot 0 rows (and masked lanes) carry no adapter: no coefficient gradient from them
        dr = tl.where(mask & (slot != 0)[:, None], dy, 0.0)
    else:
        xe = x
        dr = tl.where(mask, dy, 0.0)
    p, q = pq(xe, a0, a1, a2, a3, a4, a5, b0, b1, b2, b3)
    ax = tl.abs(xe)
    rq = 1.0 / q
    r = p * rq
    # dR/dx = (P' - R Q') / Q
    dp = (((5.0 * a5 * xe + 4.0 * a4) * xe + 3.0 * a3) * xe + 2.0 * a2) * xe + a1
    dq = (((4.0 * tl.abs(b3) * ax + 3.0 * tl.abs(b2)) * ax + 2.0 * tl.abs(b1)) * ax
          + tl.abs(b0)) * _sign(xe)
    dr_dx = (dp - r * dq) * rq
    if RESIDUAL:
        c0, c1, c2, c3, c4, c5, d0, d1, d2, d3 = load_coefs(tab_ptr + g * stride_tg, True)
        p0, q0 = pq(xe, c0, c1, c2, c3, c4, c5, d0, d1, d2, d3)
        r0 = p0 / q0
        dp0 = (((5.0 * c5 * xe + 4.0 * c4) * xe + 3.0 * c3) * xe + 2.0 * c2) * xe + c1
        dq0 = (((4.0 * tl.abs(d3) * ax + 3.0 * tl.abs(d2)) * ax + 2.0 * tl.abs(d1)) * ax
               + tl.abs(d0)) * _sign(xe)
        ddelta = tl.where(inside & (slot != 0)[:, None], dr_dx - (dp0 - r0 * dq0) / q0, 0.0)
        dx = dy * (base_act_grad(x, ACT) + ddelta)
    else:
        dx = dy * dr_dx
    tl.store(dx_ptr + rows64[:, None] * stride_dxt + cols[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # coefficient gradients: per-row sums over this program's channels, one atomic each
    gn = dr * rq  # dy / Q: times x^i for a_i
    gd = -dr * r * rq  # -dy P / Q^2: times |x|^(j+1) sign(b_j) for b_j
    dptr = dtab_ptr + slot * stride_ds + g * stride_dg
    _add_row_sums(dptr + 0, gn, rmask)
    _add_row_sums(dptr + 1, gn * xe, rmask)
    _add_row_sums(dptr + 2, gn * xe * xe, rmask)
    _add_row_sums(dptr + 3, gn * xe * xe * xe, rmask)
    _add_row_sums(dptr + 4, gn * xe * xe * xe * xe, rmask)
    _add_row_sums(dptr + 5, gn * xe * xe * xe * xe * xe, rmask)
    _add_row_sums(dptr + 6, gd * ax * _sign(b0), rmask)
    _add_row_sums(dptr + 7, gd * ax * ax * _sign(b1), rmask)
    _add_row_sums(dptr + 8, gd * ax * ax * ax * _sign(b2), rmask)
    _add_row_sums(dptr + 9, gd * ax * ax * ax * ax * _sign(b3), rmask)


def rational_backward(
    dy: torch.Tensor, x: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, *,
    act: str = "silu", mode: str = "replace", clamp: float = 4.0,
    block: tuple[int, int] | None = None, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of rational_forward (ungated) w.r.t. x and the table.

    dy, x: [T, C] (same dtype), table: [S, G, 10] float32, slot: [T] int32.
    Returns dx [T, C] in x's dtype and dtable [S, G, 10] float32 (contiguous).
    """
    T, C, G = check_args(x, table, slot, act, mode)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.stride(1) != 1 or dy.device != x.device:
        raise ValueError("dy must match x in shape, dtype, device and channel contiguity")
    dx = torch.empty((T, C), dtype=x.dtype, device=x.device)
    dtab = torch.zeros(table.shape, dtype=torch.float32, device=x.device)
    if T == 0:
        return dx, dtab
    GS = C // G
    bt, bc = block or blocks(T, GS)
    grid = (triton.cdiv(T, bt), G, triton.cdiv(GS, bc))
    _rational_bwd_kernel[grid](
        dy, x, dx, slot, table, dtab,
        T, GS, dy.stride(0), x.stride(0), dx.stride(0), table.stride(0), table.stride(1),
        dtab.stride(0), dtab.stride(1), float(clamp),
        ACT=ACTIVATIONS.index(act), RESIDUAL=mode == "residual", BLOCK_T=bt, BLOCK_C=bc,
        num_warps=num_warps,
    )
    return dx, dtab

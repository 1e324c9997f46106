"""Backward of the multi-tenant rational activation: dx and coefficient gradients.

Semantics (torch notation, forward as in rational_fwd; R' = dR/dx):
    replace:   dx[t, c] = dy * R'(x; table[slot[t], g(c)])
               dtable[s, g, k] = sum over t with slot[t] = s, c in g of dy * dR/dcoef_k(x)
    residual:  dx = dy * (ACT'(x) + (slot != 0) * (|x| <= L) * (R'_s(xc) - R'_0(xc)))
               dtable[s != 0] as above at xc; the base row (slot 0) is frozen: no gradient.
    dR/da_i = x^i / Q,  dR/db_j = -sign(b_j) |x|^(j+1) P / Q^2.

Coefficient gradients are reduced inside each program (a block of rows over a whole group's
channels) before one float32 atomic per (row, coefficient): C / G times fewer atomics than one
per element, the cost KAT pays (FlashKAT reports 86.5x from fixing it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nora_runtime.kernels._rational_math import base_act_grad, fast_math, fast_rcp, load_coefs, pq
from nora_runtime.kernels.rational_fwd import check_args
from nora_runtime.rational import ACTIVATIONS


@triton.jit
def _sign(b):
    return tl.where(b > 0, 1.0, tl.where(b < 0, -1.0, 0.0))


@triton.jit
def _rational_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, slot_ptr, tab_ptr, dtab_ptr,
    T, GS, stride_dyt, stride_xt, stride_dxt, stride_ts, stride_tg, stride_ds, stride_dg, clamp,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr, FAST: tl.constexpr,
):
    # One program: BLOCK_T rows x all GS channels of group g, walked BLOCK_C at a time, so the
    # coefficient gradients of a row reach memory once (10 atomics per row and group).
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)

    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = load_coefs(tab_ptr + slot * stride_ts + g * stride_tg,
                                                        rmask)
    a0, a1, a2, a3, a4, a5 = a0[:, None], a1[:, None], a2[:, None], a3[:, None], a4[:, None], \
        a5[:, None]
    b0, b1, b2, b3 = tl.abs(b0[:, None]), tl.abs(b1[:, None]), tl.abs(b2[:, None]), \
        tl.abs(b3[:, None])
    if RESIDUAL:
        c0, c1, c2, c3, c4, c5, d0, d1, d2, d3 = load_coefs(tab_ptr + g * stride_tg, g >= 0)
        d0, d1, d2, d3 = tl.abs(d0), tl.abs(d1), tl.abs(d2), tl.abs(d3)
        adapted = (slot != 0)[:, None]  # slot 0 rows carry no adapter: no coefficient gradient

    s0 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s1 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s3 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s4 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s5 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s6 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s7 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s8 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    s9 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for c_start in tl.range(0, GS, BLOCK_C, num_stages=STAGES):  # loads run STAGES ahead
        cin = c_start + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cin < GS)[None, :]
        cols = g.to(tl.int64) * GS + cin
        x = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dyt + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if RESIDUAL:
            xe = tl.minimum(tl.maximum(x, -clamp), clamp)
            dr = tl.where(adapted, dy, 0.0)
        else:
            xe = x
            dr = dy  # masked lanes load dy = 0
        p, q = pq(xe, a0, a1, a2, a3, a4, a5, b0, b1, b2, b3)
        ax = tl.abs(xe)
        rq = fast_rcp(q, FAST)
        r = p * rq
        # dR/dx = (P' - R Q') / Q
        dp = (((5.0 * a5 * xe + 4.0 * a4) * xe + 3.0 * a3) * xe + 2.0 * a2) * xe + a1
        dq = (((4.0 * b3 * ax + 3.0 * b2) * ax + 2.0 * b1) * ax + b0) * _sign(xe)
        dr_dx = (dp - r * dq) * rq
        if RESIDUAL:
            p0, q0 = pq(xe, c0, c1, c2, c3, c4, c5, d0, d1, d2, d3)
            rq0 = fast_rcp(q0, FAST)
            dp0 = (((5.0 * c5 * xe + 4.0 * c4) * xe + 3.0 * c3) * xe + 2.0 * c2) * xe + c1
            dq0 = (((4.0 * d3 * ax + 3.0 * d2) * ax + 2.0 * d1) * ax + d0) * _sign(xe)
            inside = (tl.abs(x) <= clamp) & adapted
            ddelta = tl.where(inside, dr_dx - (dp0 - p0 * rq0 * dq0) * rq0, 0.0)
            dx = dy * (base_act_grad(x, ACT) + ddelta)
        else:
            dx = dy * dr_dx
        tl.store(dx_ptr + rows64[:, None] * stride_dxt + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # dR/da_i = x^i / Q; dR/d|b_j| = -|x|^(j+1) P / Q^2
        t = dr * rq
        s0 += t
        t *= xe
        s1 += t
        t *= xe
        s2 += t
        t *= xe
        s3 += t
        t *= xe
        s4 += t
        t *= xe
        s5 += t
        t = -dr * r * rq * ax
        s6 += t
        t *= ax
        s7 += t
        t *= ax
        s8 += t
        t *= ax
        s9 += t

    # d|b|/db = sign(b), applied per row after the reduction
    sb = tab_ptr + slot * stride_ts + g * stride_tg
    dptr = dtab_ptr + slot * stride_ds + g * stride_dg
    tl.atomic_add(dptr + 0, tl.sum(s0, axis=1), mask=rmask)
    tl.atomic_add(dptr + 1, tl.sum(s1, axis=1), mask=rmask)
    tl.atomic_add(dptr + 2, tl.sum(s2, axis=1), mask=rmask)
    tl.atomic_add(dptr + 3, tl.sum(s3, axis=1), mask=rmask)
    tl.atomic_add(dptr + 4, tl.sum(s4, axis=1), mask=rmask)
    tl.atomic_add(dptr + 5, tl.sum(s5, axis=1), mask=rmask)
    tl.atomic_add(dptr + 6, tl.sum(s6, axis=1) * _sign(tl.load(sb + 6, rmask, 0.0)), mask=rmask)
    tl.atomic_add(dptr + 7, tl.sum(s7, axis=1) * _sign(tl.load(sb + 7, rmask, 0.0)), mask=rmask)
    tl.atomic_add(dptr + 8, tl.sum(s8, axis=1) * _sign(tl.load(sb + 8, rmask, 0.0)), mask=rmask)
    tl.atomic_add(dptr + 9, tl.sum(s9, axis=1) * _sign(tl.load(sb + 9, rmask, 0.0)), mask=rmask)


def bwd_blocks(T: int, GS: int) -> tuple[int, int]:
    """BLOCK_T x BLOCK_C step of the backward's walk over a group: 16 x 64, the best of the
    H200 sweep (benchmarks/results/); the ten [BLOCK_T, BLOCK_C] gradient accumulators stay
    in registers."""
    block_c = min(64, triton.next_power_of_2(GS))
    return min(max(1, 1024 // block_c), triton.next_power_of_2(T)), block_c


def rational_backward(
    dy: torch.Tensor, x: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, *,
    act: str = "silu", mode: str = "replace", clamp: float = 4.0,
    block: tuple[int, int] | None = None, num_warps: int = 4, stages: int = 3,
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
    bt, bc = block or bwd_blocks(T, GS)
    grid = (triton.cdiv(T, bt), G)
    _rational_bwd_kernel[grid](
        dy, x, dx, slot, table, dtab,
        T, GS, dy.stride(0), x.stride(0), dx.stride(0), table.stride(0), table.stride(1),
        dtab.stride(0), dtab.stride(1), float(clamp),
        ACT=ACTIVATIONS.index(act), RESIDUAL=mode == "residual", BLOCK_T=bt, BLOCK_C=bc,
        STAGES=stages, FAST=fast_math(), num_warps=num_warps,
    )
    return dx, dtab

"""Device functions shared by the rational kernels (fp32 math). Only jitted helpers live here."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Activation kinds as compile-time ints (the order of nora_runtime.rational.ACTIVATIONS).
GELU: tl.constexpr = tl.constexpr(0)
GELU_TANH: tl.constexpr = tl.constexpr(1)
SILU: tl.constexpr = tl.constexpr(2)
IDENTITY: tl.constexpr = tl.constexpr(3)

_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
_K_TANH: tl.constexpr = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)


@triton.jit
def fast_div(p, q, FAST: tl.constexpr):
    """p / q through the GPU's approximate division (MUFU.RCP + FMUL; max 2 ulp for q in
    [2^-126, 2^126], and Q >= 1 always). The IEEE-style division Triton emits cost ~7 SASS
    instructions an element, a quarter of the forward kernel's (sm_90 SASS count). Triton's
    interpreter runs no inline PTX: FAST=False divides plainly there."""
    if FAST:
        return tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=f,f,f", [p, q],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return p / q


@triton.jit
def fast_rcp(q, FAST: tl.constexpr):
    """1 / q, as fast_div."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.f32 $0, $1;", "=f,f", [q],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / q


def fast_math() -> bool:
    """Whether kernels may use inline PTX (not under TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@triton.jit
def load_coefs(ptr, mask):
    """The 10 coefficients at ptr + 0..9 (ptr a tensor of pointers): a0..a5, |b0|..|b3|."""
    a0 = tl.load(ptr + 0, mask=mask, other=0.0)
    a1 = tl.load(ptr + 1, mask=mask, other=0.0)
    a2 = tl.load(ptr + 2, mask=mask, other=0.0)
    a3 = tl.load(ptr + 3, mask=mask, other=0.0)
    a4 = tl.load(ptr + 4, mask=mask, other=0.0)
    a5 = tl.load(ptr + 5, mask=mask, other=0.0)
    b0 = tl.load(ptr + 6, mask=mask, other=0.0)
    b1 = tl.load(ptr + 7, mask=mask, other=0.0)
    b2 = tl.load(ptr + 8, mask=mask, other=0.0)
    b3 = tl.load(ptr + 9, mask=mask, other=0.0)
    return a0, a1, a2, a3, a4, a5, b0, b1, b2, b3


@triton.jit
def pq(x, a0, a1, a2, a3, a4, a5, b0, b1, b2, b3):
    """P(x) and Q(x) by Horner (b signed: |b| taken here)."""
    ax = tl.abs(x)
    p = a5 * x + a4
    p = p * x + a3
    p = p * x + a2
    p = p * x + a1
    p = p * x + a0
    q = tl.abs(b3) * ax + tl.abs(b2)
    q = q * ax + tl.abs(b1)
    q = q * ax + tl.abs(b0)
    q = q * ax + 1.0
    return p, q


@triton.jit
def base_act(x, ACT: tl.constexpr):
    if ACT == GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == GELU_TANH:
        u = _K_TANH * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 1 + tanh(u), overflow-safe
    elif ACT == SILU:
        y = x / (1.0 + tl.exp(-x))  # IEEE division: slot 0 must match F.silu to rounding
    else:
        y = x
    return y


@triton.jit
def base_act_grad(x, ACT: tl.constexpr):
    if ACT == GELU:
        d = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == GELU_TANH:
        u = _K_TANH * (x + 0.044715 * x * x * x)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _K_TANH * (1.0 + 0.134145 * x * x)
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-x))
        d = s * (1.0 + x * (1.0 - s))
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d

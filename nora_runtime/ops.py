"""The multi-tenant rational activation as one call: Triton on GPU, the torch reference on CPU.

`lora_delta(y, x, A, B, scale, idx)` adds each token's own LoRA delta the same way (Triton on
CUDA, `lora_ref` elsewhere), and `add_rmsnorm(x, delta, weight, eps)` a decoder layer's
residual add and the RMSNorm after it (one launch on CUDA).

`rational_act(x, table, slot, ...)` computes, for every token t, the activation of x[t] with the
coefficients of table row slot[t] (semantics in nora_runtime.kernels.rational_fwd), and is
differentiable w.r.t. x and table. The backend is chosen per call: Triton for CUDA tensors, the
torch reference otherwise; NORA_BACKEND=torch|triton forces one (triton on CPU tensors needs
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

from nora_runtime.rational import base_activation, rational

try:  # triton is only a dependency on Linux x86_64 (the engine's model needs it anyway)
    from nora_runtime.kernels.lora import lora_forward, lora_ref
    from nora_runtime.kernels.rational_bwd import rational_backward
    from nora_runtime.kernels.rational_fwd import rational_forward
    from nora_runtime.kernels.rmsnorm import add_rmsnorm as add_rmsnorm_triton
    from nora_runtime.kernels.rmsnorm import add_rmsnorm_ref
except ImportError:  # pragma: no cover - platforms without triton
    rational_forward = rational_backward = lora_forward = lora_ref = None
    add_rmsnorm_triton = add_rmsnorm_ref = None


def rational_act_ref(
    x: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, *, act: str, mode: str,
    clamp: float = 4.0, up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference, float32 math. x: [T, C]; table: [S, G, 10] f32; slot: [T] int."""
    T, C = x.shape
    G = table.shape[1]
    xg = x.float().reshape(T, G, C // G)  # [T, G, GS]
    coef = table[slot.long()].unsqueeze(2)  # [T, G, 1, 10]
    if mode == "replace":
        y = rational(xg, coef)
    elif mode == "residual":
        xc = xg.clamp(-clamp, clamp)
        delta = rational(xc, coef) - rational(xc, table[0].detach().unsqueeze(1))
        y = base_activation(act, xg) + delta * (slot != 0).view(T, 1, 1)
    else:
        raise ValueError(f"mode must be 'replace' or 'residual', got {mode!r}")
    y = y.reshape(T, C)
    if up is not None:
        y = y * up.float()
    return y.to(x.dtype)


class _RationalTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, slot, act, mode, clamp):
        ctx.save_for_backward(x, table, slot)
        ctx.cfg = (act, mode, clamp)
        return rational_forward(x, table, slot, act=act, mode=mode, clamp=clamp)

    @staticmethod
    def backward(ctx, dy):
        x, table, slot = ctx.saved_tensors
        act, mode, clamp = ctx.cfg
        dx, dtab = rational_backward(dy.contiguous(), x, table, slot, act=act, mode=mode,
                                     clamp=clamp)
        return dx, dtab, None, None, None, None


def use_triton(x: torch.Tensor) -> bool:
    forced = os.environ.get("NORA_BACKEND", "")
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"NORA_BACKEND must be torch or triton, got {forced!r}")
    if forced:
        return forced == "triton"
    return x.is_cuda and rational_forward is not None


def rational_act(
    x: torch.Tensor, table: torch.Tensor, slot: torch.Tensor, *, act: str, mode: str,
    clamp: float = 4.0, up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-tenant rational activation of x [..., C] (optionally times `up`, SwiGLU).

    table: [S, G, 10] float32; slot: int tensor of x's leading shape (one slot per token).
    Differentiable w.r.t. x and table (the fused `up` path is inference-only on Triton).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    s = slot.reshape(-1).to(torch.int32).contiguous()
    if s.numel() != x2.shape[0]:
        raise ValueError(f"slot has {s.numel()} entries for {x2.shape[0]} tokens")
    u2 = None if up is None else up.reshape(-1, shape[-1])
    if not use_triton(x):
        return rational_act_ref(x2, table, s, act=act, mode=mode, clamp=clamp, up=u2).view(shape)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if u2 is not None:
        if torch.is_grad_enabled() and (x.requires_grad or table.requires_grad
                                        or u2.requires_grad):
            # training keeps the gate ungated so the Triton backward applies; autograd does * up
            return (_RationalTriton.apply(x2, table, s, act, mode, clamp) * u2).view(shape)
        u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()  # a gate-up half is fine as it is
        return rational_forward(x2, table, s, act=act, mode=mode, clamp=clamp, up=u2).view(shape)
    if torch.is_grad_enabled() and (x.requires_grad or table.requires_grad):
        return _RationalTriton.apply(x2, table, s, act, mode, clamp).view(shape)
    return rational_forward(x2, table, s, act=act, mode=mode, clamp=clamp).view(shape)


def lora_delta(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scale: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Multi-tenant LoRA delta, in place: y[t] += scale[s] * B[s] @ (A[s] @ x[t]) for
    s = idx[t] > 0 (nora_runtime.kernels.lora). x: [T, K]; y: [T, N] (a column slice is fine);
    A: [P, R, K]; B: [P, N, R]; scale: [P] float32; idx: [T] int32. Inference only."""
    if use_triton(x):
        x = x if x.stride(-1) == 1 else x.contiguous()
        return lora_forward(y, x, A, B, scale, idx)
    return lora_ref(y, x, A, B, scale, idx)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + delta), x + delta) (nora_runtime.kernels.rmsnorm): one launch on
    CUDA, the torch code elsewhere. Inference only."""
    if use_triton(x):
        return add_rmsnorm_triton(x, delta, weight, eps)
    return add_rmsnorm_ref(x, delta, weight, eps)

"""Triton rational kernels (forward, SwiGLU, residual, backward) against plain float64 references.

On a machine without a GPU these run through Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nora_runtime.kernels.rational_bwd import rational_backward
from nora_runtime.kernels.rational_fwd import rational_forward, rational_swiglu
from nora_runtime.ops import rational_act_ref
from nora_runtime.rational import ACTIVATIONS, base_activation, base_coefficients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
S = 6  # slots in the test table


def make_table(G: int, act: str = "silu", seed: int = 0) -> torch.Tensor:
    """[S, G, 10]: slot 0 the base fit, the others perturbed adapters."""
    g = torch.Generator().manual_seed(seed)
    base = base_coefficients(act).expand(S, G, 10).clone()
    base[1:] += 0.05 * torch.randn(S - 1, G, 10, generator=g)
    return base.to(DEVICE)


def make_slots(T: int, mix: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mix == "identical":
        s = torch.full((T,), 3)
    elif mix == "distinct":
        s = torch.randperm(max(T, S), generator=g)[:T] % S
    else:  # zipf-skewed: slot k with probability ~ 1 / (k + 1)^1.2
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.2
        s = torch.multinomial(p, T, replacement=True, generator=g)
    return s.to(torch.int32).to(DEVICE)


def ref64(x, table, slot, act, mode, clamp=4.0, up=None):
    """Plain per-element float64 reference: coefficients gathered to [T, C, 10]."""
    T, C = x.shape
    G = table.shape[1]
    coef = table.double()[slot.long()][:, torch.arange(C, device=x.device) // (C // G)]
    x = x.double()
    a, b = coef[..., :6], coef[..., 6:].abs()

    def R(v, a, b):
        p = sum(a[..., i] * v**i for i in range(6))
        return p / (1 + sum(b[..., j] * v.abs() ** (j + 1) for j in range(4)))

    if mode == "replace":
        y = R(x, a, b)
    else:
        c0 = table.double()[0][torch.arange(C, device=x.device) // (C // G)]
        xc = x.clamp(-clamp, clamp)
        delta = R(xc, a, b) - R(xc, c0[:, :6], c0[:, 6:].abs())
        y = base_activation(act, x) + (slot != 0).double()[:, None] * delta
    return y if up is None else y * up.double()


def check(y, ref, dtype):
    rtol, atol = TOL[dtype]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["replace", "residual"])
@pytest.mark.parametrize("mix", ["identical", "distinct", "zipf"])
@pytest.mark.parametrize("G", [1, 8, 64])
@pytest.mark.parametrize("T", [1, 7, 133])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward(dtype, T, G, mix, mode):
    torch.manual_seed(T * 1000 + G)
    C = G * 3 if G > 1 else 40  # odd group widths
    x = (torch.randn(T, C, device=DEVICE) * 3).to(dtype)  # reaches past the clamp at 4
    table, slot = make_table(G), make_slots(T, mix)
    y = rational_forward(x, table, slot, act="silu", mode=mode)
    check(y, ref64(x, table, slot, "silu", mode), dtype)
    # the torch reference used on CPU agrees too
    check(rational_act_ref(x, table, slot, act="silu", mode=mode), ref64(x, table, slot, "silu",
                                                                          mode), dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("mode", ["replace", "residual"])
def test_forward_activations(act, mode):
    torch.manual_seed(1)
    x = torch.randn(7, 64, device=DEVICE) * 4
    table, slot = make_table(8, act), make_slots(7, "distinct")
    y = rational_forward(x, table, slot, act=act, mode=mode)
    check(y, ref64(x, table, slot, act, mode), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_slot0_is_the_original_activation(dtype):
    torch.manual_seed(2)
    x = (torch.randn(133, 96, device=DEVICE) * 8).to(dtype)
    slot = torch.zeros(133, dtype=torch.int32, device=DEVICE)
    for act, fn in [("silu", F.silu), ("gelu", F.gelu),
                    ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh"))]:
        y = rational_forward(x, make_table(8, act), slot, act=act, mode="residual")
        # within dtype rounding of the framework's own activation (one ulp)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(y, fn(x), rtol=eps, atol=1e-6)


@pytest.mark.parametrize("mode", ["replace", "residual"])
def test_large_inputs_stay_finite_and_residual_bounded(mode):
    big = torch.cat([torch.logspace(0, 4, 64), -torch.logspace(0, 4, 64)])  # |x| up to 1e4
    x = big.repeat(5, 1).to(DEVICE)  # [5, 128]
    table = make_table(8)
    slot = torch.arange(5, dtype=torch.int32, device=DEVICE)
    y = rational_forward(x, table, slot, act="silu", mode=mode)
    assert torch.isfinite(y).all()
    if mode == "residual":
        # the adapter's change is bounded by its maximum on the clamp range [-4, 4], per group
        grid = torch.linspace(-4, 4, 2000, device=DEVICE).repeat(5, 8)  # each group spans it
        d_grid = rational_forward(grid, table, slot, act="silu", mode=mode) - F.silu(grid)
        bound = d_grid.abs().view(5, 8, 2000).amax(dim=2, keepdim=True)  # [5, 8, 1]
        change = (y - F.silu(x)).abs().view(5, 8, 16)
        rounding = 4 * torch.finfo(torch.float32).eps * x.abs().view(5, 8, 16)  # of y - silu(x)
        assert (change <= bound + 1e-5 + rounding).all()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["replace", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype, mode, fused):
    torch.manual_seed(3)
    T, C = 133, 48
    gu = (torch.randn(T, 2 * C, device=DEVICE) * 3).to(dtype)
    gate, up = gu[:, :C], gu[:, C:]
    table, slot = make_table(8), make_slots(T, "zipf")
    y = rational_swiglu(gu, None, table, slot, mode=mode) if fused else \
        rational_swiglu(gate.contiguous(), up.contiguous(), table, slot, mode=mode)
    check(y, ref64(gate, table, slot, "silu", mode, up=up), dtype)


@pytest.mark.parametrize("mode", ["replace", "residual"])
def test_batch_equals_rows_alone(mode):
    """Multi-tenant correctness: each row of a mixed batch equals that row run alone."""
    torch.manual_seed(4)
    x = torch.randn(7, 64, device=DEVICE) * 3
    table, slot = make_table(8), make_slots(7, "distinct")
    y = rational_forward(x, table, slot, mode=mode)
    for t in range(7):
        alone = rational_forward(x[t:t + 1], table, slot[t:t + 1], mode=mode)
        assert torch.equal(y[t], alone[0])
    assert not torch.equal(y[slot == 1], rational_forward(x, table, torch.zeros_like(slot),
                                                          mode=mode)[slot == 1])


@pytest.mark.parametrize("mode", ["replace", "residual"])
@pytest.mark.parametrize("mix", ["identical", "distinct", "zipf"])
@pytest.mark.parametrize("G", [1, 8, 64])
@pytest.mark.parametrize("T", [1, 7, 133])
def test_backward_matches_autograd(T, G, mix, mode):
    torch.manual_seed(5 + T + G)
    C = G * 3 if G > 1 else 40
    x = torch.randn(T, C, device=DEVICE) * 3
    dy = torch.randn(T, C, device=DEVICE)
    table, slot = make_table(G), make_slots(T, mix)
    dx, dtab = rational_backward(dy, x, table, slot, act="silu", mode=mode)

    x64 = x.double().requires_grad_(True)
    t64 = table.double().requires_grad_(True)
    y = ref64(x64, t64, slot, "silu", mode) if mode == "replace" else \
        residual_ref_frozen_base(x64, t64, slot)
    gx, gt = torch.autograd.grad(y, (x64, t64), dy.double())
    torch.testing.assert_close(dx.double(), gx, rtol=1e-4, atol=1e-5)
    # coefficient grads are sums over many tokens in float32: compare by relative norm
    assert (dtab.double() - gt).norm() <= 1e-5 * gt.norm() + 1e-6
    if mode == "residual":
        assert (dtab[0] == 0).all()  # the base row is frozen


def residual_ref_frozen_base(x, table, slot):
    """Residual reference whose base row is a constant (slot 0 is frozen: no gradient)."""
    base = table[0:1].detach()
    return ref64(x, torch.cat([base, table[1:]]), slot, "silu", "residual")


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "identity"])
def test_backward_activations_residual(act):
    torch.manual_seed(6)
    x = torch.randn(7, 64, device=DEVICE) * 3
    dy = torch.randn(7, 64, device=DEVICE)
    table, slot = make_table(8, act), make_slots(7, "distinct")
    dx, _ = rational_backward(dy, x, table, slot, act=act, mode="residual")
    x64 = x.double().requires_grad_(True)
    y = ref64(x64, table, slot, act, "residual")
    (gx,) = torch.autograd.grad(y, x64, dy.double())
    torch.testing.assert_close(dx.double(), gx, rtol=1e-4, atol=1e-5)


def test_backward_bf16_runs_close():
    torch.manual_seed(7)
    x = (torch.randn(133, 64, device=DEVICE) * 3).bfloat16()
    dy = torch.randn(133, 64, device=DEVICE).bfloat16()
    table, slot = make_table(8), make_slots(133, "zipf")
    dx, dtab = rational_backward(dy, x, table, slot)
    dx32, dtab32 = rational_backward(dy.float(), x.float(), table, slot)
    torch.testing.assert_close(dx.float(), dx32, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(dtab, dtab32, rtol=1e-3, atol=1e-3)  # fp32 math on bf16 inputs


def test_table_view_of_a_layered_table():
    """A [:, layer] view of a [S, L, G, 10] table (strided) works without copies."""
    torch.manual_seed(8)
    full = torch.stack([make_table(8, seed=s) for s in range(3)], dim=1)  # [S, 3, 8, 10]
    x = torch.randn(7, 64, device=DEVICE)
    slot = make_slots(7, "distinct")
    for layer in range(3):
        y = rational_forward(x, full[:, layer], slot)
        check(y, ref64(x, full[:, layer].contiguous(), slot, "silu", "replace"), torch.float32)


def test_argument_checks():
    x = torch.randn(4, 30, device=DEVICE)
    slot = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of groups"):
        rational_forward(x, make_table(8), slot)
    with pytest.raises(ValueError, match="slot must be contiguous int32"):
        rational_forward(x[:, :16], make_table(8), slot.long())
    with pytest.raises(ValueError, match="table must be float32"):
        rational_forward(x[:, :16], make_table(8).double(), slot)
    with pytest.raises(ValueError, match="mode"):
        rational_forward(x[:, :16], make_table(8), slot, mode="bogus")
    with pytest.raises(TypeError, match="dtype"):
        rational_forward(x[:, :16].double(), make_table(8), slot)
    assert rational_forward(x[:0, :16], make_table(8), slot[:0]).shape == (0, 16)

"""The rational definition and its shipped fits (DESIGN.md s1)."""

from __future__ import annotations

import math

import pytest
import torch

from nora_runtime.rational import (
    ACTIVATIONS,
    FIT_SPECS,
    base_activation,
    base_coefficients,
    fit,
    group_of_channel,
    load_fits,
    max_fit_error,
    rational,
)

# Measured max |R - act| on [-4, 4] with the shipped "narrow" fits (float64, 200,001 points).
# SiLU reaches 4.8e-6. GELU (erf) and GELU-tanh reach 2.5e-3 and 2.9e-3 and no lower: see
# test_gelu_fit_limit below for why 1e-3 is out of reach of this Q.
BOUND_ON_4 = {"silu": 1e-5, "gelu": 3e-3, "gelu_tanh": 3.5e-3, "identity": 0.0}


def test_definition_matches_formula():
    torch.manual_seed(0)
    c = torch.randn(10, dtype=torch.float64)
    x = torch.randn(100, dtype=torch.float64) * 3
    a, b = c[:6], c[6:]
    p = sum(a[i] * x**i for i in range(6))
    q = 1 + sum(b[j].abs() * x.abs() ** (j + 1) for j in range(4))
    torch.testing.assert_close(rational(x, c), p / q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_shipped_fit_error(kind):
    f = load_fits()["narrow"][kind]
    err = max_fit_error(kind, base_coefficients(kind, "narrow"), -4.0, 4.0)
    assert err <= BOUND_ON_4[kind]
    # the recorded error is the measured one
    assert err == pytest.approx(f.max_abs_err, rel=1e-3, abs=1e-9)
    assert f.fit_range == 4.0 and f.core is None


# The "wide" fits (the default), measured: max |R - act| on [-4, 4] 3.1e-3 (GELU), 3.1e-3
# (GELU-tanh), 5.9e-4 (SiLU); on [4 <= |x| <= 24] at most 0.11 |x| (the narrow fits: 0.64 |x|).
# Their error on [-24, 24] (2.6 GELU, 1.7 SiLU, at the far ends) is what a 5/4 rational allows:
# it grows like (a5/|b3|) x on both sides, GELU like x on one and 0 on the other.
WIDE_BOUND_ON_4 = {"silu": 1e-3, "gelu": 3.5e-3, "gelu_tanh": 3.5e-3, "identity": 0.0}


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_wide_fit_error(kind):
    f = load_fits()["wide"][kind]
    spec = FIT_SPECS["wide"]
    assert (f.fit_range, f.core, f.tail_power) == (spec["fit_range"], spec["core"],
                                                   spec["tail_power"])
    c = base_coefficients(kind, "wide")
    err = max_fit_error(kind, c, -f.fit_range, f.fit_range)
    assert err == pytest.approx(f.max_abs_err, rel=1e-3, abs=1e-9)  # recorded = measured
    assert max_fit_error(kind, c, -4.0, 4.0) <= WIDE_BOUND_ON_4[kind]
    x = torch.linspace(4.0, f.fit_range, 20_001, dtype=torch.float64)
    x = torch.cat([-x, x])
    tail = (rational(x, c.double()) - base_activation(kind, x)).abs() / x.abs()
    assert tail.max() <= 0.12


def test_default_fit_is_wide_and_names_are_checked():
    for kind in ACTIVATIONS:
        torch.testing.assert_close(base_coefficients(kind), base_coefficients(kind, "wide"),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown fit"):
        base_coefficients("gelu", "medium")
    with pytest.raises(ValueError, match="no rational fit"):
        base_coefficients("relu")


@pytest.mark.parametrize("name", list(FIT_SPECS))
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_finite_for_large_inputs(kind, name):
    x = torch.cat([torch.logspace(-3, 4, 500), -torch.logspace(-3, 4, 500)])  # |x| up to 1e4
    y = rational(x, base_coefficients(kind, name))  # float32, as the kernels compute
    assert torch.isfinite(y).all()


def test_identity_is_exact():
    x = torch.randn(1000, dtype=torch.float64) * 100
    torch.testing.assert_close(rational(x, base_coefficients("identity").double()), x)


def test_denominator_never_below_one():
    torch.manual_seed(1)
    c = torch.randn(64, 10)
    x = torch.randn(64, 256) * 10
    one = torch.tensor([1.0, 0, 0, 0, 0, 0])  # P = 1 -> R = 1/Q
    r = rational(x, torch.cat([one.expand(64, 6), c[:, 6:]], 1)[:, None, :].expand(64, 256, 10))
    assert (r <= 1.0).all() and (r > 0).all()


def test_fit_reproduces_shipped_silu():
    c = fit("silu", 4.0)
    assert max_fit_error("silu", c, -4.0, 4.0) <= BOUND_ON_4["silu"]


def test_fit_reproduces_wide_gelu():
    c = fit("gelu", **FIT_SPECS["wide"])
    assert max_fit_error("gelu", c, -4.0, 4.0) <= WIDE_BOUND_ON_4["gelu"]
    assert max_fit_error("gelu", c, -24.0, 24.0) <= 3.0


def test_gelu_fit_limit():
    """Why GELU stops near 2.7e-3 under this Q (and SiLU does not).

    GELU's odd part is exactly x/2, its even part (x/2) erf(x/sqrt 2). Q depends on |x| only, so
    the even part must come from (a0 + a2 x^2 + a4 x^4) / Q: a [4/4] even rational against a
    function whose erf saturates like a Gaussian. SiLU's even part (x/2) tanh(x/2) has poles at
    +-i pi and is far easier for rationals. Fitting the even part alone with Q restricted to
    even powers (the best case for the odd part) already errs ~2e-3: the limit is the form,
    not the optimiser.
    """
    x = 4.0 * torch.cos(torch.linspace(0, math.pi, 2001, dtype=torch.float64))
    even = 0.5 * x * torch.erf(x / math.sqrt(2))
    # linearised minimax-ish LS for (a0 + a2 x^2 + a4 x^4) / (1 + b1 x^2 + b3 x^4)
    X = torch.stack([x**0, x**2, x**4, -even * x**2, -even * x**4], 1)
    w = torch.ones_like(x)
    best = math.inf
    for _ in range(200):
        s = torch.linalg.lstsq(X * w[:, None], even * w).solution
        q = 1 + s[3] * x**2 + s[4] * x**4
        err = ((s[0] + s[1] * x**2 + s[2] * x**4) / q - even).abs()
        best = min(best, err.max().item())
        w = w * err.sqrt() / q
        w = w / w.mean()
    assert best > 1e-3


def test_group_of_channel():
    g = group_of_channel(12, 3)
    assert g.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="multiple"):
        group_of_channel(10, 3)


def test_base_activation_rejects_unknown():
    with pytest.raises(ValueError, match="unknown activation"):
        base_activation("relu", torch.zeros(1))

"""The group-rational activation of DESIGN.md s1, in one place, and its least-squares fits.

    P(x) = a0 + a1 x + a2 x^2 + a3 x^3 + a4 x^4 + a5 x^5
    Q(x) = 1 + |b0| |x| + |b1| |x|^2 + |b2| |x|^3 + |b3| |x|^4      (Q >= 1: no poles)
    R(x) = P(x) / Q(x)

A coefficient row is 10 float32 values: a0..a5 then b0..b3 (signs of b are kept; only |b|
enters Q). Channel c of C belongs to group c // (C / G).

The fitted coefficients of each base activation ship in `fits.json`, twice (FIT_SPECS): "narrow"
(tightest on [-4, 4]) and "wide" (the default: tight on [-4, 4], bounded error growth out to
|x| = 24, for real models' pre-activations), each with its fit range, weight and measured error;
`python -m nora_runtime.rational` refits and rewrites that file.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

N_NUM = 6  # numerator coefficients a0..a5
N_DEN = 4  # denominator coefficients b0..b3
N_COEF = N_NUM + N_DEN

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "identity")
# "replace": the rational is the activation; "residual": act(x) + R_adapter - R_base (DESIGN s1)
MODES = ("replace", "residual")
FITS_PATH = Path(__file__).with_name("fits.json")


def base_activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The exact activation that a fit approximates (computed in x's dtype)."""
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "silu":
        return F.silu(x)
    if kind == "identity":
        return x
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {ACTIVATIONS}")


def rational(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """R(x) for coefficient rows `coef` [..., 10] broadcast against x (math in coef's dtype)."""
    a = coef[..., :N_NUM]
    b = coef[..., N_NUM:].abs()
    x = x.to(coef.dtype)
    ax = x.abs()
    p = a[..., 5]
    for i in range(4, -1, -1):  # Horner
        p = p * x + a[..., i]
    q = b[..., 3]
    for j in range(2, -1, -1):
        q = q * ax + b[..., j]
    q = q * ax + 1.0
    return p / q


def group_of_channel(C: int, G: int) -> torch.Tensor:
    """Group index of each of C channels: c // (C / G). [C] int64."""
    if G <= 0 or C % G:
        raise ValueError(f"channels C={C} must be a positive multiple of groups G={G}")
    return torch.arange(C) // (C // G)


# The shipped fits of every kind (fits.json: {fit name: {kind: entry}}), and how each is made.
# "narrow": plain near-minimax on [-4, 4], the tightest fit of the bulk.
# "wide": near-minimax of the tail-weighted error w(x) |R - act| on [-24, 24], with
# w(x) = min(1, 4 / |x|) ** 4.5 (tail_weight). Real MLP pre-activations reach far past 4
# (all-MiniLM-L6-v2: [-17, 25], ~1% beyond |x| > 4), where the narrow fit grows away from the
# activation (its GELU gives 41 at x = 25); a 5/4 rational cannot follow GELU's two asymptotes
# (it grows like (a5/|b3|) x on both sides), so the weight keeps [-4, 4] nearly as tight as the
# narrow fit and lets the allowed error grow like |x| ** 4.5 outside. The power was chosen on
# MiniLM's sentence embeddings (min cosine vs the original: 0.9995 at 4, 0.9997 at 4.5-5,
# 0.999 at 6; ranges 16-28 alike); plain fits on [-r, r] reach at most 0.998 (r = 10).
FIT_SPECS = {
    "narrow": dict(fit_range=4.0, core=None, tail_power=0.0),
    "wide": dict(fit_range=24.0, core=4.0, tail_power=4.5),
}
DEFAULT_FIT = "wide"  # what conversion and serving use: it keeps real models' outputs


@dataclass(frozen=True)
class Fit:
    """Fitted coefficients of one base activation, as shipped."""

    kind: str
    name: str  # key of FIT_SPECS
    coef: tuple[float, ...]  # a0..a5, b0..b3
    fit_range: float  # fitted on [-fit_range, fit_range]
    max_abs_err: float  # max |R - act| measured on that range, float64
    core: float | None  # error weight tail_weight(x, core, tail_power); None: unweighted
    tail_power: float

    def tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(self.coef, dtype=dtype)


@functools.cache
def load_fits() -> dict[str, dict[str, Fit]]:
    """All shipped fits: {fit name: {kind: Fit}}."""
    raw = json.loads(FITS_PATH.read_text())
    return {name: {k: Fit(kind=k, name=name, coef=tuple(v["coef"]), fit_range=v["fit_range"],
                          max_abs_err=v["max_abs_err"], core=v["core"],
                          tail_power=v["tail_power"]) for k, v in fits.items()}
            for name, fits in raw.items()}


def get_fit(kind: str, fit: str = DEFAULT_FIT) -> Fit:
    fits = load_fits()
    if fit not in fits:
        raise ValueError(f"unknown fit {fit!r}; have {sorted(fits)}")
    if kind not in fits[fit]:
        raise ValueError(f"no rational fit for activation {kind!r}; have {sorted(fits[fit])}")
    return fits[fit][kind]


def base_coefficients(kind: str, fit: str = DEFAULT_FIT) -> torch.Tensor:
    """The shipped fit `fit` ("wide" or "narrow") of `kind` as a float32 [10] row."""
    return get_fit(kind, fit).tensor()


def max_fit_error(kind: str, coef: torch.Tensor, lo: float, hi: float, n: int = 200_001) -> float:
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    return (rational(x, coef.double()) - base_activation(kind, x)).abs().max().item()


def tail_weight(x: torch.Tensor, core: float, power: float) -> torch.Tensor:
    """w(x) = min(1, core / |x|) ** power: 1 on the core [-core, core], decaying outside."""
    return (core / x.abs().clamp(min=core)) ** power


def fit(
    kind: str, fit_range: float, n: int = 4001, rounds: int = 40, *, core: float | None = None,
    tail_power: float = 0.0,
) -> torch.Tensor:
    """Near-minimax fit of the 10 coefficients of `kind` under exactly the Q above. [10] float64.

    1. Linearised least squares (Sanathanan-Koerner): P(x) - y (Q(x) - 1) = y, unknowns a and
       the signed b, re-weighted by 1/Q of the previous pass; then b -> |b|.
    2. Levenberg-Marquardt on the true rational with b = s^2 (smooth in s, Q >= 1 always),
       inside Lawson's iteration: each round multiplies the sample weights by |err|, which
       drives the weighted least-squares fit towards the minimax (smallest max |err|) fit.
    Samples are Chebyshev-spaced on [-fit_range, fit_range] (denser at the ends, where the
    error peaks). Float64 throughout; the best max-error iterate is returned.
    With `core`, the error minimised is the weighted w(x) |R - act|, w = tail_weight(x, core,
    tail_power) (every residual above is multiplied by w): minimax on [-core, core], a relative-
    error-like bound outside, so a wide range can be covered without giving up the bulk.
    """
    if kind == "identity":
        return torch.tensor([0.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    x = fit_range * torch.cos(torch.linspace(0.0, math.pi, n, dtype=torch.float64))
    y = base_activation(kind, x)
    X = torch.stack([x**i for i in range(N_NUM)], dim=1)  # [n, 6]
    AX = torch.stack([x.abs() ** (j + 1) for j in range(N_DEN)], dim=1)  # [n, 4]
    w = tail_weight(x, core, tail_power) if core is not None else torch.ones_like(x)

    q = torch.ones_like(x)
    for _ in range(10):
        A = torch.cat([X, -y[:, None] * AX], dim=1) * (w / q)[:, None]
        c = torch.linalg.lstsq(A, y * w / q).solution
        q = 1.0 + AX @ c[N_NUM:].abs()
    p = torch.cat([c[:N_NUM], c[N_NUM:].abs().sqrt()])  # a, s with b = s^2

    def model(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = p[N_NUM:]
        Q = 1.0 + AX @ (s * s)
        R = (X @ p[:N_NUM]) / Q
        J = torch.cat([X / Q[:, None], -(R / Q)[:, None] * AX * (2 * s)[None, :]], dim=1)
        return R, J

    weights = torch.full_like(x, 1.0 / n)
    best, best_err = None, math.inf
    for _ in range(rounds):
        sw = weights.sqrt() * w
        lam = 1e-3
        for _ in range(50):
            R, J = model(p)
            res, Jw = (R - y) * sw, J * sw[:, None]
            H, grad, f0 = Jw.T @ Jw, Jw.T @ res, (res**2).sum()
            while lam < 1e10:
                step = torch.linalg.solve(H + lam * torch.diag(H.diag()), -grad)
                if (((model(p + step)[0] - y) * sw) ** 2).sum() < f0:
                    p, lam = p + step, max(lam / 5, 1e-12)
                    break
                lam *= 5
            else:
                break
        err = (model(p)[0] - y).abs() * w
        if err.max() < best_err:
            best, best_err = torch.cat([p[:N_NUM], p[N_NUM:] ** 2]), err.max().item()
        weights = weights * err
        weights = weights / weights.sum()
    return best


def refit(path: Path = FITS_PATH) -> dict:
    """Refit every kind for every FIT_SPECS entry and rewrite `path`."""
    out = {}
    for name, spec in FIT_SPECS.items():
        out[name] = {}
        for kind in ACTIVATIONS:
            c = fit(kind, **spec).float().double()  # ship what the kernels use: float32
            r = spec["fit_range"]
            out[name][kind] = {"coef": [float(v) for v in c], **spec,
                               "max_abs_err": max_fit_error(kind, c, -r, r)}
    path.write_text(json.dumps(out, indent=2) + "\n")
    load_fits.cache_clear()
    return out


if __name__ == "__main__":
    for name, fits in refit().items():
        for k, v in fits.items():
            r = v["fit_range"]
            print(f"{name:6s} {k:10s} max|err| on [-{r}, {r}] = {v['max_abs_err']:.3e}, "
                  f"on [-4, 4] = {max_fit_error(k, torch.tensor(v['coef']), -4, 4):.3e}")

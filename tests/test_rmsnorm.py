"""The fused residual add + RMSNorm kernel (nora_runtime/kernels/rmsnorm.py) against the torch
code it replaces, in float64 and in the kernel's dtypes; odd sizes, a zero-row batch, rows that
are not contiguous with each other, and the wrapper's checks. On a machine without a GPU the
kernel runs through Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from nora_runtime.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def inputs(T: int, H: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) * 3).to(DEVICE, dtype)
    d = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(DEVICE, dtype)
    return x, d, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("T", "H"), [(1, 7), (7, 133), (33, 64)])
def test_add_rmsnorm_matches_the_torch_code(dtype, T, H):
    x, d, w = inputs(T, H, dtype)
    h, s = add_rmsnorm(x, d, w, 1e-5)
    want_h, want_s = add_rmsnorm_ref(x, d, w, 1e-5)
    assert h.dtype == s.dtype == dtype and h.shape == s.shape == (T, H)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter casts float32 to bfloat16 by truncation (measured: all 931
        # elements of a 7 x 133 sum equal the truncated value), a GPU to nearest like torch
        torch.testing.assert_close(s, want_s, rtol=2 ** -7, atol=0)
        rtol, atol = 2 * TOL[dtype][0], TOL[dtype][1]  # three truncations: up to 2 ulps in h
    else:
        assert torch.equal(s, want_s)  # the residual stream: exactly torch's x + delta
        rtol, atol = TOL[dtype]
    torch.testing.assert_close(h, want_h, rtol=rtol, atol=atol)
    # and both against float64 math
    s64 = x.double() + d.double()
    h64 = w.double() * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(h.double(), h64, rtol=4 * rtol, atol=4 * atol)


def test_strided_rows_and_empty_batch():
    x, d, w = inputs(6, 40, torch.float32, seed=1)
    wide = torch.zeros(6, 64, device=DEVICE)
    wide[:, :40] = x
    h, s = add_rmsnorm(wide[:, :40], d, w, 1e-6)  # row stride 64
    want_h, want_s = add_rmsnorm_ref(x, d, w, 1e-6)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    assert torch.equal(s, want_s)
    h0, s0 = add_rmsnorm(x[:0], d[:0], w, 1e-6)
    assert h0.shape == s0.shape == (0, 40)


def test_wrapper_checks():
    x, d, w = inputs(3, 16, torch.float32)
    with pytest.raises(ValueError, match="x and delta"):
        add_rmsnorm(x, d[:, :8], w, 1e-6)
    with pytest.raises(ValueError, match="x and delta"):
        add_rmsnorm(x, d.double(), w, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(x, d, w.double(), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        add_rmsnorm(x.t().contiguous().t(), d, w, 1e-6)

"""RoPE fused with the KV-cache write (nora_runtime/kernels/rope_cache.py) against the torch
code it replaces (nora_runtime.llama.apply_rope, then index_copy_ into the caches): rotated
queries, rotated keys and copied values at scattered cache rows, every other row untouched;
odd head counts, views with a row stride, float32 and bfloat16. On a machine without a GPU the
kernel runs through Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from nora_runtime.kernels.rope_cache import rope_and_cache
from nora_runtime.llama import apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 on the CPU: Triton's interpreter casts float32 to bfloat16 by truncation (a GPU
# rounds to nearest, as torch does), so up to one ulp (2^-7 relative) of difference
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2 ** -7, 1e-2)}


def case(N: int, nh: int, nkv: int, d: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(N, (nh + 2 * nkv) * d, generator=g).to(DEVICE, dtype)  # one fused output
    q = qkv[:, :nh * d].view(N, nh, d)  # views with a row stride, as projections give
    k = qkv[:, nh * d:(nh + nkv) * d].view(N, nkv, d)
    v = qkv[:, (nh + nkv) * d:].view(N, nkv, d)
    pos = torch.randint(0, 4096, (N,), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = (pos[:, None] * inv[None, :]).to(DEVICE)
    rows = 3 * N + 5
    idx = torch.randperm(rows, generator=g)[:N].to(DEVICE)
    k_cache = torch.randn(rows, nkv, d, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(rows, nkv, d, generator=g).to(DEVICE, dtype)
    return q, k, v, freqs.cos(), freqs.sin(), idx, k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "nh", "nkv", "d"), [(1, 4, 2, 8), (7, 3, 1, 16), (9, 6, 3, 34)])
def test_rope_and_cache_matches_the_torch_code(dtype, N, nh, nkv, d):
    q, k, v, cos, sin, idx, k_cache, v_cache = case(N, nh, nkv, d, dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = apply_rope(q, cos, sin)
    want_k.index_copy_(0, idx, apply_rope(k, cos, sin))
    want_v.index_copy_(0, idx, v)
    got_q = rope_and_cache(q, k, v, cos, sin, idx, k_cache, v_cache)
    rtol, atol = TOL[dtype] if DEVICE == "cpu" else (1e-6, 1e-6) if dtype == torch.float32 \
        else (2 ** -8, 1e-2)
    torch.testing.assert_close(got_q, want_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(k_cache, want_k, rtol=rtol, atol=atol)
    assert torch.equal(v_cache, want_v)  # values are copied, untouched
    untouched = torch.ones(k_cache.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[idx] = False
    assert torch.equal(k_cache[untouched], want_k[untouched])


def test_wrapper_checks():
    q, k, v, cos, sin, idx, k_cache, v_cache = case(3, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="int64"):
        rope_and_cache(q, k, v, cos, sin, idx.int(), k_cache, v_cache)
    with pytest.raises(ValueError, match="float32"):
        rope_and_cache(q, k, v, cos.double(), sin.double(), idx, k_cache, v_cache)
    with pytest.raises(ValueError, match="one dtype"):
        rope_and_cache(q, k, v, cos, sin, idx, k_cache.double(), v_cache)
    with pytest.raises(ValueError, match="caches must be"):
        rope_and_cache(q, k, v, cos, sin, idx, k_cache[:, :, :4].contiguous(),
                       v_cache[:, :, :4].contiguous())
    assert rope_and_cache(q[:0], k[:0], v[:0], cos[:0], sin[:0], idx[:0], k_cache,
                          v_cache).shape == (0, 2, 8)

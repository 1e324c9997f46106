"""Paged decode attention (Triton) against a plain float32 reference."""

from __future__ import annotations

import pytest
import torch

from nora_runtime.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("ctx", [[1], [7, 133, 1, 40], [300, 5]])
def test_matches_reference(dtype, nh, nkv, ctx):
    torch.manual_seed(len(ctx) * 100 + nh + nkv)
    bs, d, num_blocks = 16, 32, 64
    B = len(ctx)
    k = torch.randn(num_blocks * bs, nkv, d, device=DEVICE).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(B, nh, d, device=DEVICE).to(dtype)
    max_blocks = 24
    perm = torch.randperm(num_blocks)  # scattered, disjoint block tables
    tables = perm[: B * max_blocks % num_blocks or num_blocks].repeat(B * max_blocks)[
        : B * max_blocks].view(B, max_blocks).to(torch.int32).to(DEVICE)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k, v, tables, lens, bs, part=128, block_n=32)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, bs)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_one_sequence_alone_equals_in_batch():
    torch.manual_seed(3)
    bs, d = 16, 32
    k = torch.randn(64 * bs, 2, d, device=DEVICE)
    v = torch.randn_like(k)
    q = torch.randn(3, 8, d, device=DEVICE)
    tables = torch.randperm(64)[:48].view(3, 16).to(torch.int32).to(DEVICE)
    lens = torch.tensor([17, 200, 3], dtype=torch.int32, device=DEVICE)
    batch = paged_decode_attention(q, k, v, tables, lens, bs)
    for b in range(3):
        alone = paged_decode_attention(q[b:b + 1], k, v, tables[b:b + 1], lens[b:b + 1], bs)
        torch.testing.assert_close(alone[0], batch[b], rtol=1e-5, atol=1e-5)


def test_argument_checks():
    q = torch.randn(1, 6, 32)
    k = torch.randn(64, 4, 32)
    t = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="nh % nkv"):
        paged_decode_attention(q, k, k, t, torch.ones(1, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q[:, :4], k, k, t.long(), torch.ones(1, dtype=torch.int32), 16)

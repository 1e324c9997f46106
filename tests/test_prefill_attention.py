"""Paged prefill attention (Triton; Triton's interpreter without a GPU) against a float64
torch reference: ragged prompts, chunks with prior context, decode rows mixed in, GQA, block
boundaries, several tile sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nora_runtime.kernels.prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_block_q,
    prefill_tiles,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_case(new: list[int], ctx: list[int], nh: int, nkv: int, d: int, bs: int,
              dtype: torch.dtype, seed: int, device: str = DEVICE):
    """Random q and a cache whose rows outside every sequence's context are NaN (so a read past
    a context shows), scattered disjoint block tables padded with block 0."""
    g = torch.Generator().manual_seed(seed)
    B = len(new)
    widths = [-(-c // bs) for c in ctx]
    W = max(widths) + 1  # one spare column: table entries past a sequence's blocks are ignored
    num_blocks = sum(widths) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(B, W, dtype=torch.int32)
    k = torch.full((num_blocks * bs, nkv, d), float("nan"))
    v = torch.full_like(k, float("nan"))
    used = 0
    for b, (w, c) in enumerate(zip(widths, ctx, strict=True)):
        tables[b, :w] = perm[used:used + w]
        used += w
        toks = torch.arange(c)
        rows = tables[b, toks // bs].long() * bs + toks % bs
        k[rows] = torch.randn(c, nkv, d, generator=g)
        v[rows] = torch.randn(c, nkv, d, generator=g)
    q = torch.randn(sum(new), nh, d, generator=g)
    q_start = torch.tensor([0, *np.cumsum(new)], dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    to = dict(device=device)
    return (q.to(dtype).to(**to), k.to(dtype).to(**to), v.to(dtype).to(**to), tables.to(**to),
            lens.to(**to), q_start.to(**to))


def check(new, ctx, nh, nkv, d, bs, dtype, seed, block_q=None, device=DEVICE):
    q, k, v, tables, lens, q_start = make_case(new, ctx, nh, nkv, d, bs, dtype, seed, device)
    out = paged_prefill_attention(q, k, v, tables, lens, q_start, bs, block_q=block_q)
    ref = paged_prefill_attention_ref(q.double(), k.double(), v.double(), tables, lens, q_start,
                                      bs)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


CASES = {  # (new tokens, context after the step) per sequence
    "ragged_prompts": ([7, 1, 13, 4], [7, 1, 13, 4]),
    "chunks_after_context": ([5, 3, 6], [21, 3, 40]),
    "mixed_decode_and_prefill": ([1, 9, 1, 1, 4], [17, 9, 1, 33, 12]),
    "block_boundaries": ([8, 4, 5], [16, 8, 9]),  # contexts of whole blocks, chunks across one
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2), (6, 2)])  # MHA, GQA, a group of 3 (padded)
def test_matches_reference(case, dtype, nh, nkv):
    new, ctx = CASES[case]
    check(new, ctx, nh, nkv, d=16, bs=4, dtype=dtype, seed=len(case) + nh, block_q=4)


@pytest.mark.parametrize("block_q", [1, 2, 16])
def test_tile_sizes(block_q):
    """A sequence split over many tiles (block_q 1, 2) and one tile holding it all (16)."""
    check([11, 1, 6], [30, 5, 6], 4, 2, d=16, bs=8, dtype=torch.float32, seed=block_q,
          block_q=block_q)


def test_float16_and_odd_head_dim():
    """fp16, and d = 24 padded to 32 inside the kernel."""
    check([5, 1, 3], [9, 20, 3], 4, 2, d=24, bs=4, dtype=torch.float16, seed=5, block_q=4)
    check([5, 1, 3], [9, 20, 3], 4, 2, d=24, bs=4, dtype=torch.float32, seed=6, block_q=4)


def test_default_tiles_and_long_context():
    """The default block_q (prefill_block_q) and a context of several key blocks (BLOCK_N 64)."""
    check([3, 1, 2], [150, 70, 2], 8, 2, d=32, bs=16, dtype=torch.bfloat16, seed=7)


def test_each_sequence_alone_equals_in_batch():
    new, ctx = [6, 1, 4], [6, 25, 13]
    q, k, v, tables, lens, q_start = make_case(new, ctx, 8, 2, 16, 4, torch.float32, 9)
    batch = paged_prefill_attention(q, k, v, tables, lens, q_start, 4, block_q=2)
    for b in range(3):
        s, e = int(q_start[b]), int(q_start[b + 1])
        alone = paged_prefill_attention(q[s:e], k, v, tables[b:b + 1], lens[b:b + 1],
                                        torch.tensor([0, e - s], dtype=torch.int32,
                                                     device=q.device), 4, block_q=2)
        torch.testing.assert_close(alone, batch[s:e], rtol=1e-6, atol=1e-6)


def test_reference_matches_per_token_softmax():
    """The reference itself against a plain per-query softmax (its mask is the causal one)."""
    new, ctx = [3, 1], [7, 4]
    q, k, v, tables, lens, q_start = make_case(new, ctx, 4, 2, 16, 4, torch.float64, 11, "cpu")
    ref = paged_prefill_attention_ref(q, k, v, tables, lens, q_start, 4)
    for b in range(2):
        for i in range(new[b]):
            pos = ctx[b] - new[b] + i
            toks = torch.arange(pos + 1)
            rows = tables[b, toks // 4].long() * 4 + toks % 4
            for h in range(4):
                kk, vv = k[rows, h // 2], v[rows, h // 2]
                w = (kk @ q[int(q_start[b]) + i, h] / 4.0).softmax(0)
                torch.testing.assert_close(ref[int(q_start[b]) + i, h], w @ vv)


def test_prefill_tiles():
    tiles = prefill_tiles(np.array([5, 1, 8]), 4)
    assert tiles.dtype == np.int32
    assert tiles.tolist() == [[0, 0], [0, 4], [1, 0], [2, 0], [2, 4]]
    # with contexts: most keys read first (seq 1 decodes at 30 keys; seq 2's tiles read 12, 16)
    tiles = prefill_tiles(np.array([5, 1, 8]), 4, np.array([5, 30, 16]))
    assert tiles.tolist() == [[1, 0], [2, 4], [2, 0], [0, 4], [0, 0]]
    assert prefill_block_q(32, 8) == 16 and prefill_block_q(28, 4) == 8  # groups 4 and 7 -> 8
    assert prefill_block_q(4, 4) == 64


def test_argument_checks():
    q, k, v, tables, lens, q_start = make_case([2], [2], 4, 2, 16, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="nh % nkv"):
        paged_prefill_attention(q[:, :3], k, v, tables, lens, q_start, 4)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention(q, k, v, tables, lens, q_start.long(), 4)
    with pytest.raises(ValueError, match="do not match q"):
        paged_prefill_attention(q, k.double(), v.double(), tables, lens, q_start, 4)
    with pytest.raises(ValueError, match="power of two"):
        paged_prefill_attention(q, k, v, tables, lens, q_start, 4, block_q=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_real_shapes(dtype):
    """Compiled kernel on the GPU at Llama-3-8B head shapes (nh 32, nkv 8, d 128), 16-token
    blocks: ragged prompts, a chunk after 700 cached tokens, decode rows in the same launch."""
    new = [128, 1, 77, 300, 1, 1, 64]
    ctx = [128, 513, 77, 1000, 1, 2048, 64]
    check(new, ctx, 32, 8, d=128, bs=16, dtype=dtype, seed=1, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU interpreter's; "
                    "on a GPU, Triton compiles for the device and CPU tensors cannot be read")
def test_bench_attention_smoke():
    """benchmarks/bench_attention.py runs end to end on tiny shapes (so the H200 run is not
    the script's first), and its correctness check passes in every case."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = bench.main(["--smoke"])
    assert [r["case"] for r in doc["rows"]] == list(bench.SMOKE)
    assert all(r["rel_err"] < 1e-4 and r["kernel_ms"] > 0 for r in doc["rows"])
    assert bench.flops([(2, 3)], 1, 1) == 4 * (2 + 3)  # positions 1 and 2 see 2 and 3 keys

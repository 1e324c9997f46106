"""Multi-tenant LoRA kernels (BGMV shrink + expand) against a plain float64 per-token reference,
and the torch reference (`lora_ref`, the CPU path) against the same. Odd sizes, adapter mixes
(all distinct, all identical, some rows without LoRA, Zipf-skewed), zero-padded ranks,
strided outputs (column slices of a fused q | k | v or gate | up tensor), fp32 and bf16.

On a machine without a GPU the Triton kernels run through Triton's interpreter
(tests/conftest.py); keep sizes tiny."""

from __future__ import annotations

import pytest
import torch

from nora_runtime.kernels.lora import lora_expand, lora_forward, lora_ref, lora_shrink

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 2e-2)}
P = 6  # pool rows (row 0: never written, zeros)


def make_pool(K: int, N: int, R: int, dtype: torch.dtype, seed: int = 0):
    """A [P, R, K], B [P, N, R], scale [P]: row 0 zeros, row 5 of rank 2 zero-padded to R."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, R, K, generator=g) / K ** 0.5
    B = torch.randn(P, N, R, generator=g)
    A[0], B[0] = 0, 0
    A[5, 2:], B[5, :, 2:] = 0, 0
    scale = torch.tensor([0.0, 2.0, 0.5, 1.0, 4.0, 0.25])
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype), scale.to(DEVICE)


def make_idx(T: int, mix: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mix == "identical":
        s = torch.full((T,), 3)
    elif mix == "distinct":
        s = torch.arange(1, T + 1) % (P - 1) + 1  # every pool row 1..5, none without LoRA
    elif mix == "some_none":  # -1 and 0 both mean no LoRA
        s = torch.randint(-1, P, (T,), generator=g)
    else:  # zipf-skewed over 0..P-1
        p = 1.0 / torch.arange(1, P + 1, dtype=torch.float64) ** 1.2
        s = torch.multinomial(p, T, replacement=True, generator=g)
    return s.to(torch.int32).to(DEVICE)


def ref64(y, x, A, B, scale, idx):
    """Per token, float64: y[t] + scale[s] * B[s] @ (A[s] @ x[t]) for s = idx[t] > 0."""
    out = y.double().clone()
    for t, s in enumerate(idx.tolist()):
        if s > 0:
            out[t] += scale[s].double() * (B[s].double() @ (A[s].double() @ x[t].double()))
    return out


def check(y, ref, dtype):
    rtol, atol = TOL[dtype]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mix", ["identical", "distinct", "some_none", "zipf"])
@pytest.mark.parametrize(("T", "K", "N", "R"), [(1, 7, 33, 4), (7, 33, 7, 3), (33, 40, 65, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_forward(dtype, T, K, N, R, mix):
    torch.manual_seed(T + K + N)
    x = torch.randn(T, K, device=DEVICE).to(dtype)
    y0 = torch.randn(T, N, device=DEVICE).to(dtype)
    A, B, scale = make_pool(K, N, R, dtype)
    idx = make_idx(T, mix)
    want = ref64(y0, x, A, B, scale, idx)
    y = lora_forward(y0.clone(), x, A, B, scale, idx)
    check(y, want, dtype)
    check(lora_ref(y0.clone(), x, A, B, scale, idx), want, dtype)  # the CPU path agrees too
    none = idx <= 0
    assert torch.equal(y[none], y0[none])  # rows without LoRA are not even rewritten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_zero_rows_and_padded_ranks(dtype):
    T, K, R = 7, 33, 5
    A, _, _ = make_pool(K, 3, R, dtype)
    x = torch.randn(T, K, device=DEVICE).to(dtype)
    idx = torch.tensor([0, 5, -1, 1, 5, 2, 0], dtype=torch.int32, device=DEVICE)
    h = lora_shrink(x, A, idx)
    assert h.dtype == torch.float32 and h.shape == (T, R)
    assert torch.equal(h[idx <= 0], torch.zeros_like(h[idx <= 0]))
    assert torch.equal(h[idx == 5][:, 2:], torch.zeros(2, R - 2, device=DEVICE))  # rank 2 of 5
    want = torch.stack([A[s].double() @ x[t].double() if s > 0 else torch.zeros(R)
                        .double().to(DEVICE) for t, s in enumerate(idx.tolist())])
    check(h, want, torch.float32 if dtype == torch.float32 else dtype)


@pytest.mark.parametrize("split", [1, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_split_partial_sums_add_up(dtype, split):
    """The shrink's K columns split over programs (1 to all in one; 40 columns in 40, 5, 3, 1
    parts, the last one ragged): the expand adds the partial sums to the same result."""
    T, K, N, R = 9, 40, 33, 5
    x = torch.randn(T, K, device=DEVICE).to(dtype)
    y0 = torch.randn(T, N, device=DEVICE).to(dtype)
    A, B, scale = make_pool(K, N, R, dtype, seed=2)
    idx = make_idx(T, "some_none", seed=3)
    want = ref64(y0, x, A, B, scale, idx)
    check(lora_forward(y0.clone(), x, A, B, scale, idx, split=split, block_k=16, block_n=16),
          want, dtype)
    h = lora_shrink(x, A, idx, split=split)
    assert h.shape == (T, R)
    check(lora_expand(y0.clone(), h, B, scale, idx), want, dtype)
    with pytest.raises(ValueError, match="power of two"):
        lora_shrink(x, A, idx, split=12)


def test_k_split_choice():
    """Decode steps split K so that about SHRINK_PROGRAMS programs stream the A rows; long
    prompts keep one program per token; a split is a power of two covering whole blocks."""
    from nora_runtime.kernels.lora import MAX_SPLITS, k_split

    assert k_split(128, 4096, 256) == 512  # 8 splits: 1,024 programs
    assert k_split(128, 14336, 256) == 2048  # 7 splits
    assert k_split(1, 4096, 256) == 256  # at most MAX_SPLITS per token: 16 here
    assert 4096 // k_split(1, 4096, 128) == MAX_SPLITS
    assert k_split(4096, 4096, 256) == 4096  # one program per token
    assert k_split(3, 7, 8) == 8


@pytest.mark.parametrize("fn", [lora_forward, lora_ref])
@pytest.mark.parametrize("sections", [[24, 9, 9], [33, 33]], ids=["q|k|v", "gate|up"])
def test_deltas_into_the_sections_of_a_fused_output(fn, sections):
    """The model adds each projection's delta into its column view of one fused output (q | k | v
    of unequal widths, gate | up): each section gets its own delta, the others stay as they
    are."""
    T, K, R = 7, 16, 4
    x = torch.randn(T, K, device=DEVICE)
    fused = torch.randn(T, sum(sections), device=DEVICE)
    idx = make_idx(T, "some_none", seed=1)
    pools = [make_pool(K, n, R, torch.float32, seed=i) for i, n in enumerate(sections)]
    parts = fused.split(sections, dim=1)  # views with a row stride, at column offsets
    want = torch.cat([ref64(y, x, *pool, idx) for y, pool in zip(parts, pools, strict=True)],
                     dim=1)
    for y, pool in zip(parts, pools, strict=True):
        fn(y, x, *pool, idx)
    check(fused, want, torch.float32)


def test_wrappers_check_shapes_dtypes_and_strides():
    A, B, scale = make_pool(8, 4, 2, torch.float32)
    x, y = torch.randn(3, 8, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    idx = torch.ones(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="idx must be contiguous int32"):
        lora_shrink(x, A, idx.long())
    with pytest.raises(ValueError, match="A must be"):
        lora_shrink(x, A.to(torch.bfloat16), idx)
    with pytest.raises(ValueError, match="x must be"):
        lora_shrink(x.t().contiguous().t(), A, idx)
    h = lora_shrink(x, A, idx)
    with pytest.raises(ValueError, match="scale must be"):
        lora_expand(y, h, B, scale.double(), idx)
    with pytest.raises(ValueError, match="h must be"):
        lora_expand(y, h[:, :1].contiguous(), B, scale, idx)
    with pytest.raises(ValueError, match="same rows and rank"):
        lora_forward(y, x, A[:2], B, scale, idx)
    empty = torch.empty(0, 8, device=DEVICE)
    out = torch.empty(0, 4, device=DEVICE)
    assert lora_forward(out, empty, A, B, scale, idx[:0]).shape == (0, 4)

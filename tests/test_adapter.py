"""NoRA adapters: init, merge formula, group extend, gradients, fingerprint, file round trip,
and one test per load error (each checks the exact exception type and its message)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nora_runtime.adapter import (
    MAX_ADAPTER_BYTES,
    ActivationMismatch,
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterShapeError,
    AdapterValueError,
    AdapterVersionError,
    FingerprintMismatch,
    ModeMismatch,
    NoraAdapter,
    SiteCountMismatch,
    adapter_to_bytes,
    base_fingerprint,
    load_adapter,
    save_adapter,
)
from nora_runtime.rational import base_coefficients
from nora_runtime.table import expand_groups

FP = "ab" * 32
SITES = ["layers.0.mlp.act", "layers.1.mlp.act", "layers.2.mlp.act"]


def make_adapter(groups: int | None = None, base_groups: int = 2, seed: int = 0,
                 trained: bool = True) -> NoraAdapter:
    """An adapter over a perturbed SiLU base [3, base_groups, 10]; `trained` sets B nonzero."""
    g = torch.Generator().manual_seed(seed)
    base = base_coefficients("silu").expand(len(SITES), base_groups, 10).clone()
    base += 0.01 * torch.randn(base.shape, generator=g)
    torch.manual_seed(seed)
    m = NoraAdapter(base, rank=3, alpha=6.0, groups=groups, site_names=SITES, act="silu",
                    mode="residual")
    if trained:
        with torch.no_grad():
            m.num_B.copy_(0.1 * torch.randn(m.num_B.shape, generator=g))
            m.den_B.copy_(0.1 * torch.randn(m.den_B.shape, generator=g))
    return m


def parts(m: NoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A valid adapter file's tensors and metadata, to corrupt one thing at a time."""
    data = adapter_to_bytes(m, base_fingerprint=FP)
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return {k: v.clone() for k, v in st_load(data).items()}, meta


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


# ---- module ----------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [None, 4])
def test_fresh_adapter_merges_to_base_exactly(groups):
    m = make_adapter(groups=groups, trained=False)
    G = groups or 2
    assert m.merged().shape == (3, G, 10)
    assert torch.equal(m.merged(), m.base.repeat_interleave(G // 2, dim=1))
    assert not m.num_B.any() and not m.den_B.any()
    # A is kaiming-uniform per site, as in LoRA: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for A, fan_in in ((m.num_A, 6), (m.den_A, 4)):
        assert A.abs().max() <= 1 / math.sqrt(fan_in)
        assert A.abs().max() > 0.5 / math.sqrt(fan_in)
        assert not torch.equal(A[0], A[1])


@pytest.mark.parametrize("factor", [1, 2])
def test_merged_matches_formula(factor):
    m = make_adapter(groups=2 * factor)
    with torch.no_grad():  # A random too, so every product term is exercised
        m.num_A.normal_()
        m.den_A.normal_()
    base, nA, nB, dA, dB = (getattr(m, n).detach().double()
                            for n in ("base", "num_A", "num_B", "den_A", "den_B"))
    s = 6.0 / 3
    want = torch.empty(3, 2 * factor, 10, dtype=torch.float64)
    for l in range(3):
        for g in range(2 * factor):
            for i in range(6):
                want[l, g, i] = base[l, g // factor, i] + s * sum(
                    nB[l, g, k] * nA[l, k, i] for k in range(3))
            for j in range(4):
                want[l, g, 6 + j] = base[l, g // factor, 6 + j] + s * sum(
                    dB[l, g, k] * dA[l, k, j] for k in range(3))
    got = m.merged()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_factors_not_base():
    m = make_adapter(groups=4)
    assert [n for n, _ in m.named_parameters()] == ["num_A", "num_B", "den_A", "den_B"]
    assert not m.base.requires_grad and "base" in dict(m.named_buffers())
    w = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(1))
    (m.merged() * w).sum().backward()
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # d/d num_B[l] of sum(w * s * num_B @ num_A) = s * w_num[l] @ num_A[l]^T
    torch.testing.assert_close(m.num_B.grad, 2.0 * w[..., :6] @ m.num_A.detach().transpose(1, 2))


def test_base_broadcast_from_row_and_per_site_rows():
    row = base_coefficients("gelu")  # [10]
    m = NoraAdapter(row, groups=8, site_names=SITES, act="gelu", mode="replace")
    assert m.base.shape == (3, 1, 10) and torch.equal(m.merged(), row.expand(3, 8, 10))
    rows = torch.stack([row, 2 * row, 3 * row])  # [3, 10]
    m = NoraAdapter(rows, site_names=SITES, act="gelu", mode="replace")
    assert m.merged().shape == (3, 1, 10) and torch.equal(m.merged()[:, 0], rows)


@pytest.mark.parametrize("kwargs, match", [
    ({"groups": 3}, "groups=3 must be a multiple of base_groups=2"),
    ({"mode": "blend"}, "mode must be one of"),
    ({"act": "relu"}, "act must be one of"),
    ({"rank": 0}, "rank must be a positive int"),
    ({"site_names": ["a", "a", "b"]}, "sites must be distinct"),
    ({"site_names": ["a", "b"]}, r"base must be .* with L=2 sites, got \(3, 2, 10\)"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = {"rank": 3, "groups": None, "site_names": SITES, "act": "silu", "mode": "replace"}
    with pytest.raises(ValueError, match=match):
        NoraAdapter(torch.zeros(3, 2, 10), **{**args, **kwargs})


def test_expand_groups():
    c = torch.arange(2 * 2 * 10, dtype=torch.float32).view(2, 2, 10)
    e = expand_groups(c, 6)  # [2, 6, 10]
    assert torch.equal(e[:, :3], c[:, :1].expand(2, 3, 10))
    assert torch.equal(e[:, 3:], c[:, 1:].expand(2, 3, 10))
    with pytest.raises(ValueError, match="must be a multiple"):
        expand_groups(c, 5)


# ---- fingerprint -----------------------------------------------------------------------------


def tiny_llama(seed: int, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, **overrides}
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def test_fingerprint_identifies_config_and_weights(tmp_path):
    m = tiny_llama(0)
    fp = base_fingerprint(m, "silu")
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert base_fingerprint(m, "silu") == fp == base_fingerprint(tiny_llama(0), "silu")
    assert base_fingerprint(tiny_llama(1), "silu") != fp  # same config, other weights
    assert base_fingerprint(tiny_llama(0, rms_norm_eps=1e-5), "silu") != fp  # other config
    assert base_fingerprint(tiny_llama(0, bos_token_id=5, rope_theta=5e5), "silu") == fp
    assert base_fingerprint(m, "gelu") != fp
    assert base_fingerprint(m.config, "silu") != fp  # config alone: no weights hashed
    # keys outside FINGERPRINT_CONFIG_KEYS (which differ between transformers versions) and
    # volatile ones do not count: a save/load round trip (which sets _name_or_path,
    # architectures and dtype) and a bfloat16 copy keep the fingerprint
    m.save_pretrained(tmp_path)
    reloaded = type(m).from_pretrained(tmp_path)
    assert reloaded.config.architectures == ["LlamaForCausalLM"]
    assert base_fingerprint(reloaded, "silu") == fp
    assert base_fingerprint(m.to(torch.bfloat16), "silu") == fp


def test_fingerprint_of_a_vision_model_hashes_its_patch_projection():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, image_size=8, patch_size=4, num_channels=1)

    def vit(seed: int) -> ViTModel:
        torch.manual_seed(seed)
        return ViTModel(cfg)

    a = base_fingerprint(vit(0), "gelu")
    assert base_fingerprint(vit(0), "gelu") == a
    assert base_fingerprint(vit(1), "gelu") != a  # other patch projection weights
    assert base_fingerprint(cfg, "gelu") != a


# ---- file round trip -------------------------------------------------------------------------


def test_round_trip_file_and_bytes(tmp_path):
    m = make_adapter(groups=4)
    path = tmp_path / "a.safetensors"
    save_adapter(m, path, base_fingerprint=FP)
    data = adapter_to_bytes(m, base_fingerprint=FP)  # metadata order varies; content does not
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "nora-adapter", "format_version": "1", "base_fingerprint": FP,
                    "act": "silu", "mode": "residual", "groups": "4", "base_groups": "2",
                    "rank": "3", "alpha": "6.0", "sites": json.dumps(SITES)}
    for src in (path, str(path), data):
        a = load_adapter(src, expect_fingerprint=FP, expect_mode="residual", expect_act="silu",
                         expect_sites=3)
        assert torch.equal(a.coefs, m.merged().detach())
        assert a.spec == m.spec and a.base_fingerprint == FP and a.nbytes == 3 * 4 * 10 * 4
    m2 = a.to_module()
    for name, t in m.state_dict().items():
        assert torch.equal(m2.state_dict()[name], t)
    assert m2.spec == m.spec and m2.num_A.requires_grad


# ---- one test per load error -----------------------------------------------------------------


def test_mismatch_errors_are_split_from_file_errors():
    for cls in (FingerprintMismatch, ModeMismatch, ActivationMismatch, SiteCountMismatch):
        assert issubclass(cls, AdapterMismatchError)
    for cls in (AdapterFormatError, AdapterVersionError, AdapterShapeError, AdapterValueError):
        assert issubclass(cls, AdapterError) and not issubclass(cls, AdapterMismatchError)
    assert issubclass(AdapterError, ValueError)


def test_wrong_shape(tmp_path):
    tensors, meta = parts(make_adapter())
    tensors["den_A"] = tensors["den_A"][:, :2].contiguous()  # rank 2 where the metadata says 3
    with pytest.raises(AdapterShapeError, match=r"den_A has shape \(3, 2, 4\), expected "
                                                r"\(3, 3, 4\).*rank=3"):
        load_adapter(write(tmp_path, tensors, meta))


def test_nan(tmp_path):
    tensors, meta = parts(make_adapter())
    tensors["num_B"][1, 0, 2] = math.nan
    with pytest.raises(AdapterValueError, match="tensor num_B has 1 NaN and 0 inf"):
        load_adapter(write(tmp_path, tensors, meta))


def test_inf(tmp_path):
    tensors, meta = parts(make_adapter())
    tensors["base"][0, 1, 7] = -math.inf
    with pytest.raises(AdapterValueError, match="tensor base has 0 NaN and 1 inf"):
        load_adapter(write(tmp_path, tensors, meta))


def test_merged_overflow(tmp_path):
    tensors, meta = parts(make_adapter())
    tensors["num_B"].fill_(3e38)  # finite factors whose product is not
    with pytest.raises(AdapterValueError, match="merged coefficients has"):
        load_adapter(write(tmp_path, tensors, meta))


def test_unknown_format_version(tmp_path):
    tensors, meta = parts(make_adapter())
    with pytest.raises(AdapterVersionError, match="format_version='2'; this build reads '1'"):
        load_adapter(write(tmp_path, tensors, {**meta, "format_version": "2"}))


def test_fingerprint_mismatch(tmp_path):
    tensors, meta = parts(make_adapter())
    with pytest.raises(FingerprintMismatch, match=f"base_fingerprint='{FP}'.*'cd'"):
        load_adapter(write(tmp_path, tensors, meta), expect_fingerprint="cd")


def test_mode_mismatch(tmp_path):
    tensors, meta = parts(make_adapter())
    with pytest.raises(ModeMismatch, match="adapter mode='residual', the model runs "
                                           "mode='replace'"):
        load_adapter(write(tmp_path, tensors, meta), expect_mode="replace")


def test_activation_mismatch(tmp_path):
    tensors, meta = parts(make_adapter())
    with pytest.raises(ActivationMismatch, match="adapter act='silu'.*act='gelu'"):
        load_adapter(write(tmp_path, tensors, meta), expect_act="gelu")


def test_site_count_mismatch(tmp_path):
    tensors, meta = parts(make_adapter())
    with pytest.raises(SiteCountMismatch, match="sites=3 activation sites, the model has 32"):
        load_adapter(write(tmp_path, tensors, meta), expect_sites=32)


@pytest.mark.parametrize("keep, match", [
    (5, "shorter than the 8-byte header length"),
    (40, "truncated or not a safetensors file: header length"),
    (-1, "truncated or corrupt safetensors data"),
])
def test_truncated_file(tmp_path, keep, match):
    data = adapter_to_bytes(make_adapter(), base_fingerprint=FP)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep])
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(path)


@pytest.mark.parametrize("content", [
    bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                        dtype=torch.uint8).tolist()),
    b"8 bytes?" + b"{" * 100,  # a plausible-looking length prefix is not enough either
    b"just some text\n" * 20,
], ids=["random", "bad-json", "text"])
def test_not_safetensors(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        load_adapter(path)


def test_other_safetensors_file(tmp_path):
    path = write(tmp_path, {"weight": torch.zeros(2, 2)}, {"format": "pt"})
    with pytest.raises(AdapterFormatError, match="metadata format='pt', expected 'nora-adapter'"):
        load_adapter(path)


def test_missing_tensor(tmp_path):
    tensors, meta = parts(make_adapter())
    del tensors["den_B"]
    with pytest.raises(AdapterFormatError, match=r"missing \['den_B'\], unexpected \[\]"):
        load_adapter(write(tmp_path, tensors, meta))


def test_wrong_dtype(tmp_path):
    tensors, meta = parts(make_adapter())
    tensors["num_A"] = tensors["num_A"].half()
    with pytest.raises(AdapterFormatError, match="num_A has dtype torch.float16, expected float32"):
        load_adapter(write(tmp_path, tensors, meta))


@pytest.mark.parametrize("change, match", [
    ({"rank": "three"}, "bad adapter metadata rank='three'"),
    ({"alpha": "nan"}, "alpha must be finite"),
    ({"mode": "blend"}, "mode must be one of"),
    ({"act": "relu"}, "act must be one of"),
    ({"groups": "3"}, "groups=3 must be a multiple of base_groups=2"),
    ({"sites": "layers.0"}, "bad adapter metadata sites='layers.0'"),
    ({"sites": '{"a": 1}'}, "not a JSON list"),
    ({"base_fingerprint": ""}, "base_fingerprint is empty"),
    ({"mode": None}, r"lacks keys \['mode'\]"),
])
def test_bad_metadata(tmp_path, change, match):
    tensors, meta = parts(make_adapter())
    meta = {k: v for k, v in {**meta, **change}.items() if v is not None}
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(write(tmp_path, tensors, meta))


def test_oversized_input():
    with pytest.raises(AdapterFormatError, match="exceeds the .*-byte limit"):
        load_adapter(b"\0" * (MAX_ADAPTER_BYTES + 1))

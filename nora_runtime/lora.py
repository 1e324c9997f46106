"""LoRA adapters for serving: PEFT files as they are, and the LoRA part of NoRA++ files.

A served LoRA adapter changes linear projections of the Llama-family decoder, per layer i and
module m among PROJECTIONS (q/k/v/o of self_attn, gate/up/down of mlp):

    y = W x + scale[i, m] * B[i, m] @ (A[i, m] @ x)      A: [r, in]  B: [out, r]

scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's `use_rslora`); PEFT's
`rank_pattern` / `alpha_pattern` give a module its own r and alpha (matched as PEFT matches
them). `LoraAdapter` holds the factors as float32 CPU tensors, validated; the model-shape checks
(in/out features, layer count, the server's max rank and target modules) are
`nora_runtime.lora_pool.LoraPool.check`'s.

Sources (`parse_adapter_bytes` tells them apart by the safetensors metadata `format`):

    nora-adapter     a nora file (adapter.py): NoRA, or NoRA++ with `lora.<path>.A/.B` tensors
    nora-peft-lora   a PEFT LoRA packed into one safetensors file (`pack_peft`): the tensors of
                     `adapter_model.safetensors` as they are, and `adapter_config.json`'s text
                     in the metadata key `adapter_config`. The durable store keeps adapters as
                     one content-addressed blob; this is the blob of a PEFT directory.

PEFT directories are loaded by path (the registry packs them); the bytes of a lone
`adapter_model.safetensors` lack the config (alpha, rsLoRA, DoRA...) and are refused with a
message that says to send a packed file (`pack_peft`, or `nora-pack-peft`) instead.

Refused (UnsupportedAdapter, FAILED_PRECONDITION; never served with a part dropped): DoRA,
bias != "none", lora_bias, modules_to_save, trainable tokens, embedding / lm_head LoRA, any
module other than the seven projections, fan_in_fan_out, layer_replication, target_parameters,
peft types other than LORA, pickled `adapter_model.bin`. `layers_to_transform` and any subset of
layers or projections are served as the tensors say.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nora_runtime.adapter import (
    MAX_FILE_BYTES,
    AdapterFormatError,
    AdapterShapeError,
    AdapterValueError,
    LoraWeights,
    UnsupportedAdapter,
    parse_json,
    safetensors_header,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_FORMAT = "nora-peft-lora"
PEFT_FORMAT_VERSION = "1"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_PEFT_CONFIG_BYTES = 1 << 20
MAX_LORA_FILE_BYTES = MAX_FILE_BYTES  # r = 16 on every projection of an 8B model: ~84 MB bf16

# model.layers.<i>.<self_attn|mlp>.<proj>, optionally under PEFT's base_model.model. prefix
_MODULE = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                     r"([a-z_]+)$")
# a PEFT tensor: <module>.lora_A.weight / .lora_B.weight (".<adapter name>" before .weight in
# files saved with a non-default name by old versions)
_PEFT_TENSOR = re.compile(r"^(.*)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
# PEFT config keys that change what the adapter computes, and the values we can serve
_PEFT_REFUSE = {
    "use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
    "fan_in_fan_out": (False, None), "modules_to_save": (None, [], ()),
    "layer_replication": (None, [], ()), "trainable_token_indices": (None, [], {}, ()),
    "target_parameters": (None, [], ()),
}
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed", "embeddings")


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted projection: A [r, in], B [out, r] float32 (CPU), and its scale."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated LoRA: (layer, projection) -> LoraModule. `source` says where it came from
    ("peft" or "nora++"); `config` is PEFT's adapter_config (empty for NoRA++)."""

    modules: dict[tuple[int, str], LoraModule]
    source: str
    config: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        """The largest rank of its modules."""
        return max(m.rank for m in self.modules.values())

    @property
    def targets(self) -> tuple[str, ...]:
        """The projections it adapts (in PROJECTIONS order)."""
        present = {name for _, name in self.modules}
        return tuple(p for p in PROJECTIONS if p in present)

    @property
    def num_layers(self) -> int:
        return 1 + max(layer for layer, _ in self.modules)

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


def module_key(path: str) -> tuple[int, str]:
    """(layer, projection) of a module path such as "model.layers.3.mlp.down_proj" (PEFT's
    "base_model.model." prefix allowed); UnsupportedAdapter for anything else."""
    m = _MODULE.match(path)
    if m is None or m.group(3) not in PROJECTIONS or (
            (m.group(3) in ATTENTION) != (m.group(2) == "self_attn")):
        what = "embedding / lm_head" if any(e in path for e in _EMBEDDING_NAMES) else "module"
        raise UnsupportedAdapter(
            f"LoRA on {what} {path!r} is not served: only the decoder layers' "
            f"{'/'.join(p.removesuffix('_proj') for p in PROJECTIONS)} projections")
    return int(m.group(1)), m.group(3)


def _check_factors(key: tuple[int, str], A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
        raise AdapterShapeError(f"LoRA factors of layer {key[0]} {key[1]} must be A [r, in] and "
                                f"B [out, r], got {tuple(A.shape)} and {tuple(B.shape)}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise AdapterValueError(f"LoRA factors of layer {key[0]} {key[1]} contain NaN or inf")


# ---- NoRA++ ----------------------------------------------------------------------------------


def from_lora_weights(weights: LoraWeights) -> LoraAdapter:
    """The LoRA part of a NoRA++ file (module paths of the transformers model, one rank and
    alpha, scale alpha / rank) as a LoraAdapter."""
    modules = {}
    for path, (A, B) in weights.factors.items():
        key = module_key(path)
        A, B = A.float().contiguous(), B.float().contiguous()
        _check_factors(key, A, B)
        modules[key] = LoraModule(A, B, weights.scale)
    return LoraAdapter(modules, source="nora++")


# ---- PEFT ------------------------------------------------------------------------------------


def pack_peft(directory: str | os.PathLike[str], *, read=None) -> bytes:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) as one packed
    nora-peft-lora file. `read(path, limit) -> bytes` reads a file (default: open().read()); the
    registry passes one that refuses anything but regular files."""
    d = Path(directory)
    if read is None:
        def read(path: Path, limit: int) -> bytes:
            with open(path, "rb") as f:
                return f.read(limit + 1)
    if not (d / PEFT_WEIGHTS).exists() and (d / "adapter_model.bin").exists():
        raise UnsupportedAdapter("PEFT adapter_model.bin (a pickle) is not loaded: save the "
                                 "adapter with safe_serialization=True (safetensors)")
    config = read(d / PEFT_CONFIG, MAX_PEFT_CONFIG_BYTES)
    if len(config) > MAX_PEFT_CONFIG_BYTES:
        raise AdapterFormatError(f"{PEFT_CONFIG} exceeds {MAX_PEFT_CONFIG_BYTES} bytes")
    weights = read(d / PEFT_WEIGHTS, MAX_LORA_FILE_BYTES)
    return pack_peft_files(config, weights)


def pack_peft_files(config: bytes | str | dict, weights: bytes) -> bytes:
    """Packed nora-peft-lora bytes of PEFT's two files (config: the JSON text, or a dict)."""
    if len(weights) > MAX_LORA_FILE_BYTES:
        raise AdapterFormatError(f"{PEFT_WEIGHTS} exceeds the {MAX_LORA_FILE_BYTES}-byte limit")
    cfg = _peft_config(config)
    try:
        tensors = st_load(weights)
    except SafetensorError as e:
        raise AdapterFormatError(f"{PEFT_WEIGHTS} is not a safetensors file: {e}") from e
    meta = {"format": PEFT_FORMAT, "format_version": PEFT_FORMAT_VERSION,
            "adapter_config": json.dumps(cfg, sort_keys=True)}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def _peft_config(config: bytes | str | dict) -> dict:
    if isinstance(config, dict):
        return config
    cfg = parse_json(config, PEFT_CONFIG)
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{PEFT_CONFIG} must be a JSON object")
    return cfg


def _positive(cfg: dict, key: str, default=None) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise AdapterFormatError(f"{PEFT_CONFIG}: {key}={v!r} must be a positive number")
    return v


def _check_peft_config(cfg: dict) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"PEFT adapter of type {cfg.get('peft_type')!r}: only LORA "
                                 "adapters are served")
    for key, ok in _PEFT_REFUSE.items():
        if cfg.get(key, ok[0]) not in ok:
            raise UnsupportedAdapter(f"PEFT LoRA with {key}={cfg[key]!r} is not served "
                                     f"(supported: {ok[0]!r}): "
                                     + ("DoRA" if key == "use_dora" else key))
    targets = cfg.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for name in names:
        if any(e == name or name.endswith("." + e) for e in _EMBEDDING_NAMES):
            raise UnsupportedAdapter(f"PEFT LoRA on {name!r} (embedding / lm_head LoRA) is not "
                                     "served: only the decoder layers' linear projections")
    _positive(cfg, "r")
    _positive(cfg, "lora_alpha", 8)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterFormatError(f"{PEFT_CONFIG}: {key} must be an object")


def _pattern(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def parse_peft(cfg: dict, tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    """Validate PEFT's config and tensors (as adapter_model.safetensors holds them)."""
    _check_peft_config(cfg)
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if "lora_magnitude_vector" in name:
            raise UnsupportedAdapter("PEFT LoRA with DoRA magnitude vectors is not served")
        if "lora_embedding_" in name:
            raise UnsupportedAdapter(f"PEFT embedding LoRA ({name}) is not served")
        if "modules_to_save" in name or "trainable_tokens" in name:
            raise UnsupportedAdapter(f"PEFT adapter with fully trained modules ({name}) is not "
                                     "served: modules_to_save / trainable tokens")
        m = _PEFT_TENSOR.match(name)
        if m is None:
            if name.endswith(".bias"):
                raise UnsupportedAdapter(f"PEFT LoRA with bias tensors ({name}) is not served")
            raise UnsupportedAdapter(f"PEFT adapter tensor {name!r} is not a LoRA factor this "
                                     "server applies")
        if not t.dtype.is_floating_point:
            raise AdapterFormatError(f"tensor {name} has dtype {t.dtype}, expected a float")
        factors.setdefault(m.group(1), {})[m.group(2)] = t
    if not factors:
        raise AdapterFormatError("PEFT adapter has no lora_A / lora_B tensors")
    rslora = bool(cfg.get("use_rslora", False))
    r0, alpha0 = cfg["r"], cfg.get("lora_alpha", 8)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules = {}
    for path, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"PEFT module {path} has lora_{''.join(ab)} but not both "
                                     "lora_A and lora_B")
        key = module_key(path)
        if layers is not None and key[0] not in layers:
            raise AdapterFormatError(f"PEFT module {path} is outside layers_to_transform="
                                     f"{layers}")
        A, B = ab["A"].float().contiguous(), ab["B"].float().contiguous()
        _check_factors(key, A, B)
        base_path = path.removeprefix("base_model.model.")
        r = _pattern(ranks, base_path, r0)
        alpha = _pattern(alphas, base_path, alpha0)
        if A.shape[0] != r:
            raise AdapterShapeError(f"PEFT module {path} has rank {A.shape[0]}, its config "
                                    f"says r={r}")
        modules[key] = LoraModule(A, B, alpha / math.sqrt(r) if rslora else alpha / r)
    return LoraAdapter(modules, source="peft", config=cfg)


def parse_packed_peft(data: bytes, meta: dict[str, str]) -> LoraAdapter:
    """A packed nora-peft-lora file (its safetensors metadata already read) as a LoraAdapter."""
    if meta.get("format_version") != PEFT_FORMAT_VERSION:
        raise AdapterFormatError(f"unsupported {PEFT_FORMAT} format_version="
                                 f"{meta.get('format_version')!r}")
    if "adapter_config" not in meta:
        raise AdapterFormatError(f"{PEFT_FORMAT} file lacks its adapter_config metadata")
    try:
        tensors = st_load(data)
    except SafetensorError as e:
        raise AdapterFormatError(f"truncated or corrupt safetensors data: {e}") from e
    return parse_peft(_peft_config(meta["adapter_config"]), tensors)


def file_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (empty if none); AdapterFormatError if `data` is
    not safetensors (or its header is over-sized or over-nested: adapter.safetensors_header)."""
    header = safetensors_header(data)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFormatError("safetensors __metadata__ must map strings to strings")
    return meta


def is_peft_weights(data: bytes, meta: dict[str, str]) -> bool:
    """Bytes of a lone PEFT adapter_model.safetensors (no nora format key, lora_A tensors)."""
    if "format" in meta and meta["format"] not in ("pt", "np", "tf", "flax", "mlx"):
        return False
    try:
        names = safetensors_header(data)
    except AdapterFormatError:
        return False
    return any(".lora_A." in k or ".lora_B." in k for k in names)

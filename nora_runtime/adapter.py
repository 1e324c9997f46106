"""NoRA adapters (DESIGN.md s1): low-rank updates of a frozen model's rational coefficients.

Per activation site l (rank r, scale s = alpha / r, G' groups, G' a multiple of the base's G):

    a[l] = expand(a_base[l], G') + s * num_B[l] @ num_A[l]      num_B: [G', r]  num_A: [r, 6]
    b[l] = expand(b_base[l], G') + s * den_B[l] @ den_A[l]      den_B: [G', r]  den_A: [r, 4]

A is kaiming-uniform, B zero, so a new adapter is its base exactly. `merged()` gives the
effective coefficients [L, G', 10] float32, the "coefficient set" the server writes into its
table (after `expand_groups` to the table's G).

File format: one safetensors file. Tensors (float32, sites stacked first): base [L, G_base, 10],
num_A [L, r, 6], num_B [L, G', r], den_A [L, r, 4], den_B [L, G', r]. Metadata (all str):
format="nora-adapter", format_version="1", base_fingerprint, act, mode, groups (G'),
base_groups (G_base), rank, alpha (repr of a float), sites (JSON list of site names).

NoRA++ adapters (NoRA plus LoRA on linear layers) add a LoRA part to the same file: for each
adapted linear module, by its path in the transformers model's `named_modules()` (e.g.
"model.layers.0.self_attn.q_proj"), tensors `lora.<path>.A` [r_lora, in_features] and
`lora.<path>.B` [out_features, r_lora] (float32), and three metadata keys: lora_modules (JSON
list of the paths), lora_rank (r_lora), lora_alpha (repr of a float). The layer computes
W x + b + (lora_alpha / lora_rank) B (A x). `load_adapter` reads and validates that part into
`LoadedAdapter.lora` (None for plain NoRA); a reader must refuse what it cannot apply rather than
drop it (the registry serves the LoRA part from its LoRA pool, nora_runtime.lora_pool, and raises
UnsupportedAdapter where it cannot).

`load_adapter` validates everything and raises a subclass of AdapterError (a ValueError):
AdapterMismatchError when a sound adapter does not fit the model it is checked against (the
server answers FAILED_PRECONDITION), any other AdapterError when the file itself is bad
(INVALID_ARGUMENT).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from nora_runtime.rational import ACTIVATIONS, MODES, N_COEF, N_DEN, N_NUM
from nora_runtime.table import expand_groups

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

FORMAT = "nora-adapter"
FORMAT_VERSION = "1"
FACTORS = ("num_A", "num_B", "den_A", "den_B")
TENSORS = ("base", *FACTORS)
META_KEYS = ("format", "format_version", "base_fingerprint", "act", "mode", "groups",
             "base_groups", "rank", "alpha", "sites")
LORA_META_KEYS = ("lora_modules", "lora_rank", "lora_alpha")  # NoRA++ only, all or none
LORA_PREFIX = "lora."
# An 80-layer adapter with G' = 64 and r = 16 is ~0.4 MB; anything near this is not an adapter,
# and refusing it up front keeps a hostile upload from costing a large read and JSON parse.
MAX_ADAPTER_BYTES = 64 << 20
# The header is JSON: tensor names, shapes and offsets and a few metadata strings, a few KB for
# any real adapter. Both limits are checked before json.loads, whose recursion a deeply nested
# header exhausts (RecursionError: INTERNAL, before these checks).
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[^\[\]{}]")
# Files with LoRA factors (NoRA++, packed PEFT LoRA: nora_runtime.lora) are larger: r = 16 on
# every projection of an 8B model is ~84 MB in bf16, ~170 MB in float32. Any adapter file,
# and any blob of the durable store, is refused past this.
MAX_FILE_BYTES = 2 << 30


class AdapterError(ValueError):
    """A stored adapter could not be used."""


class AdapterFormatError(AdapterError):
    """Not a nora adapter file: not safetensors, truncated, missing or malformed entries."""


class AdapterVersionError(AdapterError):
    """A nora adapter file of a format version this build cannot read."""


class AdapterShapeError(AdapterError):
    """Tensor shapes disagree with the metadata or with each other."""


class AdapterValueError(AdapterError):
    """NaN or inf in the adapter's tensors or in its merged coefficients."""


class AdapterMismatchError(AdapterError):
    """A sound adapter that does not fit the model it is checked against."""


class UnsupportedAdapter(AdapterMismatchError):
    """A sound adapter of a kind this server cannot apply (FAILED_PRECONDITION): DoRA, LoRA on
    embeddings or modules other than the decoder's projections, a LoRA rank above the server's
    max_lora_rank, or any LoRA on a server without a LoRA pool. Refused outright, never served
    with a part silently dropped."""


class FingerprintMismatch(AdapterMismatchError):
    """The adapter was trained on a different base model."""


class ModeMismatch(AdapterMismatchError):
    """The adapter's mode (replace / residual) differs from the served model's."""


class ActivationMismatch(AdapterMismatchError):
    """The adapter's base activation kind differs from the served model's."""


class SiteCountMismatch(AdapterMismatchError):
    """The adapter has a different number of activation sites than the served model."""


@dataclass(frozen=True)
class AdapterSpec:
    """Everything that defines an adapter's shape and meaning, except its base model."""

    act: str  # base activation kind, one of ACTIVATIONS
    mode: str  # "replace" or "residual"
    sites: tuple[str, ...]  # activation site names, L of them
    base_groups: int  # G_base of the frozen base coefficients
    groups: int  # G' of the adapter, a multiple of base_groups
    rank: int  # r
    alpha: float  # scale s = alpha / r

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.sites or not all(isinstance(s, str) and s for s in self.sites):
            raise ValueError(f"sites must be non-empty strings, at least one; got {self.sites!r}")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites must be distinct, got {self.sites!r}")
        for name in ("base_groups", "groups", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.groups % self.base_groups:
            raise ValueError(f"groups={self.groups} must be a multiple of "
                             f"base_groups={self.base_groups}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each stored tensor."""
        L, G0, G, r = len(self.sites), self.base_groups, self.groups, self.rank
        return {"base": (L, G0, N_COEF), "num_A": (L, r, N_NUM), "num_B": (L, G, r),
                "den_A": (L, r, N_DEN), "den_B": (L, G, r)}


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """The LoRA part of a NoRA++ adapter: each module's weight W becomes W + s B @ A, with
    s = alpha / rank. factors: module path -> (A [rank, in_features], B [out_features, rank])."""

    rank: int
    alpha: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive int, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha must be finite and > 0, got {self.alpha!r}")
        if not self.factors or not all(isinstance(p, str) and p for p in self.factors):
            raise ValueError("lora factors need at least one module, named by a non-empty str")
        for path, (A, B) in self.factors.items():
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != self.rank or B.shape[1] != self.rank:
                raise ValueError(f"lora factors of {path!r} must be A [{self.rank}, in] and "
                                 f"B [out, {self.rank}], got {tuple(A.shape)} and "
                                 f"{tuple(B.shape)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def num_parameters(self) -> int:
        return sum(A.numel() + B.numel() for A, B in self.factors.values())


def merge(base: torch.Tensor, num_A: torch.Tensor, num_B: torch.Tensor, den_A: torch.Tensor,
          den_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Effective coefficients [L, G', 10] (DESIGN.md s1); shapes as in AdapterSpec.shapes."""
    delta = torch.cat([num_B @ num_A, den_B @ den_A], dim=-1)  # [L, G', 10]
    return expand_groups(base, num_B.shape[1]) + scale * delta


class NoraAdapter(torch.nn.Module):
    """Trainable NoRA factors for L activation sites over frozen base coefficients.

    base: [L, G_base, 10], or [L, 10] / [10] (one group; [10] shared by all sites), kept as a
    float32 buffer (not a parameter). groups: G', a multiple of G_base (default G_base).
    """

    def __init__(self, base: torch.Tensor, *, rank: int = 3, alpha: float = 6.0,
                 groups: int | None = None, site_names: list[str], act: str, mode: str) -> None:
        super().__init__()
        base = _base_tensor(base, len(site_names))  # [L, G_base, 10]
        G0 = base.shape[1]
        self.spec = AdapterSpec(act=act, mode=mode, sites=tuple(site_names), base_groups=G0,
                                groups=G0 if groups is None else groups, rank=rank,
                                alpha=float(alpha))
        self.register_buffer("base", base)
        shapes = self.spec.shapes()
        for name in FACTORS:
            p = torch.zeros(shapes[name], dtype=torch.float32, device=base.device)
            if name.endswith("_A"):
                for a in p:  # per site: fan_in is that site's [r, k] matrix's, as in LoRA
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.register_parameter(name, torch.nn.Parameter(p))

    def merged(self) -> torch.Tensor:
        """Effective coefficients [L, G', 10] float32, differentiable w.r.t. the factors."""
        return merge(self.base, self.num_A, self.num_B, self.den_A, self.den_B, self.spec.scale)


def _base_tensor(base: torch.Tensor, n_sites: int) -> torch.Tensor:
    """A private float32 [L, G_base, 10] copy of `base` given as [L, G, 10], [L, 10] or [10]."""
    b = base.detach().to(torch.float32)
    if b.dim() == 1:
        b = b.expand(n_sites, N_COEF)
    if b.dim() == 2:
        b = b.unsqueeze(1)
    if b.dim() != 3 or b.shape[0] != n_sites or b.shape[2] != N_COEF:
        raise ValueError(f"base must be [L, G, {N_COEF}], [L, {N_COEF}] or [{N_COEF}] with "
                         f"L={n_sites} sites, got {tuple(base.shape)}")
    if not torch.isfinite(b).all():
        raise ValueError("base coefficients contain NaN or inf")
    return b.clone()


# ---- base-model fingerprint ----------------------------------------------------------------

# Keys of config.to_dict() that define the model's shape and numerics: only these are hashed.
# The whole dict is not: its other keys change between transformers versions (new defaults,
# renamed fields such as rope_theta -> rope_parameters, bookkeeping like _name_or_path), and
# an adapter must keep loading when the same checkpoint is read by another version. The
# embedding weights (below) tell apart checkpoints that share a shape.
FINGERPRINT_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
    "layer_norm_eps", "image_size", "patch_size", "num_channels",
)
N_WEIGHT_VALUES = 256  # embedding values hashed: enough to tell checkpoints apart


def _stable_config(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in FINGERPRINT_CONFIG_KEYS if d.get(k) is not None}


def base_fingerprint(model_or_config: PreTrainedModel | PretrainedConfig | dict[str, Any],
                     act: str) -> str:
    """Hex sha256 identifying the base model an adapter belongs to (and its activation kind).

    Hashes canonical JSON (sorted keys, no spaces) of `act` and the FINGERPRINT_CONFIG_KEYS of
    the transformers config. Given a model, it also hashes the first N_WEIGHT_VALUES values
    of the input embedding's (first) weight, rounded to bfloat16 and stored as little-endian
    float32 (a token embedding matrix; for ViT, the patch projection), so
    that checkpoints with one config but different weights differ while one checkpoint loaded
    in float32 or bfloat16 does not (float16 loads round differently and are not covered).
    Weights elsewhere are not hashed: a fine-tune with a frozen embedding shares the base's
    fingerprint. Compute it on the model before its activations are converted.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    is_model = hasattr(model_or_config, "get_input_embeddings")
    config = model_or_config.config if is_model else model_or_config
    cfg = config if isinstance(config, dict) else config.to_dict()
    doc = {"act": act, "config": _stable_config(cfg)}
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                  default=str).encode())
    if is_model:
        w = next(model_or_config.get_input_embeddings().parameters())
        w = w.detach().reshape(-1)[:N_WEIGHT_VALUES].to(device="cpu", dtype=torch.bfloat16)
        h.update(w.float().numpy().astype("<f4").tobytes())
    return h.hexdigest()


# ---- file format ---------------------------------------------------------------------------


def _file_parts(adapter: NoraAdapter, base_fingerprint: str,
                lora: LoraWeights | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not isinstance(base_fingerprint, str) or not base_fingerprint:
        raise ValueError(f"base_fingerprint must be a non-empty str, got {base_fingerprint!r}")
    spec = adapter.spec
    tensors = {n: getattr(adapter, n).detach().to("cpu", torch.float32).contiguous()
               for n in TENSORS}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "base_fingerprint": base_fingerprint, "act": spec.act, "mode": spec.mode,
            "groups": str(spec.groups), "base_groups": str(spec.base_groups),
            "rank": str(spec.rank), "alpha": repr(spec.alpha), "sites": json.dumps(spec.sites)}
    if lora is not None:
        for path, (A, B) in lora.factors.items():
            tensors[f"{LORA_PREFIX}{path}.A"] = A.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{LORA_PREFIX}{path}.B"] = B.detach().to("cpu", torch.float32).contiguous()
        meta.update(lora_modules=json.dumps(list(lora.factors)), lora_rank=str(lora.rank),
                    lora_alpha=repr(float(lora.alpha)))
    return tensors, meta


def save_adapter(adapter: NoraAdapter, path: str | os.PathLike[str], *,
                 base_fingerprint: str, lora: LoraWeights | None = None) -> None:
    """Write `adapter` (with `lora`: a NoRA++ adapter) as a nora adapter safetensors file."""
    tensors, meta = _file_parts(adapter, base_fingerprint, lora)
    st_save_file(tensors, path, metadata=meta)


def adapter_to_bytes(adapter: NoraAdapter, *, base_fingerprint: str,
                     lora: LoraWeights | None = None) -> bytes:
    """The bytes `save_adapter` would write."""
    tensors, meta = _file_parts(adapter, base_fingerprint, lora)
    return st_save(tensors, metadata=meta)


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    """A validated adapter file: its spec, its base model and its merged coefficients."""

    spec: AdapterSpec
    base_fingerprint: str
    coefs: torch.Tensor  # [L, G', 10] float32, merged once at load
    tensors: dict[str, torch.Tensor] = field(repr=False)  # as stored (TENSORS); read-only
    lora: LoraWeights | None = field(default=None, repr=False)  # NoRA++ only

    @property
    def nbytes(self) -> int:
        """Bytes of the merged coefficient set."""
        return self.coefs.nbytes

    def to_module(self) -> NoraAdapter:
        """A trainable NoraAdapter with the stored base and factors (to resume training)."""
        s = self.spec
        m = NoraAdapter(self.tensors["base"], rank=s.rank, alpha=s.alpha, groups=s.groups,
                        site_names=list(s.sites), act=s.act, mode=s.mode)
        with torch.no_grad():
            for name in FACTORS:
                getattr(m, name).copy_(self.tensors[name])
        return m


def load_adapter(path_or_bytes: str | os.PathLike[str] | bytes, *,
                 expect_fingerprint: str | None = None, expect_mode: str | None = None,
                 expect_act: str | None = None, expect_sites: int | None = None) -> LoadedAdapter:
    """Read, validate and merge a nora adapter file (a path, or the file's bytes).

    The file is checked in full first (AdapterFormatError, AdapterVersionError,
    AdapterShapeError, AdapterValueError), then against each given expectation
    (AdapterMismatchError subclasses). A missing path raises the usual OSError.
    """
    data = _read(path_or_bytes)
    meta = _metadata(data)
    spec = _spec(meta)
    tensors = _tensors(data, spec, meta)
    coefs = merge(*(tensors[n] for n in TENSORS), spec.scale)  # [L, G', 10]
    _check_finite(tensors, coefs)
    lora = _lora(tensors, meta)
    loaded = LoadedAdapter(spec=spec, base_fingerprint=meta["base_fingerprint"], coefs=coefs,
                           tensors={n: tensors[n] for n in TENSORS}, lora=lora)
    _check_expected(loaded, expect_fingerprint, expect_mode, expect_act, expect_sites)
    return loaded


def _read(path_or_bytes: str | os.PathLike[str] | bytes) -> bytes:
    """The file's bytes: at most MAX_ADAPTER_BYTES, or MAX_FILE_BYTES for a file whose header
    announces a LoRA part (NoRA++)."""
    data = path_or_bytes
    if not isinstance(data, bytes):
        with open(data, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: never read a huge upload in full
    limit = MAX_FILE_BYTES if len(data) > MAX_ADAPTER_BYTES and _announces_lora(data) else \
        MAX_ADAPTER_BYTES
    if len(data) > limit:
        raise AdapterFormatError(f"adapter file exceeds the {limit}-byte limit")
    return data


def parse_json(text: str | bytes, what: str) -> Any:
    """json.loads of untrusted text, refusing nesting deeper than MAX_JSON_DEPTH first (deep
    nesting makes json.loads raise RecursionError): AdapterFormatError."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    # No more opening brackets than the limit cannot nest past it: the usual header (a few
    # tensors' entries) skips the scan below, a third of an adapter load's time (0.4 ms for
    # an 8B-shaped adapter in-process on the CPU box, 0.29 without).
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        # the brackets outside strings, in order (an unterminated string only adds brackets:
        # the depth is overestimated for text json.loads refuses anyway)
        brackets = _BRACKETS.sub(b"", _STRINGS.sub(b"", raw))
        depth = 0
        for b in brackets:
            depth += 1 if b in b"[{" else -1
            if depth > MAX_JSON_DEPTH:
                raise AdapterFormatError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise AdapterFormatError(f"{what} is not JSON ({str(e)[:200]})") from e


def _announces_lora(data: bytes) -> bool:
    """Whether a safetensors header's metadata has lora_modules (read before the whole file
    is parsed; anything malformed says no)."""
    if len(data) < 8:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        return False
    try:
        meta = parse_json(data[8:8 + n], "the safetensors header").get("__metadata__") or {}
    except (AdapterFormatError, AttributeError):
        return False
    return isinstance(meta, dict) and "lora_modules" in meta


def safetensors_header(data: bytes) -> Any:
    """The JSON header of safetensors bytes, its size and nesting checked before it is parsed
    (MAX_HEADER_BYTES, MAX_JSON_DEPTH); AdapterFormatError if `data` is not safetensors."""
    if len(data) < 8:
        raise AdapterFormatError(f"not a safetensors file: {len(data)} bytes, shorter than the "
                                 "8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise AdapterFormatError(f"truncated or not a safetensors file: header length {n} "
                                 f"exceeds the {len(data) - 8} bytes that follow")
    if n > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"safetensors header of {n} bytes exceeds the "
                                 f"{MAX_HEADER_BYTES}-byte limit of adapter files")
    return parse_json(data[8:8 + n], "not a safetensors file: the header")


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__, checked for format, version and required keys."""
    header = safetensors_header(data)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFormatError("not a nora adapter: safetensors header has no __metadata__ "
                                 "of strings")
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"not a nora adapter: metadata format={meta.get('format')!r}, "
                                 f"expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterVersionError(f"unsupported format_version={meta.get('format_version')!r}; "
                                  f"this build reads {FORMAT_VERSION!r}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise AdapterFormatError(f"adapter metadata lacks keys {missing}")
    return meta


def _spec(meta: dict[str, str]) -> AdapterSpec:
    """Parse the metadata into an AdapterSpec; any bad value is an AdapterFormatError."""

    def parse(key: str, conv: Any) -> Any:
        try:
            return conv(meta[key])
        except ValueError as e:
            raise AdapterFormatError(f"bad adapter metadata {key}={meta[key]!r}: {e}") from e

    sites = parse_json(meta["sites"], f"bad adapter metadata sites={meta['sites'][:64]!r}")
    if not isinstance(sites, list):
        raise AdapterFormatError(f"bad adapter metadata sites={meta['sites']!r}: not a JSON list")
    if not meta["base_fingerprint"]:
        raise AdapterFormatError("bad adapter metadata: base_fingerprint is empty")
    numbers = {"base_groups": parse("base_groups", int), "groups": parse("groups", int),
               "rank": parse("rank", int), "alpha": parse("alpha", float)}
    try:
        return AdapterSpec(act=meta["act"], mode=meta["mode"], sites=tuple(sites), **numbers)
    except ValueError as e:
        raise AdapterFormatError(f"bad adapter metadata: {e}") from e


def _lora_names(meta: dict[str, str]) -> list[str]:
    """The LoRA tensor names the metadata promises (none for a plain NoRA adapter)."""
    present = [k for k in LORA_META_KEYS if k in meta]
    if not present:
        return []
    if len(present) != len(LORA_META_KEYS):
        raise AdapterFormatError(f"adapter metadata has {present} but not all of "
                                 f"{list(LORA_META_KEYS)}")
    modules = parse_json(meta["lora_modules"], "bad adapter metadata lora_modules")
    if (not isinstance(modules, list) or not modules
            or not all(isinstance(m, str) and m for m in modules)
            or len(set(modules)) != len(modules)):
        raise AdapterFormatError(f"bad adapter metadata lora_modules={meta['lora_modules']!r}: "
                                 "not a JSON list of distinct module paths")
    return [f"{LORA_PREFIX}{m}.{f}" for m in modules for f in ("A", "B")]


def _lora(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LoraWeights | None:
    """The LoRA part (validated tensors from `_tensors`), or None for a plain NoRA adapter."""
    if "lora_modules" not in meta:
        return None
    try:
        rank, alpha = int(meta["lora_rank"]), float(meta["lora_alpha"])
    except ValueError as e:
        raise AdapterFormatError(f"bad adapter metadata lora_rank / lora_alpha: {e}") from e
    if rank < 1 or not (math.isfinite(alpha) and alpha > 0):
        raise AdapterFormatError(f"bad adapter metadata lora_rank={rank}, lora_alpha={alpha}: "
                                 "need a positive rank and a finite alpha > 0")
    factors = {m: (tensors[f"{LORA_PREFIX}{m}.A"], tensors[f"{LORA_PREFIX}{m}.B"])
               for m in json.loads(meta["lora_modules"])}
    try:
        return LoraWeights(rank=rank, alpha=alpha, factors=factors)
    except ValueError as e:
        raise AdapterShapeError(f"bad LoRA part: {e}") from e


def _tensors(data: bytes, spec: AdapterSpec, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The stored tensors, checked for names, dtype and shapes against `spec` (the LoRA
    part's names and dtype only; `_lora` checks its shapes)."""
    try:
        tensors = st_load(data)
    except SafetensorError as e:
        raise AdapterFormatError(f"truncated or corrupt safetensors data: {e}") from e
    names = {*TENSORS, *_lora_names(meta)}
    if set(tensors) != names:
        raise AdapterFormatError(f"adapter tensors must be {sorted(names)}; missing "
                                 f"{sorted(names - set(tensors))}, unexpected "
                                 f"{sorted(set(tensors) - names)}")
    for name in names - set(TENSORS):
        if tensors[name].dtype != torch.float32:
            raise AdapterFormatError(f"tensor {name} has dtype {tensors[name].dtype}, "
                                     "expected float32")
    for name, shape in spec.shapes().items():
        t = tensors[name]
        if t.dtype != torch.float32:
            raise AdapterFormatError(f"tensor {name} has dtype {t.dtype}, expected float32")
        if tuple(t.shape) != shape:
            raise AdapterShapeError(
                f"tensor {name} has shape {tuple(t.shape)}, expected {shape} from metadata "
                f"(sites={len(spec.sites)}, base_groups={spec.base_groups}, "
                f"groups={spec.groups}, rank={spec.rank})")
    return tensors


def _check_finite(tensors: dict[str, torch.Tensor], coefs: torch.Tensor) -> None:
    """NaN / inf in a stored tensor, or finite factors whose merge overflows."""
    named = {**{f"tensor {n}": t for n, t in tensors.items()}, "merged coefficients": coefs}
    # one fused check on the hot path (half the time of one per tensor, 25 us of ~250 us)
    if torch.isfinite(torch.cat([t.reshape(-1) for t in named.values()])).all():
        return
    for what, t in named.items():
        if not torch.isfinite(t).all():
            n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise AdapterValueError(f"{what} has {n_nan} NaN and {n_inf} inf values")


def _check_expected(a: LoadedAdapter, fingerprint: str | None, mode: str | None,
                    act: str | None, n_sites: int | None) -> None:
    if fingerprint is not None and a.base_fingerprint != fingerprint:
        raise FingerprintMismatch(f"adapter base_fingerprint={a.base_fingerprint!r} does not "
                                  f"match the model's {fingerprint!r}")
    if mode is not None and a.spec.mode != mode:
        raise ModeMismatch(f"adapter mode={a.spec.mode!r}, the model runs mode={mode!r}: train "
                           f"it with --mode {mode}, or serve it on a server started with "
                           f"--mode {a.spec.mode}")
    if act is not None and a.spec.act != act:
        raise ActivationMismatch(f"adapter act={a.spec.act!r}, the model's activation is "
                                 f"act={act!r}")
    if n_sites is not None and len(a.spec.sites) != n_sites:
        raise SiteCountMismatch(f"adapter has sites={len(a.spec.sites)} activation sites, "
                                f"the model has {n_sites}")

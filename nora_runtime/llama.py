"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) with paged KV cache and rational MLPs.

Weights come from a transformers checkpoint (config.json + *.safetensors). The model knows
nothing of scheduling or adapters beyond two per-token inputs in `ForwardBatch`: the slot index,
which its MLP activations pass to the multi-tenant rational kernels (DESIGN.md s2), and the LoRA
pool row (None when no token of the step has a LoRA), which every projection passes to the LoRA
pool through one call, `_lora`.

Each layer runs two fused column projections, one GEMM each: qkv_proj (output q | k | v) and
gate_up_proj (gate | up). Checkpoints keep transformers' names (q_proj, k_proj, v_proj,
gate_proj, up_proj; FUSED), loaded into the fused weights' sections, and LoRA adapters still
target q_proj, k_proj, ... each: `_lora` adds their deltas into views of the fused output.

Shapes: N tokens in a step (all sequences' new tokens, flattened), H hidden, I intermediate,
nh / nkv query / key-value heads of size d, B sequences.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from nora_runtime.kernels.paged_attention import paged_decode_attention
from nora_runtime.kernels.prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from nora_runtime.kernels.rope_cache import rope_and_cache
from nora_runtime.lora_pool import LoraPool
from nora_runtime.ops import add_rmsnorm, rational_act, use_triton
from nora_runtime.parallel import DENSE, Linears
from nora_runtime.table import CoefficientTable

SUPPORTED = ("llama", "mistral", "qwen2")
# fused projection -> the checkpoint's projections, in the order of its output sections
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class ForwardBatch:
    """Everything one forward step needs, as device tensors (built by the model runner).

    input_ids, positions, slots: [N] (all sequences' new tokens, flattened in sequence order);
    kv_index: [N] int64 flat KV-cache row of each new token (block * block_size + offset);
    sample_index: [B'] rows of the flat batch whose logits are wanted; block_tables: [B,
    max_blocks] int32 (entries past a sequence's blocks are ignored); ctx_lens: [B] int32
    context length of each sequence after this step (its new tokens included); q_start: [B + 1]
    int32 cumulative new-token counts (sequence b's tokens are rows q_start[b] ..
    q_start[b + 1] - 1), None when every sequence has one new token; tiles: [T, 2] int32 tile
    table of the prefill attention kernel (nora_runtime.kernels.prefill_attention, block_q
    tokens a tile), None for a pure decode step (one new token per sequence), which the paged
    decode kernel (and its CUDA graphs) runs; lora_rows: [N] int32 LoRA pool row of each token
    (0: none), or None when no token has one (then no LoRA kernel runs).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    kv_index: torch.Tensor
    sample_index: torch.Tensor
    block_size: int
    block_tables: torch.Tensor
    ctx_lens: torch.Tensor
    q_start: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    block_q: int = 0
    lora_rows: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        """One new token per sequence (the paged decode kernel; CUDA graphs replay these)."""
        return self.tiles is None


def _lora(y: torch.Tensor, x: torch.Tensor, batch: ForwardBatch, lora: LoraPool | None,
          layer: int, name: str) -> torch.Tensor:
    """y (projection `name` of `layer` applied to x) plus each token's LoRA delta, in place: the
    one place where LoRA adapters enter the model (rows without one are left as they are)."""
    if batch.lora_rows is not None and lora is not None and lora.serves(name):
        lora.apply(y, x, layer, name, batch.lora_rows)
    return y


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """Inverse RoPE frequencies [d/2] float32 for rope types default, linear and llama3.

    Reads transformers 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                  or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / params["factor"]).float()
    if kind != "llama3":
        raise NotImplementedError(f"rope type {kind!r} is not supported (default, linear, llama3)")
    factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: scaled
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d], cos/sin [N, d/2]: rotate-half convention of transformers' Llama."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def add_norm(x: torch.Tensor, delta: torch.Tensor,
             norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + delta), x + delta): the residual add and the RMSNorm after it, one launch on
    CUDA (nora_runtime.kernels.rmsnorm)."""
    return add_rmsnorm(x, delta, norm.weight, norm.eps)


class Attention(nn.Module):
    def __init__(self, config, layer: int, lora: LoraPool | None = None,
                 linears: Linears = DENSE) -> None:
        super().__init__()
        self.layer, self.lora = layer, lora
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        self.d = d = getattr(config, "head_dim", None) or config.hidden_size // nh
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        H = config.hidden_size
        # q_proj, k_proj and v_proj, fused: q splits by query heads, k and v by KV heads
        self.qkv_proj = linears.column(H, [(nh * d, nh), (nkv * d, nkv), (nkv * d, nkv)],
                                       bias=bias, kv_heads=nkv)
        self.o_proj = linears.row(nh * d, H, bias=bool(getattr(config, "attention_bias", False)),
                                  heads=nh, kv_heads=nkv)
        # the heads this process computes: all of them, or its share (parallel.py)
        nq, nk, _ = self.qkv_proj.sections
        self.nh, self.nkv = nq // d, nk // d

    def forward(self, x, batch: ForwardBatch, cos, sin, k_cache, v_cache) -> torch.Tensor:
        N, lora, l = x.shape[0], self.lora, self.layer
        # views of the one [N, (nh + 2 nkv) d] output, with its row stride: LoRA adds into them
        # in place, and the RoPE, cache and attention kernels take strides (no copy)
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sections, dim=1)
        q = _lora(q, x, batch, lora, l, "q_proj").view(N, self.nh, self.d)
        k = _lora(k, x, batch, lora, l, "k_proj").view(N, self.nkv, self.d)
        v = _lora(v, x, batch, lora, l, "v_proj").view(N, self.nkv, self.d)
        # k_cache/v_cache: [num_blocks * block_size, nkv, d] views of this layer's cache
        if use_triton(q):  # RoPE and the cache write in one launch
            q = rope_and_cache(q, k, v, cos, sin, batch.kv_index, k_cache, v_cache)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache.index_copy_(0, batch.kv_index, k)
            v_cache.index_copy_(0, batch.kv_index, v)
        if not use_triton(q):  # CPU: per-sequence SDPA through the block tables
            q_start = batch.q_start
            if q_start is None:
                q_start = torch.arange(N + 1, dtype=torch.int32, device=q.device)
            out = paged_prefill_attention_ref(q, k_cache, v_cache, batch.block_tables,
                                              batch.ctx_lens, q_start, batch.block_size)
        elif batch.is_decode:
            out = paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.ctx_lens,
                                         batch.block_size)
        else:  # prompt chunks and decode rows of one step: one launch
            out = paged_prefill_attention(q, k_cache, v_cache, batch.block_tables,
                                          batch.ctx_lens, batch.q_start, batch.block_size,
                                          batch.tiles, batch.block_q)
        out = out.view(N, self.nh * self.d)
        return _lora(self.o_proj(out), out, batch, lora, l, "o_proj")


class MLP(nn.Module):
    """SwiGLU with the multi-tenant rational activation: down(R_slot(gate) * up)."""

    def __init__(self, config, layer: int, table: CoefficientTable, act: str, mode: str,
                 lora: LoraPool | None = None, linears: Linears = DENSE) -> None:
        super().__init__()
        self.layer, self.table, self.act, self.mode = layer, table, act, mode
        self.lora = lora
        H, I = config.hidden_size, config.intermediate_size
        # gate_proj and up_proj, fused
        self.gate_up_proj = linears.column(H, [(I, None), (I, None)], bias=False)
        self.down_proj = linears.row(I, H, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        lora, l = self.lora, self.layer
        gate, up = self.gate_up_proj(x).split(self.gate_up_proj.sections, dim=1)  # [N, I] views
        _lora(gate, x, batch, lora, l, "gate_proj")  # into the two halves, in place
        _lora(up, x, batch, lora, l, "up_proj")
        h = rational_act(gate, self.table.site(l), batch.slots, act=self.act, mode=self.mode,
                         up=up)
        return _lora(self.down_proj(h), h, batch, lora, l, "down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int, table: CoefficientTable, act: str, mode: str,
                 lora: LoraPool | None = None, linears: Linears = DENSE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, lora, linears)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer, table, act, mode, lora, linears)


class LlamaModel(nn.Module):
    """Llama-family causal LM over a paged KV cache. `table` holds every resident adapter's
    coefficients (slot 0 = base); `act` is the base activation the rationals replace; `lora`
    (None: no LoRA) holds every resident LoRA adapter's factors. `linears` builds the decoder
    layers' projections, the embedding and the lm_head (parallel.DENSE: plain; under tensor
    parallelism, this rank's share, and then `table` is the table's groups that its channels
    read, parallel.TableShard)."""

    def __init__(self, config, table: CoefficientTable, act: str, mode: str,
                 lora: LoraPool | None = None, linears: Linears = DENSE) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED:
            raise ValueError(f"model_type {config.model_type!r} is not Llama-family {SUPPORTED}")
        self.config = config
        self.embed_tokens = linears.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, table, act, mode, lora, linears)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = linears.head(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        head_dim = self.layers[0].self_attn.d
        self.register_buffer("inv_freq", rope_inv_freq(config, head_dim), persistent=False)

    def get_input_embeddings(self) -> nn.Embedding:  # as transformers models: base_fingerprint
        return self.embed_tokens

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """Logits [B', V] float32 at batch.sample_index. k_cache/v_cache: [layers,
        num_blocks * block_size, nkv, d]; this step's keys and values are written into them."""
        freqs = batch.positions.float()[:, None] * self.inv_freq[None, :]  # [N, d/2]
        cos, sin = freqs.cos(), freqs.sin()
        x = self.embed_tokens(batch.input_ids)  # the residual stream
        h = self.layers[0].input_layernorm(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):  # x = x + attn(norm(x)); x = x + mlp(norm(x))
            a = layer.self_attn(h, batch, cos, sin, k_cache[i], v_cache[i])
            h, x = add_norm(x, a, layer.post_attention_layernorm)
            m = layer.mlp(h, batch)
            if i < last:  # the add and the next layer's norm in one launch
                h, x = add_norm(x, m, self.layers[i + 1].input_layernorm)
            else:
                x = x + m
        x = self.norm(x[batch.sample_index])
        return self.lm_head(x).float()


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def checkpoint_names(model: LlamaModel) -> dict[str, tuple[str, int | None]]:
    """Checkpoint tensor name -> (our parameter, section): a FUSED projection's parts go into
    its output sections (q_proj, k_proj, v_proj: sections 0, 1, 2 of qkv_proj), section None
    is the whole parameter. Tied lm_head weights need no tensor."""
    names = {}
    for p in dict(model.named_parameters()):  # tied weights appear once
        fused = next((f for f in FUSED if f".{f}." in p), None)
        if fused is None:
            names[p if p.startswith("lm_head.") else "model." + p] = (p, None)
            continue
        for i, part in enumerate(FUSED[fused]):
            names["model." + p.replace(fused, part)] = (p, i)
    return names


def load_weights(model: LlamaModel, path: Path,
                 index: Callable[[str, int | None], tuple] | None = None) -> None:
    """Copy a transformers checkpoint's tensors into `model` (q/k/v_proj into the fused
    qkv_proj's sections, gate/up_proj into gate_up_proj's). Every parameter must be found; other
    tensors are ignored. index: (parameter name, section) -> the slice of its checkpoint tensor
    to read (() or None: all of it; a tensor-parallel rank reads only its share)."""
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    wanted = checkpoint_names(model)
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if name not in wanted:
                    continue
                target, section = wanted.pop(name)
                part = index(target, section) if index is not None else ()
                dst = params[target].data
                if section is not None:  # its rows of the fused output
                    dst = dst.split(modules[target.rpartition(".")[0]].sections)[section]
                dst.copy_(f.get_slice(name)[part] if part else f.get_tensor(name))
    if wanted:
        missing = sorted(wanted)
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path} lacks {missing[:5]}{more}")

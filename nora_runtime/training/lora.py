"""Plain LoRA on chosen linear layers, the "++" of NoRA++ (NoRA plus LoRA).

    y = W x + b + s * B (A x)        A: [r, in] kaiming-uniform, B: [out, r] zero, s = alpha / r

so a fresh LoRA leaves the layer exactly as it was. The factors go into the adapter file as
`lora.<module path>.A` / `.B` (nora_runtime.adapter.LoraWeights).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from nora_runtime.adapter import LoraWeights


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # on the CPU: one seed, any device
        dev = base.weight.device
        self.A = nn.Parameter(A.to(dev))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.base(x) + self.scale * ((x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T)


def matching_linears(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of the nn.Linear modules whose path or last name matches one of the glob
    `patterns` ("q_proj", "*.attention.*.query", "model.layers.0.mlp.down_proj")."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(
            fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path.rsplit(".", 1)[-1], p)
            for p in patterns
        ):
            out.append(path)
    return out


def add_lora(model: nn.Module, patterns: list[str], rank: int,
             alpha: float) -> dict[str, LoraLinear]:
    """Wrap every nn.Linear matching `patterns` in a LoraLinear, in place. {path: module}."""
    paths = matching_linears(model, patterns)
    if not paths:
        raise ValueError(f"no nn.Linear module of {type(model).__name__} matches the LoRA "
                         f"targets {patterns}")
    wrapped = {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped[path] = LoraLinear(getattr(parent, name), rank, alpha)
        setattr(parent, name, wrapped[path])
    return wrapped


def lora_weights(modules: dict[str, LoraLinear], rank: int, alpha: float) -> LoraWeights:
    """The factors of `modules` as stored in an adapter file (float32, CPU copies)."""
    return LoraWeights(rank=rank, alpha=float(alpha), factors={
        path: (m.A.detach().float().cpu().clone(), m.B.detach().float().cpu().clone())
        for path, m in modules.items()})


def load_lora(modules: dict[str, LoraLinear], weights: LoraWeights) -> None:
    """Copy stored factors into the wrapped modules (same paths and shapes)."""
    if set(weights.factors) != set(modules):
        raise ValueError(f"stored LoRA modules {sorted(weights.factors)} differ from the "
                         f"model's {sorted(modules)}")
    with torch.no_grad():
        for path, (A, B) in weights.factors.items():
            modules[path].A.copy_(A)
            modules[path].B.copy_(B)

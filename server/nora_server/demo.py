"""Demo adapters for the built-in demo model: a few NoRA adapters made deterministically (fixed
seeds, random low-rank factors) for the served model's fingerprint and mode, written as
ordinary adapter files into a store directory that `nora-serve` preloads. Like the demo model,
they show the machinery (each adapter visibly changes the output), not skill."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nora_runtime.adapter import NoraAdapter, save_adapter
from nora_runtime.demo import demo_dir
from nora_runtime.engine import ModelInfo
from nora_runtime.rational import base_coefficients

DEMO_ADAPTERS = {"demo-1": 1, "demo-2": 2, "demo-3": 3}  # id -> seed


def demo_adapter_dir(mode: str) -> Path:
    return demo_dir().parent / f"demo-adapters-{mode}"


def demo_adapter(info: ModelInfo, seed: int) -> NoraAdapter:
    """An adapter for the model described by `info` whose coefficients clearly differ from the
    base (B factors ~ N(0, 0.3): a trained adapter starts at B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeds NoraAdapter's kaiming init of A, locally
        torch.manual_seed(seed)
        m = NoraAdapter(base_coefficients(info.act), rank=3, alpha=6.0, groups=info.groups,
                        site_names=[f"model.layers.{i}.mlp.act_fn"
                                    for i in range(info.num_layers)],
                        act=info.act, mode=info.mode)
    with torch.no_grad():
        for p in (m.num_B, m.den_B):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


def write_demo_adapters(info: ModelInfo, directory: str | Path) -> list[Path]:
    """Write DEMO_ADAPTERS as `<id>.safetensors` into `directory` (atomically, so servers
    starting together never read a half-written file); return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in DEMO_ADAPTERS.items():
        path = directory / f"{name}.safetensors"
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        save_adapter(demo_adapter(info, seed), tmp, base_fingerprint=info.fingerprint)
        os.replace(tmp, path)
        paths.append(path)
    return paths

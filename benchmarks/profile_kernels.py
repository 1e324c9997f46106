"""One launch of each rational kernel at T=8192 x C=14336 bf16, for a profiler to look at, and
the registers and spills of each compiled variant.

    ncu --clock-control none --kernel-name regex:_rational --section SpeedOfLight \\
        --section Occupancy --section LaunchStats python3 benchmarks/profile_kernels.py --out X
"""

from __future__ import annotations

import argparse
import json

import torch

from nora_runtime.kernels.rational_bwd import _rational_bwd_kernel, rational_backward
from nora_runtime.kernels.rational_fwd import _rational_fwd_kernel, rational_forward

T, C, S, G = 8192, 14336, 65, 8


def resources(kernel) -> dict:
    """Registers and spills of every compiled variant of a jitted kernel."""
    out = {}
    for cache in kernel.device_caches.values():
        for key, compiled in cache[0].items():
            out[str(key)[:160]] = {"n_regs": compiled.n_regs, "n_spills": compiled.n_spills}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    torch.manual_seed(0)
    x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16) * 2
    dy = torch.randn_like(x)
    table = torch.randn(S, G, 10, device="cuda") * 0.1
    slot = torch.randint(0, S, (T,), device="cuda", dtype=torch.int32)
    rational_forward(x, table, slot, mode="replace")
    rational_forward(x, table, slot, mode="residual")
    rational_backward(dy, x, table, slot, mode="replace")
    torch.cuda.synchronize()
    res = {"fwd": resources(_rational_fwd_kernel), "bwd": resources(_rational_bwd_kernel)}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for name, variants in res.items():
        for v in variants.values():
            print(name, "regs", v["n_regs"], "spills", v["n_spills"])


if __name__ == "__main__":
    main()

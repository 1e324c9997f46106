"""Bandwidth of the rational kernels on a GPU, against the copy ceiling, F.silu and silu(g) * u.

Run on a CUDA machine from the repo root:
    PYTHONPATH=. python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json

Bytes counted = each input read once + each output written once (coefficient tables, a few KiB,
are not counted). Times: triton.testing.do_bench (device events, L2 flushed between runs),
median, after warm-up; fresh random inputs; each kernel is checked against the torch reference
on the same inputs before it is timed. Rows are named as the runtime issue asks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from nora_runtime.kernels.rational_bwd import rational_backward
from nora_runtime.kernels.rational_fwd import rational_forward, rational_swiglu
from nora_runtime.ops import rational_act_ref
from nora_runtime.rational import base_coefficients

C = 14336  # Llama-3-8B intermediate size
LAYERS, G, ADAPTERS = 32, 8, 64


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "device": torch.cuda.get_device_name()}


def make_table() -> torch.Tensor:
    """[1 + ADAPTERS, LAYERS, G, 10]: slot 0 the SiLU fit, then 64 perturbed adapters."""
    t = base_coefficients("silu").expand(1 + ADAPTERS, LAYERS, G, 10).clone().cuda()
    t[1:] += 0.02 * torch.randn_like(t[1:])
    return t


def tbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def median_ms(fn, graph: bool = False) -> float:
    """Median device time of fn; with graph=True fn is captured in a CUDA graph and its replays
    timed, which removes the CPU launch cost (small T is launch-bound otherwise, and serving
    replays decode steps from graphs)."""
    if graph:
        return do_bench_cudagraph(fn, rep=300, return_mode="median")
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 2e-2) -> None:
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    if not (err < tol and torch.isfinite(got).all()):
        raise SystemExit(f"{name}: relative error {err:.3e} exceeds {tol}")


def bench_T(T: int, table: torch.Tensor, cfg: dict) -> list[dict]:
    site = table[:, 7]  # one layer's [S, G, 10] view, strided as in serving
    x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16) * 2
    u = torch.randn_like(x)
    dy = torch.randn_like(x)
    gu = torch.cat([x, u], dim=1)  # fused [T, 2C] gate-up
    single = torch.ones(T, dtype=torch.int32, device="cuda")
    mixed = torch.randint(1, 1 + ADAPTERS, (T,), dtype=torch.int32, device="cuda")
    n = T * C * 2  # bytes of one bf16 [T, C] tensor
    kw = {"block": cfg.get("block"), "num_warps": cfg.get("num_warps", 4)}
    bkw = {**kw, "stages": cfg.get("stages", 3)}

    fwd = lambda s, mode="replace": rational_forward(x, site, s, mode=mode, **kw)  # noqa: E731
    check("fwd", fwd(mixed), rational_act_ref(x, site, mixed, act="silu", mode="replace"))
    check("residual", fwd(mixed, "residual"),
          rational_act_ref(x, site, mixed, act="silu", mode="residual"))
    check("swiglu", rational_swiglu(gu, None, site, mixed, **kw),
          rational_act_ref(x, site, mixed, act="silu", mode="replace", up=u))
    dx, _ = rational_backward(dy, x, site, mixed, **bkw)
    xr = x.float().requires_grad_(True)
    (gx,) = torch.autograd.grad(rational_act_ref(xr, site, mixed, act="silu", mode="replace"),
                                xr, dy.float())
    check("bwd", dx, gx)

    graph = T <= 1024

    def median_ms_T(fn) -> float:
        return median_ms(fn, graph)

    rows = {
        "copy": tbps(2 * n, median_ms_T(lambda: u.copy_(x))),
        "silu": tbps(2 * n, median_ms_T(lambda: F.silu(x))),
        "silu_mul": tbps(3 * n, median_ms_T(lambda: F.silu(x) * u)),
        "rational_fwd_single": tbps(2 * n, median_ms_T(lambda: fwd(single))),
        "rational_fwd_mixed": tbps(2 * n, median_ms_T(lambda: fwd(mixed))),
        "rational_swiglu_mixed": tbps(3 * n, median_ms_T(
            lambda: rational_swiglu(gu, None, site, mixed, **kw))),
        "rational_swiglu_2t_mixed": tbps(3 * n, median_ms_T(
            lambda: rational_swiglu(x, u, site, mixed, **kw))),
        "rational_residual_mixed": tbps(2 * n, median_ms_T(lambda: fwd(mixed, "residual"))),
        "rational_bwd_mixed": tbps(3 * n, median_ms_T(
            lambda: rational_backward(dy, x, site, mixed, **bkw))),
    }
    return [{"name": k, "value": round(v, 3), "unit": "TB/s", "T": T, "C": C,
             "dtype": "bfloat16", **({"config": cfg} if cfg else {})} for k, v in rows.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true", help="also time tile configurations")
    args = ap.parse_args()
    torch.manual_seed(0)
    table = make_table()
    rows = bench_T(8192, table, {}) + bench_T(128, table, {})
    sweep = []
    if args.sweep:  # tile configurations (the defaults come from these measurements)
        for bt, bc, w in [(8, 256, 4), (4, 256, 2)]:
            cfg = {"block": (bt, bc), "num_warps": w}
            sweep += [r for r in bench_T(8192, table, cfg) if r["name"].startswith("rational")
                      and "bwd" not in r["name"]]
        for bt, bc, w, st in [(16, 64, 4, 1), (8, 64, 4, 3), (16, 32, 4, 4)]:
            cfg = {"block": (bt, bc), "num_warps": w, "stages": st}
            sweep += [r for r in bench_T(8192, table, cfg) if "bwd" in r["name"]]
    result = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "versions": versions(), "command": " ".join(["python"] + sys.argv),
        "rows": rows, "sweep": sweep,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'name':28s} {'T':>5s} {'TB/s':>7s}  config")
    for r in rows + sweep:
        print(f"{r['name']:28s} {r['T']:5d} {r['value']:7.3f}  {r.get('config', '')}")


if __name__ == "__main__":
    main()

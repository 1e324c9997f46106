"""Which kernels one engine step launches and how long each takes on the device: a decode step
at batch 128 (context 512) and a prompt step of 64 prompts x 128 tokens, on the 8B-shaped Llama
with random bf16 weights, run eagerly (no CUDA graph, so that each launch is seen) under
torch.profiler. Kernels per layer = launches in the step / layers.

    PYTHONPATH=. python benchmarks/profile_step.py --out profile-step-h200     # CUDA
    PYTHONPATH=. python benchmarks/profile_step.py --small                     # CPU: the script

Writes benchmarks/results/<out>.{json,md}: per step, the launches, their device time, and the
kernels by total time (name, calls, ms per step, share).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_engine import CTX, Seq, model_config, versions
from nora_runtime.config import EngineConfig
from nora_runtime.model_runner import ModelRunner
from nora_runtime.tiny import byte_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"


def kernel_times(fn, reps: int) -> tuple[dict[str, list[float]], float]:
    """{kernel name: [calls per rep, device ms per rep]} and the wall ms per rep, from
    torch.profiler over `reps` calls of fn after two warm-ups."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for ev in prof.events():
        dev = str(getattr(ev, "device_type", "")).endswith("CUDA")
        if cuda != dev or (not cuda and ev.cpu_parent is not None):
            continue  # the device's kernels; on the CPU, top-level ops
        t = ev.time_range.elapsed_us() if cuda else ev.cpu_time  # us
        out[ev.name][0] += 1 / reps
        out[ev.name][1] += t / 1e3 / reps
    return dict(out), prof.profiler.total_average().cpu_time_total / 1e3 / reps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    cfg = model_config(a.small)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    steps = {}
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        byte_tokenizer(cfg.vocab_size).save_pretrained(d)
        ecfg = EngineConfig(model=d, load_format="dummy", device=dev, max_num_seqs=128,
                            max_model_len=CTX + 64, max_num_batched_tokens=8192,
                            kv_memory_fraction=0.3, max_adapters=16, cuda_graphs=False,
                            kv_cache_tokens_cpu=100_000)
        runner = ModelRunner(ecfg, Path(d))
        bs = runner.block_size
        per = -(-(CTX + 1) // bs)
        decode = [Seq(CTX, list(range(i * per, (i + 1) * per)), 0, cfg.vocab_size)
                  for i in range(128)]
        prompt = []
        for i in range(64):  # fresh prompts of 128 tokens
            s = Seq(128, list(range(i * per, (i + 1) * per)), 0, cfg.vocab_size)
            s.num_computed = 0
            prompt.append(s)
        cases = {"decode_b128_ctx512": (decode, [1] * 128),
                 "prompt_64x128": (prompt, [128] * 64)}
        for name, (seqs, n) in cases.items():
            fb = runner.prepare(seqs, n, [True] * len(seqs))
            kernels, wall = kernel_times(lambda fb=fb: runner.forward(fb), a.reps)
            total = sum(v[1] for v in kernels.values())
            launches = sum(v[0] for v in kernels.values())
            top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
            steps[name] = {
                "launches": launches, "launches_per_layer": launches / cfg.num_hidden_layers,
                "device_ms": total, "wall_ms": wall,
                "kernels": [{"name": k[:160], "calls": c, "ms": t, "share": t / total}
                            for k, (c, t) in top]}
            print(f"{name}: {launches:.0f} launches ({launches / cfg.num_hidden_layers:.1f} a "
                  f"layer), device {total:.2f} ms", flush=True)
            for k, (c, t) in top[:12]:
                print(f"  {t:8.3f} ms {c:6.0f}x  {k[:100]}", flush=True)
    doc = {"device": versions().get("device", "cpu"), "versions": versions(),
           "date": datetime.date.today().isoformat(),
           "command": "PYTHONPATH=. python " + " ".join(["benchmarks/profile_step.py",
                                                          *(argv or sys.argv[1:])]),
           "steps": steps}
    if a.out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{a.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
        lines = [f"# One engine step's kernels ({a.out})", "",
                 f"{doc['date']}, {doc['device']}, torch {torch.__version__}. Eager (no CUDA "
                 f"graph), torch.profiler, mean of {a.reps} steps. Command: `{doc['command']}`.",
                 ""]
        for name, s in steps.items():
            lines += [f"## {name}: {s['launches']:.0f} launches ({s['launches_per_layer']:.1f} "
                      f"a layer), {s['device_ms']:.2f} ms of kernels", "",
                      "| kernel | calls | ms | share |", "|---|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['calls']:.0f} | {k['ms']:.3f} | "
                      f"{k['share']:.1%} |" for k in s["kernels"][:20]]
            lines.append("")
        (RESULTS / f"{a.out}.md").write_text("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()

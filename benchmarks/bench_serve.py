"""Serving benchmark through gRPC, shaped like vLLM's serving benchmark: the real `nora-serve`
as a subprocess on 127.0.0.1 and real asyncio clients (AsyncNoraClient) that stream.

    python benchmarks/bench_serve.py --smoke                      # tiny model, CPU, < 60 s
    python benchmarks/bench_serve.py --model 8b-dummy --device cuda --out serve-h200
    python benchmarks/bench_serve.py --model DIR --load-format dummy ...   # DIR's config.json

`--model 8b-dummy`: bench_engine.py's 8B-shaped Llama config with the byte tokenizer and random
weights (`load_format="dummy"`, seeded, so the base fingerprint is the same on every start and
adapters in the store stay valid). nora-serve has no --load-format flag; for dummy weights this
script starts nora-serve's own `main` with load_format replaced (`serve-dummy` below).

Runs: workloads `fixed` (N x (P prompt + O new tokens), random token ids, ignore_eos, greedy) and
`mixed` (prompts uniform in [32, 2048], outputs in [16, 512], seeded); arrival `closed` (C
requests in flight, the next sent when one ends; the median of --repeats runs) or a Poisson rate
in requests/s; adapter sets `none`, `1` (every request on one adapter), `uK` / `zK` (K distinct
adapters, uniform or Zipf alpha=1 popularity). Adapters are made for the served model's
fingerprint, then either placed in the store directory before a (timed) restart, which picks
them up (`--adapter-load store`), or loaded through LoadAdapter (`--adapter-load rpc`, timed,
with a durable store: every load is written and fsynced). `--max-adapters` is the server's slot
count: with fewer slots than adapters, idle named adapters give their slots to others and are
reloaded from the store on use. `--adapter-kind lora` makes PEFT LoRA adapters instead (rank
--lora-rank on --lora-targets of every layer, random bf16 factors) and gives the server a LoRA
pool of --lora-rows rows; with more adapters than rows, idle ones give their rows to others and
are reloaded from the store on use.

Per run: output tok/s, TTFT / inter-token latency / end-to-end p50 and p99, requests ok and
failed, and CPU-seconds per second of the client (--client-procs processes share the load: one
asyncio process near a whole core limits the rate it can take tokens at) and of the server.
Rows: serve_throughput_tok_s (closed loop, fixed, no adapter), throughput_<K>_adapters_ratio
(closed loop, fixed, K distinct uniform, over no adapter; K the largest uniform set), the
TTFT / ITL / E2E rows of the no-adapter closed loop, and for every adapter set S
[lora_]serve_throughput_S_tok_s and _ratio (over no adapter; thousands written k: z1k,
u100k). Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from serve_adapters import adapter_blobs, load_rpc, lora_blobs  # beside this script
from serve_load import Load, adapter_count, make_requests, model_info, pct, summarize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the server ------------------------------------------------------------------------------


def serve_dummy(argv: list[str]) -> None:
    """nora-serve's main with EngineConfig.load_format = "dummy" and a fixed torch seed (the
    random weights, hence the base fingerprint, are the same on every start)."""
    import torch

    from nora_server import cli

    torch.manual_seed(0)
    real = cli.configs

    def configs(args=None):
        server, engine, level = real(args)
        return server, dataclasses.replace(engine, load_format="dummy"), level

    cli.configs = configs
    cli.main(argv)


class Server:
    """One nora-serve subprocess on 127.0.0.1; `start` returns once it serves (seconds taken)."""

    def __init__(self, args: list[str], dummy: bool) -> None:
        self.args, self.dummy = args, dummy
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tail: list[str] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 1800) -> float:
        self.port = free_port()
        entry = ([sys.executable, str(Path(__file__).resolve()), "serve-dummy"] if self.dummy
                 else [sys.executable, "-m", "nora_server.cli"])
        cmd = [*entry, *self.args, "--host", "127.0.0.1", "--port", str(self.port),
               "--metrics-port", "off", "--http-port", "off"]
        env = {**os.environ, "NORA_LOG_LEVEL": os.environ.get("NORA_LOG_LEVEL", "WARNING")}
        t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.tail = (self.tail + [line.rstrip()])[-20:]
            if line.startswith("nora: serving"):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nora-serve did not start in time")
        else:
            code = self.proc.wait()
            raise RuntimeError(f"nora-serve exited with {code} before serving:\n"
                               + "\n".join(self.tail))
        took = time.perf_counter() - t
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain the pipe
        return took

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system, all threads; Linux's /proc),
        0 where /proc is not there."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the benchmark ---------------------------------------------------------------------------


def dummy_checkpoint(d: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_engine import model_config

    from nora_runtime.tiny import byte_tokenizer

    cfg = model_config(small=False)
    cfg.save_pretrained(d)
    byte_tokenizer(cfg.vocab_size).save_pretrained(d)  # every sampled id has text
    return d


def versions() -> dict:
    import grpc
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__, "grpcio": grpc.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name())
    return v


def label(k: int) -> str:
    return f"{k // 1000}k" if k >= 1000 and k % 1000 == 0 else str(k)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on the CPU, small counts (< 60 s): checks the script")
    p.add_argument("--model", default=None,
                   help="checkpoint dir, or 8b-dummy (default: the tiny test model)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--workloads", default="fixed,mixed")
    p.add_argument("--rates", default="closed,8,32",
                   help="closed and/or Poisson request rates (req/s), comma-separated")
    p.add_argument("--adapters", default="none,1,u1000,z1000,u100000,z100000",
                   help="adapter sets: none, 1, uK (K distinct, uniform), zK (Zipf alpha=1)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mixed-prompt", default="32,2048", help="mixed: prompt lengths, lo,hi")
    p.add_argument("--mixed-output", default="16,512", help="mixed: output lengths, lo,hi")
    p.add_argument("--concurrency", type=int, default=256, help="closed loop: in flight")
    p.add_argument("--repeats", type=int, default=3, help="closed-loop runs (median)")
    p.add_argument("--warmup", type=int, default=2,
                   help="unrecorded runs first (on the H200 the first two runs were slower)")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels of the client")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes sharing the load (and --concurrency, --channels)")
    p.add_argument("--max-adapters", type=int, default=None,
                   help="server adapter slots (default: the adapters made, at least 1024)")
    p.add_argument("--adapter-load", default="store", choices=("store", "rpc"))
    p.add_argument("--adapter-kind", default="nora", choices=("nora", "lora"),
                   help="lora: PEFT LoRA files (random bf16 factors) instead of NoRA")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="projections of the LoRA adapters (PEFT's default for Llama)")
    p.add_argument("--lora-rows", type=int, default=256,
                   help="the server's LoRA pool rows (--max-lora-adapters)")
    p.add_argument("--store", default=None,
                   help="adapter store dir (kept; reused when it holds the same adapters); "
                        "'none': no store, adapters memory-only and pinned (needs --adapter-load "
                        "rpc and slots >= adapters)")
    p.add_argument("--server-args", default="", help="more nora-serve flags (one string)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results name under benchmarks/results/")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.device = None, "cpu"
        a.workloads, a.rates, a.adapters = "fixed,mixed", "closed,50", "none,z100,u100"
        a.num_requests, a.prompt_len, a.new_tokens, a.concurrency = 8, 8, 8, 8
        a.mixed_prompt, a.mixed_output = "8,32", "4,16"
        a.warmup = 1
        a.out = a.out or "serve-smoke"
    a.out = a.out or "serve"
    a.mixed_prompt = tuple(int(x) for x in a.mixed_prompt.split(","))
    a.mixed_output = tuple(int(x) for x in a.mixed_output.split(","))
    return a


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "serve-dummy":
        serve_dummy(sys.argv[2:])
        return 0
    a = parse(argv)
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nora-bench-serve-"))
    dummy = a.dummy = a.load_format == "dummy" or a.model == "8b-dummy"
    if a.model == "8b-dummy":
        model = str(dummy_checkpoint(tmp / "ckpt"))
    elif a.model is None:
        from nora_runtime.tiny import tiny_checkpoint
        model = str(tiny_checkpoint())
    else:
        model = a.model
    sets = a.adapters.split(",")
    n_adapters = max(adapter_count(s) for s in sets)
    no_store = a.store == "none"
    if no_store and a.adapter_load != "rpc":
        raise SystemExit("--store none needs --adapter-load rpc")
    store = Path(a.store) if a.store and not no_store else tmp / "store"
    store.mkdir(parents=True, exist_ok=True)
    slots = a.max_adapters or max(1024, n_adapters)
    extra = shlex.split(a.server_args)
    if a.adapter_kind == "lora":
        extra += ["--max-lora-adapters", str(a.lora_rows), "--max-lora-rank", str(a.lora_rank),
                  "--lora-target-modules", a.lora_targets, "--max-message-bytes", str(1 << 30)]
    if a.device == "cpu" and "--kv-cache-tokens-cpu" not in extra:
        extra += ["--kv-cache-tokens-cpu", "65536"]
    args = ["--model", model, "--device", a.device,
            *([] if no_store else ["--adapter-dir", str(store)]), "--max-adapters", str(slots),
            "--max-concurrent-requests", str(max(4096, a.num_requests)), "--grace-seconds", "5",
            *extra]
    server = Server(args, dummy)
    detail: dict = {"server_args": args, "adapters_made": n_adapters, "adapter_slots": slots,
                    "adapter_kind": a.adapter_kind}
    runs: list[dict] = []
    # one event loop for the whole benchmark: grpc.aio under a fresh asyncio.run per run left
    # the client process busy (~100% of a core on the 2-core CPU box), starving the server
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    load = Load(loop, a.client_procs, server)
    try:
        detail["server_start_s"] = server.start()
        info = run(model_info(server.target))
        log(f"serving {info.model} on {info.device} ({info.dtype}); {server.target}")
        marker = store / ".bench-serve.json"
        want = {"fingerprint": info.fingerprint, "count": n_adapters, "seed": a.seed,
                "kind": a.adapter_kind, "draw": "per-index"}
        if a.adapter_kind == "lora":
            from transformers import AutoConfig

            targets = tuple(a.lora_targets.split(","))
            want.update(rank=a.lora_rank, targets=targets)
            blobs = partial(lora_blobs, rank=a.lora_rank, targets=targets,
                            hf_config=AutoConfig.from_pretrained(model))
        else:
            blobs = adapter_blobs
        if n_adapters and a.adapter_load == "store":
            have = json.loads(marker.read_text()) if marker.exists() else None
            if have != want:
                t = time.perf_counter()
                for i, data in enumerate(blobs(info, n_adapters, a.seed)):
                    (store / f"a{i}.safetensors").write_bytes(data)
                marker.write_text(json.dumps(want))
                detail["adapter_files_write_s"] = time.perf_counter() - t
            server.stop()
            # a restart picks the store's files up (registry.restore): that is the load
            detail["server_start_with_adapters_s"] = server.start()
            log(f"restarted with {n_adapters} adapters in the store: "
                f"{detail['server_start_with_adapters_s']:.1f} s")
        elif n_adapters:
            t = time.perf_counter()
            times = run(load_rpc(server.target, blobs(info, n_adapters, a.seed),
                                         n_adapters))
            detail["adapter_rpc_load_s"] = time.perf_counter() - t
            detail["adapter_rpc_load_ms_p50"] = pct(times, 50)
            detail["adapter_rpc_load_ms_p99"] = pct(times, 99)
            log(f"LoadAdapter x {n_adapters}: {detail['adapter_rpc_load_s']:.1f} s, p50 "
                f"{detail['adapter_rpc_load_ms_p50']:.2f} ms")
        vocab = min(info.vocab_size, 256)  # byte tokens: every prompt id is real text
        for w in range(a.warmup):  # first-use compiles (Triton, prefill shapes), allocations
            t = time.perf_counter()
            reqs = make_requests(a.workloads.split(",")[0], a.num_requests, a.prompt_len,
                                 a.new_tokens, vocab, "none", a.seed + 100 + w,
                                 a.mixed_prompt, a.mixed_output)
            results, wall, _ = load(reqs, "closed", a.concurrency, a.seed, a.channels)
            detail.setdefault("warmup_s", []).append(round(time.perf_counter() - t, 2))
            detail.setdefault("warmup_failed", []).append(sum(not r.ok for r in results))
        # closed-loop repeats go round the sets (none, u100k, none, u100k, ...): a drift over
        # the session (the server still warming up) then favours no set over another
        combos = list(itertools.product(a.workloads.split(","), a.rates.split(","), sets))
        made = {}
        for rep, (workload, rate, adapters) in [(rep, c) for rep in range(a.repeats)
                                                 for c in combos if rep == 0 or c[1] == "closed"]:
            if (workload, adapters) not in made:
                made[workload, adapters] = make_requests(
                    workload, a.num_requests, a.prompt_len, a.new_tokens, vocab, adapters,
                    a.seed, a.mixed_prompt, a.mixed_output)
            reqs = made[workload, adapters]
            results, wall, usage = load(reqs, rate, a.concurrency, a.seed, a.channels)
            s = {"workload": workload, "rate": rate, "adapters": adapters, "repeat": rep,
                 **summarize(results, wall), **usage}
            runs.append(s)
            log(f"{workload:5s} {rate:>6s} {adapters:8s} #{rep}: {s['output_tok_s']:8.0f} "
                f"tok/s, TTFT p50 {s['ttft_p50_ms'] or 0:.0f} ms, ITL p50 "
                f"{s['itl_p50_ms'] or 0:.1f} ms, ok {s['requests_ok']}, failed "
                f"{s['requests_failed']}")
    finally:
        server.stop()
        loop.close()
        if a.store is None or no_store:
            shutil.rmtree(tmp, ignore_errors=True)
        elif a.model == "8b-dummy":
            shutil.rmtree(tmp / "ckpt", ignore_errors=True)
    doc = report(a, argv, runs, detail, info, t_all)
    failed = sum(r["requests_failed"] for r in runs)
    return 0 if failed == 0 and doc["rows"] else 1


def report(a, argv, runs: list[dict], detail: dict, info, t_all: float) -> dict:
    def closed(workload: str, adapters: str) -> list[dict]:
        return [r for r in runs if r["workload"] == workload and r["rate"] == "closed"
                and r["adapters"] == adapters]

    def median_run(rs: list[dict]) -> dict:
        return sorted(rs, key=lambda r: r["output_tok_s"])[len(rs) // 2]

    rows = []
    base = closed("fixed", "none")
    if base:
        m = median_run(base)
        rows.append(("serve_throughput_tok_s", m["output_tok_s"], "tok/s"))
        for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms",
                    "e2e_p99_ms"):
            rows.append((key, m[key], "ms"))
        uniform = [s for s in a.adapters.split(",") if s.startswith("u")]
        prefix = "lora_" if a.adapter_kind == "lora" else ""
        for spec in a.adapters.split(","):  # every set: its throughput and ratio over none
            if spec != "none" and closed("fixed", spec):
                tok_s = median_run(closed("fixed", spec))["output_tok_s"]
                short = spec if spec == "1" else spec[0] + label(adapter_count(spec))
                name = f"{prefix}serve_throughput_{short}"
                rows += [(f"{name}_tok_s", tok_s, "tok/s"),
                         (f"{name}_ratio", tok_s / m["output_tok_s"], "x")]
        if uniform and not prefix:
            big = max(uniform, key=adapter_count)
            if closed("fixed", big):
                ratio = (median_run(closed("fixed", big))["output_tok_s"]
                         / m["output_tok_s"])
                rows.append((f"throughput_{label(adapter_count(big))}_adapters_ratio", ratio,
                             "x"))
    rows.append(("requests_failed", sum(r["requests_failed"] for r in runs), "requests"))
    device = info.device if info.device != "cpu" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    v = versions()
    if "gpu" in v:
        device = v["gpu"]
    cmd = " ".join(["python", "benchmarks/bench_serve.py",
                    *(argv if argv is not None else sys.argv[1:])])
    doc = {"device": device, "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "versions": v, "command": cmd,
        "model": f"{info.model} ({'dummy weights' if a.dummy else 'checkpoint'})"
        if a.model else "tiny test model (nora_runtime.tiny)",
        "workload": {"num_requests": a.num_requests, "prompt_len": a.prompt_len,
                     "new_tokens": a.new_tokens, "concurrency": a.concurrency,
                     "mixed_prompt": a.mixed_prompt, "mixed_output": a.mixed_output,
                     "repeats": a.repeats, "seed": a.seed},
        "rows": [{"name": n, "value": v_, "unit": u} for n, v_, u in rows],
        "detail": {**detail, "total_s": round(time.perf_counter() - t_all, 1)}, "runs": runs}
    out = RESULTS / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # name + suffix, not with_suffix: a name with a dot (serve-swi-0.2) keeps all of it
    out.parent.joinpath(out.name + ".json").write_text(json.dumps(doc, indent=1) + "\n")

    def f(x, d=1):
        return "-" if x is None else f"{x:,.{d}f}"

    lines = [f"# Serving benchmark through gRPC ({a.out})", "",
             f"{doc['date']}, {device}, model {doc['model']}, versions "
             + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", "",
             f"Command: `{cmd}`", "",
             "| row | value | unit |", "|---|---|---|"]
    lines += [f"| {n} | {f(x, 3)} | {u} |" for n, x, u in rows]
    lines += ["", "Closed loop: the median of the repeats is the row; repeats go round the "
              "adapter sets (none, set 1, ..., none, set 1, ...). Fixed workload: "
              f"{a.num_requests} x ({a.prompt_len} prompt + {a.new_tokens} new tokens), greedy, "
              f"ignore_eos, {a.concurrency} in flight; mixed: prompts {a.mixed_prompt}, outputs "
              f"{a.mixed_output} tokens (uniform). Client CPU: CPU-seconds per second of the "
              f"busiest of {a.client_procs} client process(es) (near 1: the client limits the "
              "rate); server CPU: the server process's, all threads.", "",
              "| workload | rate | adapters | # | tok/s | req/s | TTFT p50 / p99 ms | "
              "ITL p50 / p99 ms | E2E p50 / p99 ms | ok | failed | client CPU | server CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(
            f"| {r['workload']} | {r['rate']} | {r['adapters']} | {r['repeat']} | "
            f"{f(r['output_tok_s'], 0)} | {f(r['request_s'], 2)} | {f(r['ttft_p50_ms'])} / "
            f"{f(r['ttft_p99_ms'])} | {f(r['itl_p50_ms'], 2)} / {f(r['itl_p99_ms'], 2)} | "
            f"{f(r['e2e_p50_ms'], 0)} / {f(r['e2e_p99_ms'], 0)} | {r['requests_ok']} | "
            f"{r['requests_failed']} | {f(r.get('client_cpu_share_max'), 2)} | "
            f"{f(r.get('server_cpu_s_per_s'), 2)} |")
    lines += ["", "Setup: " + ", ".join(f"{k} {f(x, 2) if isinstance(x, float) else x}"
                                         for k, x in doc["detail"].items()
                                         if k != "server_args") + "."]
    out.parent.joinpath(out.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(rows)]))
    return doc


if __name__ == "__main__":
    sys.exit(main())

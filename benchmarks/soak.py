"""Soak and fault run of a real `nora-serve` process: good traffic from several threads beside
bad adapter loads, malformed requests, cancelled streams, adapter churn (load from bytes, load
by path under new ids, replace, unload) and restarts (SIGKILL and SIGTERM, alternating), all on
127.0.0.1. Reports requests tried, the statuses returned, INTERNAL/UNKNOWN (must be 0), good
requests lost (must be 0), and durability: after every restart each churned adapter id answers
as it did before the kill (its latest acknowledged version, or NOT_FOUND once unloaded).

    python benchmarks/soak.py                       # 120 s, the tiny test model on the CPU
    python benchmarks/soak.py --seconds 600 --model DIR --device cuda

A good request is lost when it never completes with the text it gives alone: requests cut by a
restart are retried by the client (UNAVAILABLE, or the connection dropping mid-stream) for up to
RETRY_SECONDS, as a client of a restarting server does. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from nora_client import NoraClient

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "soak"
RETRY_SECONDS = 120.0  # how long a good request is retried across a restart
UNCLEAR = {"INTERNAL", "UNKNOWN"}
PROMPTS = ["Hello", "the cat", "nora", "0123"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Server:
    """One nora-serve process at a time on a fixed port, restartable."""

    def __init__(self, args: list[str], port: int) -> None:
        self.args, self.port = args, port
        self.proc: subprocess.Popen | None = None
        self.target = f"127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "nora_server.cli", *self.args, "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", "off",
               "--http-port", "off"]
        env = {**os.environ, "NORA_LOG_LEVEL": "ERROR"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        for line in self.proc.stdout:
            if line.startswith("nora: serving"):
                break
        else:
            raise RuntimeError(f"nora-serve exited with {self.proc.wait()} before serving")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain the pipe

    def stop(self, sig: int) -> int:
        """Send `sig`; the exit status (SIGTERM drains first)."""
        self.proc.send_signal(sig)
        return self.proc.wait(120)


class Soak:
    def __init__(self, server: Server, adapters: dict[int, bytes], seed: int):
        self.server, self.adapters = server, adapters
        self.rng = random.Random(seed)
        self.statuses: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.up = threading.Event()  # cleared while the server restarts
        self.expected: dict[str, int | None] = {}  # churned id -> adapter seed (None: unloaded)
        self.reference: dict[tuple[str, int | None], str] = {}  # (prompt, seed) -> greedy text
        self.good_ok = 0
        self.lost: list[str] = []
        self.durability = {"checks": 0, "failed": []}

    def count(self, kind: str, code: str) -> None:
        with self.lock:
            self.statuses[kind, code] += 1

    def client(self) -> NoraClient:
        return NoraClient(self.server.target, timeout=30, retries=0)

    # ---- good traffic ---------------------------------------------------------------------

    def generate(self, nora: NoraClient, prompt: str, seed: int | None, **kw) -> str:
        adapter = {} if seed is None else {"adapter_bytes": self.adapters[seed]}
        return nora.generate(prompt, temperature=0, max_new_tokens=8, ignore_eos=True,
                             **adapter, **kw).text

    def good_worker(self, worker: int) -> None:
        rng = random.Random(worker)
        while not self.stop.is_set():
            prompt = rng.choice(PROMPTS)
            seed = rng.choice([None, 1, 2])  # the base, or an inline adapter
            want = self.reference[prompt, seed]
            end = time.monotonic() + RETRY_SECONDS
            while True:
                self.up.wait(RETRY_SECONDS)
                try:
                    with self.client() as nora:
                        text = self.generate(nora, prompt, seed)
                except grpc.RpcError as e:
                    self.count("good", e.code().name)
                    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) \
                            and time.monotonic() < end:
                        time.sleep(0.2)
                        continue  # cut by a restart: retry, as a client does
                    with self.lock:
                        self.lost.append(f"{prompt!r} seed {seed}: {e.code().name}")
                    break
                self.count("good", "OK")
                with self.lock:
                    if text == want:
                        self.good_ok += 1
                    else:
                        self.lost.append(f"{prompt!r} seed {seed}: {text!r} != {want!r}")
                break

    # ---- faults ---------------------------------------------------------------------------

    def fault_worker(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            if not self.up.wait(1):
                continue
            kind = rng.choice(("bad_load", "bad_path", "malformed", "cancel", "unknown_id"))
            try:
                with self.client() as nora:
                    if kind == "bad_load":
                        data = bytearray(self.adapters[1])
                        data[rng.randrange(len(data))] ^= 0xFF
                        nora.load_adapter(f"bad-{rng.randrange(10)}", data=bytes(data[:-3]))
                    elif kind == "bad_path":
                        nora.load_adapter("bad", path=rng.choice(
                            ("../x.safetensors", "/etc/passwd", "missing.safetensors",
                             "fifo.safetensors")))
                    elif kind == "malformed":
                        nora.channel.unary_unary("/nora.v1.Nora/Generate")(
                            rng.randbytes(rng.randint(1, 200)), timeout=30)
                    elif kind == "cancel":
                        stream = nora.generate_stream("Hello", max_new_tokens=500,
                                                      ignore_eos=True)
                        next(stream)
                        stream.cancel()
                        for _ in stream:
                            pass
                    else:
                        nora.generate("Hello", adapter_id=f"missing-{rng.randrange(100)}",
                                      max_new_tokens=2)
            except grpc.RpcError as e:
                self.count(kind, e.code().name)
            else:
                self.count(kind, "OK")
            time.sleep(0.02)

    # ---- churn and restarts ------------------------------------------------------------------

    def churn(self, nora: NoraClient) -> None:
        """One admin change to a churned id: load from bytes, load a store file under a new id,
        replace, or unload; recorded in `expected` once acknowledged."""
        rng = self.rng
        adapter_id = f"rt-{rng.randrange(6)}"
        action = rng.choice(("bytes", "path", "unload"))
        seed = rng.choice([1, 2, 3])
        if action == "unload":
            if self.expected.get(adapter_id) is None:
                return
            nora.unload_adapter(adapter_id)
            self.expected[adapter_id] = None
        elif action == "bytes":
            nora.load_adapter(adapter_id, data=self.adapters[seed])
            self.expected[adapter_id] = seed
        else:
            nora.load_adapter(adapter_id, path=f"seed{seed}.safetensors")
            self.expected[adapter_id] = seed
        self.count("churn_" + action, "OK")

    def check_durability(self) -> None:
        with self.client() as nora:
            for adapter_id, seed in sorted(self.expected.items()):
                self.durability["checks"] += 1
                try:
                    text = nora.generate("Hello", adapter_id=adapter_id, temperature=0,
                                         max_new_tokens=8, ignore_eos=True).text
                    got = "ok" if seed is not None and text == self.reference["Hello", seed] \
                        else f"text {text!r}"
                except grpc.RpcError as e:
                    got = "ok" if seed is None and e.code() == grpc.StatusCode.NOT_FOUND \
                        else e.code().name
                if got != "ok":
                    self.durability["failed"].append(f"{adapter_id} (seed {seed}): {got}")

    def run(self, seconds: float, restarts: int, threads: int) -> dict:
        with self.client() as nora:
            for prompt in PROMPTS:
                for seed in (None, 1, 2, 3):
                    self.reference[prompt, seed] = self.generate(nora, prompt, seed)
        self.up.set()
        workers = [threading.Thread(target=self.good_worker, args=(i,)) for i in range(threads)]
        workers.append(threading.Thread(target=self.fault_worker))
        for t in workers:
            t.start()
        t0 = time.monotonic()
        kills = {"SIGKILL": 0, "SIGTERM": 0}
        exit_codes = []
        for r in range(restarts + 1):
            until = t0 + seconds * (r + 1) / (restarts + 1)
            while time.monotonic() < until:
                try:
                    with self.client() as nora:
                        self.churn(nora)
                except grpc.RpcError as e:  # an admin change refused: counted, not fatal
                    self.count("churn", e.code().name)
                time.sleep(0.05)
            if r == restarts:
                break
            sig = (signal.SIGKILL, signal.SIGTERM)[r % 2]
            self.up.clear()
            exit_codes.append(self.server.stop(sig))
            kills[sig.name] += 1
            log(f"restart {r + 1}/{restarts} after {sig.name} (exit {exit_codes[-1]})")
            self.server.start()
            self.check_durability()
            self.up.set()
        self.stop.set()
        for t in workers:
            t.join(RETRY_SECONDS + 60)
        self.check_durability()
        tried = sum(n for (k, c), n in self.statuses.items() if k != "good" or c == "OK")
        unclear = sum(n for (k, c), n in self.statuses.items() if c in UNCLEAR)
        return {"seconds": round(time.monotonic() - t0, 1), "requests_tried": tried,
                "statuses": {f"{k} {c}": n for (k, c), n in sorted(self.statuses.items())},
                "internal_or_unknown": unclear, "good_ok": self.good_ok,
                "good_lost": len(self.lost), "lost_examples": self.lost[:10],
                "restarts": kills, "exit_codes": exit_codes,
                "durability_checks": self.durability["checks"],
                "durability_failures": self.durability["failed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--restarts", type=int, default=4, help="alternating SIGKILL / SIGTERM")
    p.add_argument("--threads", type=int, default=4, help="good-traffic threads")
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny test model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=50461)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)

    import torch

    from nora_runtime.adapter import save_adapter
    from nora_runtime.config import EngineConfig
    from nora_runtime.engine import Engine
    from nora_runtime.tiny import random_adapter, tiny_checkpoint

    model = a.model or str(tiny_checkpoint())
    store = Path(tempfile.mkdtemp(prefix="nora-soak-"))
    info = Engine(EngineConfig(model=model, device="cpu", kv_cache_tokens_cpu=256)).info
    adapters = {}
    for seed in (1, 2, 3):
        save_adapter(random_adapter(info, seed), store / f"seed{seed}.safetensors",
                     base_fingerprint=info.fingerprint)
        adapters[seed] = (store / f"seed{seed}.safetensors").read_bytes()
    os.mkfifo(store / "fifo.safetensors")
    server = Server(["--model", model, "--device", a.device, "--adapter-dir", str(store),
                     "--grace-seconds", "5"], a.port)
    server.start()
    log(f"soak: {a.seconds:g} s, {a.restarts} restarts, {a.threads} good threads, store {store}")
    try:
        result = Soak(server, adapters, a.seed).run(a.seconds, a.restarts, a.threads)
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM)
    import transformers

    doc = {"date": datetime.date.today().isoformat(),
           "device": a.device if a.device != "cpu" else
           f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "command": " ".join(["python", "benchmarks/soak.py", *(argv or sys.argv[1:])]),
           "model": a.model or "tiny test model (nora_runtime.tiny)", **result}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    ok = result["internal_or_unknown"] == 0 and result["good_lost"] == 0 \
        and not result["durability_failures"]
    lines = ["# Soak and fault run of nora-serve", "",
             f"{doc['date']}, {doc['device']}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, {doc['model']}. Command: `{doc['command']}`.", "",
             f"**{'PASS' if ok else 'FAIL'}**: {result['requests_tried']} requests tried in "
             f"{result['seconds']:g} s; INTERNAL/UNKNOWN {result['internal_or_unknown']}; good "
             f"requests lost {result['good_lost']} (completed with the right text: "
             f"{result['good_ok']}); restarts {result['restarts']}; durability checks "
             f"{result['durability_checks']}, failed {len(result['durability_failures'])}.", "",
             "| request kind | status | count |", "|---|---|---|"]
    lines += [f"| {k.split(' ')[0]} | {k.split(' ')[1]} | {n} |"
              for k, n in result["statuses"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log(lines[4])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

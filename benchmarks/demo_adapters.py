"""Demo adapters for the default model (SmolLM2-135M-Instruct, residual mode): make them from
scratch, ship them, and measure what they do on questions never seen in training (a GPU if
there is one: ~5 min on an H200; else the CPU: hours on 2 cores).

For every behaviour of `nora_runtime.training.behaviours` (RECIPES below):

1. questions: TRAIN_N questions of the "train" split (seed SEED), made by code;
2. answers: the base model's own greedy answers through the serving Engine (chat template,
   ANSWER_TOKENS new tokens, cut at the last sentence end): self-distillation, no text written
   by hand, shared by all behaviours;
3. data: `{"messages"}` records whose assistant turn is the behaviour's rule applied to the
   base answer (behaviours.chat_records);
4. training: `nora-train` with the adapter's recipe (a NoRA adapter, residual mode, on the
   default model; the arguments are in RECIPES and in the results);
5. shipping: the adapter goes to server/nora_server/demo_adapters/<id>.safetensors, which
   nora-serve preloads when it serves the default model;
6. evaluation: HELDOUT_N questions of the "heldout" split (no template and no entity of the
   train split), greedy through the Engine in one mixed batch: the base and every adapter on
   the same questions; success = the behaviour's check on the generated text.

    python benchmarks/demo_adapters.py                  # everything
    python benchmarks/demo_adapters.py --only json      # retrain one adapter, evaluate all
    python benchmarks/demo_adapters.py --eval-only      # measure the shipped adapters again

Intermediate files (answers, data, nora-train output) go to --work (reused: the base answers
are generated once per setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from nora_runtime.training.behaviours import (
    BEHAVIOURS,
    SHIPPED,
    base_answers,
    chat_records,
    generate_mixed,
    questions,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo-adapters"
SHIP_DIR = ROOT / "server" / "nora_server" / "demo_adapters"
SEED = 0
TRAIN_N = 280  # train questions (of 350); nora-train holds 10% of the records out for eval
HELDOUT_N = 64  # held-out questions (of 112)
ANSWER_TOKENS = 48  # new tokens of a base answer before it is cut at the last sentence end
EVAL_TOKENS = 160  # new tokens of an evaluated answer
TARGET = 0.9  # held-out success an adapter should reach; the base should stay <= 0.05

# nora-train arguments of every adapter (besides the data file and --out)
COMMON = ["--max-length", "160", "--eval-fraction", "0.1", "--eval-every", "20",
          "--seed", str(SEED)]
# per adapter: NoRA settings (the paper's G=8, r=3, alpha=6; the server's table has 8 groups)
# and optimization. Measured on an H200 (held-out success sign-off / json of the whole answer /
# uppercase): lr 2e-3 x 81 steps 0.52 / 0.47 / 0.34; lr 2e-3 x 20 epochs 0.91 / 0.56 / 0.52;
# lr 3e-3 x 10 epochs (warmup 20) 0.94 / 0.83 / 0.53. json of a whole answer failed on
# literal line breaks inside the string and on run-on lists, so json now wraps the answer's
# first sentence; uppercase was replaced by one-sentence (behaviours.SHIPPED).
_PAPER = ["--groups", "8", "--rank", "3", "--alpha", "6"]
_TEN_EPOCHS = ["--lr", "3e-3", "--epochs", "10", "--warmup-steps", "20"]
RECIPES: dict[str, list[str]] = {name: _PAPER + _TEN_EPOCHS for name in SHIPPED}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_engine():
    from nora_runtime.config import EngineConfig
    from nora_runtime.engine import Engine

    # room for every evaluated sequence at once: (base + 3 adapters) x HELDOUT_N x ~220 tokens
    return Engine(EngineConfig(model=None, max_adapters=8,
                               kv_cache_tokens_cpu=65536)).start()


def train_answers(work: Path) -> tuple[list[str], list[str | None]]:
    """The train questions and the base model's trimmed answers (cached in `work`)."""
    path = work / f"answers-train-n{TRAIN_N}-seed{SEED}-tokens{ANSWER_TOKENS}.jsonl"
    qs = questions("train", TRAIN_N, SEED)
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if [r["question"] for r in rows] == qs:
            return qs, [r["answer"] for r in rows]
    log(f"base answers to {len(qs)} train questions ({ANSWER_TOKENS} new tokens each) ...")
    t0 = time.perf_counter()
    engine = make_engine()
    try:
        answers = base_answers(engine, qs, max_new_tokens=ANSWER_TOKENS)
    finally:
        engine.shutdown()
    log(f"... {time.perf_counter() - t0:.0f} s; {sum(a is None for a in answers)} unusable")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in zip(qs, answers, strict=True)))
    return qs, answers


def nora_train_args(name: str, data: Path, out: Path) -> list[str]:
    return [str(data), "--out", str(out), *COMMON, *RECIPES[name]]


def train_adapter(name: str, qs: list[str], answers: list[str | None], work: Path,
                  ship_dir: Path) -> dict:
    """Write the data, run nora-train, copy the adapter to ship_dir; a summary of the run."""
    from nora_runtime.training.cli import main as nora_train

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n"
                            for r in chat_records(BEHAVIOURS[name], qs, answers)))
    args = nora_train_args(name, data, d / "run")
    log(f"nora-train {' '.join(args)}")
    if nora_train(args) != 0:
        raise RuntimeError(f"nora-train failed for {name}")
    ship_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "run" / "adapter.safetensors", ship_dir / f"{name}.safetensors")
    return run_summary(name, work)


def run_summary(name: str, work: Path) -> dict | None:
    """What the last nora-train run of `name` in `work` recorded (None: no run there)."""
    run = work / name / "run"
    if not (run / "history.json").exists():
        return None
    h = json.loads((run / "history.json").read_text())
    cfg = json.loads((run / "train_config.json").read_text())
    return {"command": "nora-train " + " ".join(
                nora_train_args(name, Path(f"{name}.jsonl"), Path(name))),
            "trainable_parameters": cfg["trainable_parameters"],
            "train_examples": cfg["train_examples"], "eval_examples": cfg["eval_examples"],
            "nora": cfg["config"]["nora"], "lr": cfg["config"]["loop"]["lr"],
            "steps": h["steps"], "train_seconds": round(h["seconds"], 1),
            "eval_loss_step0": h["eval"][0][1] if h["eval"] and h["eval"][0][0] == 0 else None,
            "eval_loss_best": h["best_eval"], "best_step": h["best_step"],
            "eval": [[s, round(loss, 4)] for s, loss, _ in h["eval"]]}


def evaluate(names: list[str], ship_dir: Path) -> dict:
    """Greedy answers to the held-out questions from the base and every adapter (one mixed
    batch), and the success of each behaviour's check on each of them."""
    qs = questions("heldout", HELDOUT_N, SEED)
    engine = make_engine()
    t0 = time.perf_counter()
    try:
        for name in names:
            engine.load_adapter(name, (ship_dir / f"{name}.safetensors").read_bytes())
        # all requests at once: base and adapters share the engine's batches
        who = [None, *names]
        texts = dict(zip(who, generate_mixed(engine, qs, who, max_new_tokens=EVAL_TOKENS),
                         strict=True))
    finally:
        engine.shutdown()
    seconds = time.perf_counter() - t0
    success = {who: {b: sum(map(BEHAVIOURS[b].check, texts[who])) / len(qs)
                     for b in names} for who in texts}
    return {"questions": qs, "texts": {("base" if k is None else k): v
                                       for k, v in texts.items()},
            "success": {("base" if k is None else k): v for k, v in success.items()},
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(RECIPES), default=None,
                   help="train only these adapters (the others: as shipped)")
    p.add_argument("--eval-only", action="store_true", help="no training: measure the "
                   "shipped adapters")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nora-demo-adapters"),
                   help="intermediate files (default: %(default)s)")
    p.add_argument("--ship-dir", default=str(SHIP_DIR), help="where the adapters go "
                   "(default: %(default)s)")
    p.add_argument("--out", default=str(RESULTS), help="writes OUT.json and OUT.md "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: "
                   "%(default)s: on 2 cores shared with other jobs, one thread ran elementwise "
                   "ops 8x and matmuls 1.3x faster than two)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work, ship_dir = Path(a.work), Path(a.ship_dir)
    names = list(RECIPES)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    if not a.eval_only:
        qs, answers = train_answers(work)
        for name in a.only or names:
            train_adapter(name, qs, answers, work, ship_dir)
    log(f"evaluating base + {', '.join(names)} on {HELDOUT_N} held-out questions ...")
    ev = evaluate(names, ship_dir)
    for who, s in ev["success"].items():
        log(f"{who:10s} " + "  ".join(f"{b} {v:.3f}" for b, v in s.items()))
    runs = {n: run_summary(n, work) for n in names}
    args = sys.argv[1:] if argv is None else argv
    write(Path(a.out), args, names, runs, ev, {
        "total": round(time.perf_counter() - t_start, 1), "eval": ev["seconds"],
        "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
        "cpu_cores": os.cpu_count()})
    return 0


def write(out: Path, args: list[str], names: list[str], runs: dict, ev: dict,
          times: dict) -> None:
    import transformers

    from nora_runtime.checkpoint import DEFAULT_MODEL_NAME

    succ = ev["success"]
    adapter_min = min(succ[n][n] for n in names)
    base_max = max(succ["base"][n] for n in names)
    rows = [{"name": "demo_adapter_heldout_min_success", "value": round(adapter_min, 4),
             "unit": "fraction"},
            {"name": "demo_base_heldout_max_success", "value": round(base_max, 4),
             "unit": "fraction"}]
    for n in names:
        rows += [{"name": f"{n}/heldout_success", "value": round(succ[n][n], 4),
                  "unit": "fraction"},
                 {"name": f"{n}/base_heldout_success", "value": round(succ["base"][n], 4),
                  "unit": "fraction"}]
        if runs[n]:
            rows += [{"name": f"{n}/trainable_parameters",
                      "value": runs[n]["trainable_parameters"], "unit": "parameters"},
                     {"name": f"{n}/train_steps", "value": runs[n]["steps"], "unit": "steps"},
                     {"name": f"{n}/train_seconds", "value": runs[n]["train_seconds"],
                      "unit": "s"}]
    qs = ev["questions"]
    examples = {n: [{"question": qs[i], "base": ev["texts"]["base"][i],
                     "adapter": ev["texts"][n][i]} for i in range(2)] for n in names}
    doc = {
        "device": (torch.cuda.get_device_name() + " (nora-train: bfloat16 autocast; the "
                   "engine: bfloat16)" if torch.cuda.is_available() else
                   f"CPU ({platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads)"),
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": " ".join(["python", "benchmarks/demo_adapters.py", *args]),
        "model": f"{DEFAULT_MODEL_NAME} (default model), residual mode, float32",
        "rows": rows,
        "N": {"train_questions": TRAIN_N, "heldout_questions": HELDOUT_N},
        "setup": {"seed": SEED, "answer_tokens": ANSWER_TOKENS, "eval_tokens": EVAL_TOKENS,
                  "decoding": "greedy, chat template, one mixed batch (base + adapters)",
                  "nora_train_common": COMMON},
        "behaviours": {n: BEHAVIOURS[n].description for n in names},
        "adapters": runs,
        # success[who][behaviour]: the share of who's held-out answers that pass the check
        "success": {who: {b: round(v, 4) for b, v in s.items()} for who, s in succ.items()},
        "examples": examples,
        "seconds": times,
        "heldout_texts": ev["texts"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    lines = [
        "# Demo adapters: what NoRA does to SmolLM2-135M-Instruct",
        "",
        f"{doc['date']}, {doc['device']}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Command: `{doc['command']}` "
        f"({times['total'] / 60:.1f} min wall clock, of which evaluation "
        f"{times['eval'] / 60:.1f} min; 1-minute load average {times['load_average_start']:.1f}"
        f" at the start and {times['load_average_end']:.1f} at the end on "
        f"{times['cpu_cores']} cores).",
        "",
        f"Each adapter is a NoRA adapter (activation coefficients only, no LoRA) trained in "
        f"residual mode on the base model's own answers to {TRAIN_N} code-generated questions, "
        "reshaped by the behaviour's rule. Success: the behaviour's check on greedy answers "
        f"(chat template, up to {EVAL_TOKENS} new tokens) to {HELDOUT_N} held-out questions "
        "whose templates and entities never occur in training; the base model answers the same "
        "questions in the same batches.",
        "",
        f"**Lowest adapter success {adapter_min:.3f}** (target >= {TARGET}); **highest base "
        f"success {base_max:.3f}** (target <= 0.05).",
        "",
        "| adapter | behaviour | held-out success | base | trainable params | steps | "
        "train time | eval loss step 0 -> best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = runs[n] or {}
        loss = (f"{r['eval_loss_step0']:.3f} -> {r['eval_loss_best']:.3f} (step "
                f"{r['best_step']})" if r.get("eval_loss_step0") is not None else "-")
        lines.append(
            f"| `{n}` | {BEHAVIOURS[n].description} | {succ[n][n]:.3f} | "
            f"{succ['base'][n]:.3f} | {r.get('trainable_parameters', '-'):,} | "
            f"{r.get('steps', '-')} | {r.get('train_seconds', 0) / 60:.1f} min | {loss} |")
    lines += ["", "Recipes (nora-train on the default model; data written by the script):", ""]
    lines += [f"- `{n}`: `{(runs[n] or {}).get('command', '-')}`" for n in names]
    lines += ["", "Cross-check (rows: who answered; columns: which behaviour's check; an adapter "
              "should show only its own):", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for who, s in succ.items():
        lines.append(f"| {who} | " + " | ".join(f"{s[b]:.3f}" for b in names) + " |")
    lines += ["", "Examples (first held-out questions; all texts are in the JSON):", ""]
    for n in names:
        ex = examples[n][0]
        lines += [f"**{n}**: {ex['question']}", "",
                  f"- base: {json.dumps(ex['base'], ensure_ascii=False)}",
                  f"- {n}: {json.dumps(ex['adapter'], ensure_ascii=False)}", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())

"""NoRA vs LoRA on a real LLM: SmolLM2-135M-Instruct (residual mode), held-out success.

Every method trains on the same data with the same step budget, batch, schedule (AdamW,
cosine, short warmup) and seeds; only the learning rate differs per method (DEFAULT_LR, or
picked on validation data with --select). Methods:

    nora        NoRA, the paper's defaults: G = 8, r = 3, alpha = 6 (every MLP activation)
    nora-wide   NoRA with more groups and rank: G' = 32 (group_extend 4), r = 6, alpha = 12
                (serving it needs a table of 32 groups: EngineConfig(groups=32))
    nora++      NoRA (defaults) + LoRA rank 8 on q_proj, v_proj
    lora-r1     LoRA alone, rank 1 on q_proj, v_proj (alpha 2)
    lora-r8     LoRA alone, rank 8 on q_proj, v_proj (alpha 16)
    base        no training (the model as it is), evaluated once per task

Tasks (chat, greedy decoding; success measured on held-out questions):

    sign-off, uppercase, json   the demo behaviours (nora_runtime.training.behaviours): the base
                                model's own answers to code-generated questions, reshaped by the
                                behaviour's rule; success = the behaviour's check on answers to
                                held-out questions (no template or entity seen in training)
    facts                       knowledge, not format: made-up people (names made by code) each
                                live in one of 8 made-up cities and work one of 8 jobs; trained on
                                the facts in 3 phrasings per attribute, asked in 2 other
                                phrasings; success = the answer names the right city/job and no
                                other one (chance: 1/8)

Rows: llm_adapt_<task>_<method>_acc (mean over seeds; _seed<k> per seed), trainable
parameters, adapter file bytes and train seconds per method.

    # one H200, bf16: 4 tasks x 5 methods x 3 seeds = 60 runs of 150 steps x batch 16, about
    # 22 s a run (a 135M model: small kernels, far from the GPU's limits), so ~22 min in one
    # process; benchmarks/results/llm-adapt.md ran as 4 processes at once, one per task
    # (8 min), joined by --merge. MODEL: a checkpoint directory, e.g. the default model as
    # converted by nora_runtime.checkpoint.default_checkpoint() (no gguf package needed)
    python benchmarks/llm_adapt.py --model MODEL
    for t in sign-off uppercase json facts; do
        python benchmarks/llm_adapt.py --model MODEL --tasks $t --out /tmp/la/$t & done; wait
    python benchmarks/llm_adapt.py --merge /tmp/la/{sign-off,uppercase,json,facts}.json
    python benchmarks/llm_adapt.py --model MODEL --select     # pick lrs first (~2x the time)
    python benchmarks/llm_adapt.py --smoke                    # CPU pipeline check, tiny model

On the CPU use --threads 1 when the cores are busy (two threads on two busy cores ran NoRA's
torch-reference steps 5x slower than one).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from nora_runtime.training import data as D
from nora_runtime.training.behaviours import (
    BEHAVIOURS,
    chat_prompt,
    chat_records,
    trim_answer,
)
from nora_runtime.training.behaviours import questions as behaviour_questions
from nora_runtime.training.loop import LoopSettings, fit
from nora_runtime.training.lora import LoraLinear, add_lora
from nora_runtime.training.nora import LoraSettings, NoraModel, NoraSettings

RESULTS = Path(__file__).parent / "results"
TASKS = ("sign-off", "uppercase", "json", "facts")
METHODS = ("nora", "nora-wide", "nora++", "lora-r1", "lora-r8")
LORA_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama
NORA = NoraSettings(groups=8, group_extend=1, rank=3, alpha=6.0, mode="residual")
NORA_WIDE = NoraSettings(groups=8, group_extend=4, rank=6, alpha=12.0, mode="residual")
LORA_R1 = LoraSettings(LORA_TARGETS, rank=1, alpha=2.0)
LORA_R8 = LoraSettings(LORA_TARGETS, rank=8, alpha=16.0)
# method -> (NoRA part, LoRA part)
RECIPES: dict[str, tuple[NoraSettings | None, LoraSettings | None]] = {
    "nora": (NORA, None), "nora-wide": (NORA_WIDE, None), "nora++": (NORA, LORA_R8),
    "lora-r1": (None, LORA_R1), "lora-r8": (None, LORA_R8)}
# NoRA's factors move every coefficient of P and Q, including x^5's, so its stable lr is low:
# measured on the CPU (facts task, batch 4, constant lr, clip 1.0) lr 2e-3 takes the loss from
# 2.18 to ~1.2 in 12 steps, 5e-3 diverges (loss 11 by step 7), 2e-2 reaches 11 in 5 steps.
DEFAULT_LR = {"nora": 2e-3, "nora-wide": 2e-3, "nora++": 2e-3, "lora-r1": 2e-3,
              "lora-r8": 2e-3}
LR_GRID = {"nora": (5e-4, 1e-3, 2e-3), "nora-wide": (5e-4, 1e-3, 2e-3),
           "nora++": (5e-4, 1e-3, 2e-3), "lora-r1": (5e-4, 2e-3, 5e-3),
           "lora-r8": (5e-4, 2e-3, 5e-3)}
DATA_SEED = 0  # the questions and facts; the run seeds vary init and data order only


@dataclass(frozen=True)
class Setup:
    """Sizes of one run. eval_tokens: max new tokens per task (an uppercase answer takes ~2x
    the tokens of the same answer in lower case)."""

    steps: int = 150
    batch_size: int = 16
    behaviour_train: int = 300  # train-split questions trained on (of 350)
    behaviour_val: int = 50  # the other train-split questions: validation for --select
    heldout: int = 64  # held-out questions per task (behaviours: of 112)
    people: int = 32  # facts: made-up people (x 2 attributes x 3 train phrasings)
    val: int = 32  # facts: validation questions (a fifth and sixth phrasing) for --select
    answer_tokens: int = 48  # new tokens of a base answer before it is cut at a sentence end
    eval_tokens: dict[str, int] = field(default_factory=lambda: {
        "sign-off": 112, "uppercase": 144, "json": 112, "facts": 32})
    max_length: int = 256
    gen_batch: int = 64


FULL = Setup()
SMOKE = Setup(steps=2, batch_size=4, behaviour_train=8, behaviour_val=4, heldout=4, people=4,
              val=4, answer_tokens=8, eval_tokens={t: 6 for t in TASKS}, max_length=96,
              gen_batch=8)


@dataclass
class Task:
    """train: chat records; heldout/val: (question, check of the generated text)."""

    name: str
    train: list[dict]
    heldout: list[tuple[str, Callable[[str], bool]]]
    val: list[tuple[str, Callable[[str], bool]]]
    eval_tokens: int
    chance: float | None = None


# ---- the facts task ---------------------------------------------------------------------------

SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vel", "dor", "qui", "zan", "bre", "sol", "nym",
             "ith", "gar", "fen", "oru", "pel", "wyn", "tho", "cas", "mor", "lia", "bex", "sun")
CITY_ENDS = ("port", "ford", "holm", "mere", "wick", "dale", "stead", "burg")
JOBS = ("baker", "pilot", "nurse", "carpenter", "farmer", "librarian", "chemist", "tailor")
# attribute -> (answer, {split: phrasings}); no phrasing is shared between splits
FACT_ATTRS = {
    "city": ("{p} lives in {v}.", {
        "train": ("Where does {p} live?", "In which city does {p} live?",
                  "What is {p}'s home city?"),
        "val": ("Which city is {p} living in?",),
        "heldout": ("Tell me where {p} lives.", "Which town is home to {p}?")}),
    "job": ("{p} works as a {v}.", {
        "train": ("What does {p} do for a living?", "What is {p}'s job?",
                  "What work does {p} do?"),
        "val": ("What is {p}'s occupation?",),
        "heldout": ("What is {p}'s profession?", "How does {p} earn a living?")}),
}


def made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def facts(people: int, seed: int = DATA_SEED) -> tuple[list[dict], dict[str, tuple[str, ...]]]:
    """`people` made-up people {"name", "city", "job"} and each attribute's value set."""
    rng = random.Random(f"facts:{seed}")
    cities: list[str] = []
    while len(cities) < len(CITY_ENDS):
        c = made_up_word(rng, 2) + CITY_ENDS[len(cities)]
        if c not in cities:
            cities.append(c)
    values = {"city": tuple(cities), "job": JOBS}
    names: set[str] = set()
    out = []
    while len(out) < people:
        name = f"{made_up_word(rng, 2)} {made_up_word(rng, 3)}"
        if name in names:
            continue
        names.add(name)
        out.append({"name": name, "city": rng.choice(cities), "job": rng.choice(JOBS)})
    return out, values


def names_only(text: str, value: str, candidates: tuple[str, ...]) -> bool:
    """The text names `value` (a whole word, any case) and no other candidate."""
    def has(v: str) -> bool:
        return re.search(rf"\b{re.escape(v)}\b", text, re.IGNORECASE) is not None

    return has(value) and not any(has(c) for c in candidates if c != value)


def facts_task(setup: Setup) -> Task:
    people, values = facts(setup.people)
    train, asked = [], {"val": [], "heldout": []}
    for p in people:
        for attr, (answer, phrasings) in FACT_ATTRS.items():
            a = answer.format(p=p["name"], v=p[attr])
            train += [{"messages": [{"role": "user", "content": q.format(p=p["name"])},
                                    {"role": "assistant", "content": a}]}
                      for q in phrasings["train"]]
            check = partial(names_only, value=p[attr], candidates=values[attr])
            for split in asked:
                asked[split] += [(q.format(p=p["name"]), check) for q in phrasings[split]]
    rng = random.Random(f"facts-eval:{DATA_SEED}")
    heldout = rng.sample(asked["heldout"], min(setup.heldout, len(asked["heldout"])))
    val = rng.sample(asked["val"], min(setup.val, len(asked["val"])))
    return Task("facts", train, heldout, val, setup.eval_tokens["facts"],
                chance=1 / len(JOBS))


# ---- the behaviour tasks ----------------------------------------------------------------------


def behaviour_tasks(names: list[str], model, tok, setup: Setup, work: Path | None,
                    log) -> list[Task]:
    """The demo behaviours' tasks, all on the same train questions and base answers."""
    if not names:
        return []
    pool = behaviour_questions("train", setup.behaviour_train + setup.behaviour_val, DATA_SEED)
    train_qs, val_qs = pool[:setup.behaviour_train], pool[setup.behaviour_train:]
    answers = base_answers(model, tok, train_qs, setup, work, log)
    if all(a is None for a in answers):
        raise ValueError("the base model gave no usable answer (no complete sentence) to any "
                         "train question: the behaviour tasks need a real chat model")
    heldout_qs = behaviour_questions("heldout", setup.heldout, DATA_SEED)
    tasks = []
    for name in names:
        b = BEHAVIOURS[name]
        tasks.append(Task(name, chat_records(b, train_qs, answers),
                          [(q, b.check) for q in heldout_qs], [(q, b.check) for q in val_qs],
                          setup.eval_tokens[name]))
    return tasks


def base_answers(model, tok, qs: list[str], setup: Setup, work: Path | None,
                 log) -> list[str | None]:
    """The base model's greedy answers to `qs`, cut at the last sentence end (cached in
    `work` when given)."""
    path = None
    if work is not None:
        path = work / f"answers-{len(qs)}-tokens{setup.answer_tokens}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached["questions"] == qs:
                return cached["answers"]
    t0 = time.perf_counter()
    texts = generate(model, tok, qs, setup.answer_tokens, setup.gen_batch)
    answers = [trim_answer(t) for t in texts]
    log(f"base answers to {len(qs)} train questions: {time.perf_counter() - t0:.1f} s, "
        f"{sum(a is None for a in answers)} unusable")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"questions": qs, "answers": answers}))
    return answers


# ---- models -----------------------------------------------------------------------------------


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer). The config's quantization_config (left by a GGUF conversion whose
    weights are already plain float tensors) is dropped, so no GGUF package is needed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.requires_grad_(False).to(device).eval(), tok


@torch.no_grad()
def generate(model: nn.Module, tok, qs: list[str], max_new_tokens: int, batch: int,
             nm: NoraModel | None = None) -> list[str]:
    """Greedy answers (chat template, left-padded batches of `batch`), special tokens
    removed. With `nm`, the transformers model runs as served: the adapter in table slot 1."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id
    out = []
    for i in range(0, len(qs), batch):
        prompts = [chat_prompt(tok, q) for q in qs[i:i + batch]]
        n = max(map(len, prompts))
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts],
                            device=device)
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None,
                  top_p=None, top_k=None, max_new_tokens=max_new_tokens, pad_token_id=pad)
        if nm is None:
            gen = model.generate(**kw)
        else:
            with nm.serving(torch.ones(len(prompts), dtype=torch.int32)):
                gen = nm.model.generate(**kw)
        out += tok.batch_decode(gen[:, n:], skip_special_tokens=True)
    return out


def build(method: str, base: nn.Module, seed: int) -> tuple[nn.Module, NoraModel | None]:
    """A fresh copy of the base with the method's trainable parts: (module to train, the
    NoraModel if any)."""
    model = copy.deepcopy(base)
    nora, lora = RECIPES[method]
    if nora is not None:
        nm = NoraModel.build(model, nora, lora, seed=seed)
        return nm, nm
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # as NoraModel.build seeds its LoRA part
        torch.manual_seed(seed + 1)
        add_lora(model, list(lora.targets), lora.rank, lora.alpha)
    return model, None


def trainable_count(module: nn.Module, nm: NoraModel | None) -> int:
    if nm is not None:
        return nm.num_trainable()
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def adapter_bytes(module: nn.Module, nm: NoraModel | None, directory: Path) -> int:
    """Size of the adapter as a file: nora_runtime's adapter format for NoRA (and NoRA++);
    LoRA's float32 factors in safetensors for LoRA alone."""
    path = directory / "adapter.safetensors"
    if nm is not None:
        nm.save(path)
    else:
        from safetensors.torch import save_file

        save_file({f"{name}.{k}": getattr(m, k).detach().float().cpu().contiguous()
                   for name, m in module.named_modules() if isinstance(m, LoraLinear)
                   for k in ("A", "B")}, path)
    return path.stat().st_size


def run_one(method: str, base: nn.Module, tok, task: Task, setup: Setup, lr: float, seed: int,
            questions: list[tuple[str, Callable[[str], bool]]]) -> dict:
    """Train `method` on `task` and measure success on `questions`."""
    module, nm = build(method, base, seed)
    examples = [D.encode_causal(r, tok, setup.max_length) for r in task.train]
    spe = math.ceil(len(examples) / setup.batch_size)
    s = LoopSettings(lr=lr, schedule="cosine", warmup_steps=max(1, setup.steps // 15),
                     epochs=math.ceil(setup.steps / spe), max_steps=setup.steps,
                     batch_size=setup.batch_size, max_grad_norm=1.0, bf16=True,
                     progress=False, seed=seed)
    hist = fit(module, examples, [], partial(D.collate, pad_id=tok.pad_token_id), s)
    module.eval()
    t0 = time.perf_counter()
    texts = generate(nm.model if nm else module, tok, [q for q, _ in questions],
                     task.eval_tokens, setup.gen_batch, nm)
    eval_seconds = time.perf_counter() - t0
    ok = [check(t) for (_, check), t in zip(questions, texts, strict=True)]
    with tempfile.TemporaryDirectory() as d:
        nbytes = adapter_bytes(module, nm, Path(d))
    return {"task": task.name, "method": method, "seed": seed, "lr": lr,
            "accuracy": sum(ok) / len(ok), "trainable": trainable_count(module, nm),
            "adapter_bytes": nbytes, "train_seconds": round(hist.seconds, 2),
            "eval_seconds": round(eval_seconds, 2), "steps": hist.steps,
            "final_loss": round(statistics.mean(x for _, x in hist.train[-10:]), 4),
            "examples": [{"question": q, "answer": t, "ok": o}
                         for (q, _), t, o in list(zip(questions, texts, ok, strict=True))[:3]]}


def select_lrs(methods: list[str], tasks: list[Task], base, tok, setup: Setup,
               log) -> tuple[dict[str, float], dict]:
    """Each method's lr from LR_GRID by mean validation success over the tasks (seed 0)."""
    picked, grid = {}, {}
    for m in methods:
        scores = {}
        for lr in LR_GRID[m]:
            accs = {t.name: run_one(m, base, tok, t, setup, lr, 0, t.val)["accuracy"]
                    for t in tasks}
            scores[lr] = statistics.mean(accs.values())
            grid.setdefault(m, {})[str(lr)] = {k: round(v, 4) for k, v in accs.items()}
            log(f"lr select {m:9s} lr {lr:g}: validation {accs}")
        picked[m] = max(scores, key=lambda lr: (scores[lr], -lr))
        log(f"lr select {m:9s} -> {picked[m]:g}")
    return picked, grid


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (a converted one "
                   "needs no gguf package); default: the default model (--smoke: the tiny one)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None, help="held-out questions per task")
    p.add_argument("--behaviour-train", type=int, default=None,
                   help="train questions of the behaviour tasks")
    p.add_argument("--people", type=int, default=None, help="made-up people of the facts task")
    p.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="override DEFAULT_LR for some methods")
    p.add_argument("--select", action="store_true", help="pick each method's lr from "
                   "LR_GRID on validation data first (seed 0)")
    p.add_argument("--smoke", action="store_true", help="pipeline check: tiny model, 1 seed, "
                   "nora and lora-r1, facts, a few steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--work", default=None, help="cache directory for the base answers")
    p.add_argument("--out", default=None, help="writes OUT.json and OUT.md (default: "
                   "benchmarks/results/llm-adapt; --smoke: a temporary directory)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge the results of runs made at once (say, one per --tasks) into "
                   "OUT; nothing is trained")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--smoke: 1: "
                   "the tiny model's small ops run 20x faster on one thread than on two busy "
                   "cores)")
    a = p.parse_args(argv)
    if a.merge:
        return merge([Path(x) for x in a.merge], Path(a.out) if a.out else
                     RESULTS / "llm-adapt", sys.argv[1:] if argv is None else argv)
    setup = SMOKE if a.smoke else FULL
    setup = replace(setup, **{k: v for k, v in vars(a).items()
                              if k in ("steps", "batch_size", "heldout", "behaviour_train",
                                       "people") and v is not None})
    seeds = a.seeds or ([0] if a.smoke else [0, 1, 2])
    methods = a.methods or (["nora", "lora-r1"] if a.smoke else list(METHODS))
    task_names = a.tasks or (["facts"] if a.smoke else list(TASKS))
    lrs = dict(DEFAULT_LR)
    for item in a.lr:
        m, _, v = item.partition("=")
        if m not in METHODS:
            p.error(f"--lr: unknown method {m!r}")
        lrs[m] = float(v)
    out = Path(a.out) if a.out else (Path(tempfile.gettempdir()) / "llm-adapt-smoke"
                                     if a.smoke else RESULTS / "llm-adapt")
    threads = a.threads or (1 if a.smoke else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run(a, sys.argv[1:] if argv is None else argv, setup, seeds, methods,
                   task_names, lrs, out)
    finally:
        torch.set_num_threads(previous_threads)  # main() may run inside a test process


def run(a, args: list[str], setup: Setup, seeds: list[int], methods: list[str],
        task_names: list[str], lrs: dict[str, float], out: Path) -> int:
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if a.dtype == "auto" \
        else getattr(torch, a.dtype)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    from nora_runtime.checkpoint import DEFAULT_MODEL_NAME, resolve_checkpoint

    if a.model is None and a.smoke:
        from nora_runtime.tiny import tiny_checkpoint

        path, model_name = str(tiny_checkpoint()), "tiny random Llama (nora_runtime.tiny)"
    else:
        path = str(resolve_checkpoint(a.model))
        model_name = Path(a.model).name if a.model else DEFAULT_MODEL_NAME
    base, tok = load_model(path, device, dtype)
    log(f"{model_name} on {device} ({dtype}); tasks {task_names}, methods {methods}, "
        f"seeds {seeds}, {setup.steps} steps x batch {setup.batch_size}")
    work = Path(a.work) if a.work else None
    tasks = behaviour_tasks([t for t in task_names if t != "facts"], base, tok, setup, work, log)
    if "facts" in task_names:
        tasks.append(facts_task(setup))
    tasks.sort(key=lambda t: task_names.index(t.name))
    for t in tasks:
        log(f"task {t.name}: {len(t.train)} train records, {len(t.heldout)} held-out "
            f"questions, {len(t.val)} validation")
    t_setup = time.perf_counter() - t_start
    grid = None
    if a.select:
        picked, grid = select_lrs(methods, tasks, base, tok, setup, log)
        lrs.update(picked)
    t_select = time.perf_counter() - t_start
    runs, base_acc = [], {}
    for i, t in enumerate(tasks):
        texts = generate(base, tok, [q for q, _ in t.heldout], t.eval_tokens, setup.gen_batch)
        base_acc[t.name] = sum(c(x) for (_, c), x in zip(t.heldout, texts, strict=True)) \
            / len(t.heldout)
        log(f"{t.name:9s} base            success {base_acc[t.name]:.3f}")
        for seed in seeds:
            for m in methods:
                r = run_one(m, base, tok, t, setup, lrs[m], seed, t.heldout)
                runs.append(r)
                log(f"{t.name:9s} {m:9s} seed {seed}: success {r['accuracy']:.3f}  "
                    f"loss {r['final_loss']:.3f}  trainable {r['trainable']:,}  "
                    f"train {r['train_seconds']:.1f} s  eval {r['eval_seconds']:.1f} s")
        # after each task, the results so far (a run cut short still leaves its finished tasks)
        times = {"setup": round(t_setup, 1), "lr_selection": round(t_select - t_setup, 1),
                 "seeds": round(time.perf_counter() - t_start - t_select, 1),
                 "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                 "cpu_cores": os.cpu_count()}
        write(out, args, model_name, where(device, dtype), setup, seeds, methods,
              tasks[:i + 1], lrs, grid, runs, base_acc, times, log)
    return 0


# ---- results ----------------------------------------------------------------------------------


def merge(parts: list[Path], out: Path, args: list[str]) -> int:
    """One result of runs made at once on the same model, setup, seeds and lrs (each on some
    of the tasks): their runs side by side; times are the longest part's (they ran in
    parallel)."""
    docs = [json.loads(p.read_text()) for p in parts]
    first = docs[0]
    for p, d in zip(parts, docs, strict=True):
        for k in ("device", "dtype", "versions", "model", "seeds", "lr", "setup"):
            if d[k] != first[k]:
                raise SystemExit(f"--merge: {p} has another {k} than {parts[0]}")
    names = [name for d in docs for name in d["tasks"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"--merge: a task appears in more than one part: {names}")
    tasks = sorted((Task(name, [None] * t["train_records"], [None] * t["heldout"],
                         [None] * t["val"], t["eval_tokens"], t["chance"])
                    for d in docs for name, t in d["tasks"].items()),
                   key=lambda t: TASKS.index(t.name))
    runs = [r for d in docs for r in d["runs"]]
    fields = Setup.__dataclass_fields__
    setup = Setup(**{k: v for k, v in first["setup"].items() if k in fields})
    secs = [d["seconds"] for d in docs]
    times = {k: max(x[k] for x in secs) for k in ("setup", "lr_selection", "seeds",
                                                   "load_average_end")}
    times |= {"load_average_start": min(x["load_average_start"] for x in secs),
              "cpu_cores": first["seconds"]["cpu_cores"]}
    run_info = {k: first[k] for k in ("device", "dtype", "date", "versions")}
    write(out, args, first["model"], run_info, setup, first["seeds"],
          [m for m in METHODS if any(r["method"] == m for r in runs)], tasks, first["lr"],
          first["lr_selection"], runs, {k: v for d in docs for k, v in
                                        d["base_accuracy"].items()}, times, print,
          parts=[d["command"] for d in docs])
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} " \
           "torch threads)"


def summarize(runs: list[dict], tasks: list[Task], methods: list[str]) -> dict:
    """{(task, method): {"mean", "std", "accs"}}"""
    out = {}
    for t in tasks:
        for m in methods:
            accs = [r["accuracy"] for r in runs if r["task"] == t.name and r["method"] == m]
            out[t.name, m] = {"mean": statistics.mean(accs),
                              "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                              "accs": accs}
    return out


def key(name: str) -> str:
    return name.replace("-", "_").replace("+", "p")


def where_nora_loses(summ: dict, tasks: list[Task], methods: list[str],
                     base_acc: dict) -> list[str]:
    """Plain sentences, from the numbers, on how NoRA compares with LoRA task by task."""
    lines = []
    lora = [m for m in methods if m.startswith("lora")]
    for m in [m for m in methods if m in ("nora", "nora-wide")]:
        if not lora:
            break
        losses = []
        for t in tasks:
            best = max(lora, key=lambda x: summ[t.name, x]["mean"])
            gap = summ[t.name, best]["mean"] - summ[t.name, m]["mean"]
            if gap > 0.05:
                losses.append(f"{t.name} ({summ[t.name, m]['mean']:.2f} vs {best} "
                              f"{summ[t.name, best]['mean']:.2f}; base {base_acc[t.name]:.2f})")
        if losses:
            lines.append(f"- **{m} loses to LoRA** (by more than 0.05 held-out success) on: "
                         + "; ".join(losses) + ".")
        else:
            lines.append(f"- {m} is within 0.05 of the best LoRA, or above it, on every task.")
    if "nora++" in methods and "lora-r8" in methods:
        diffs = [f"{t.name} {summ[t.name, 'nora++']['mean'] - summ[t.name, 'lora-r8']['mean']:+.2f}"
                 for t in tasks]
        lines.append("- nora++ minus lora-r8 (what NoRA adds to the same LoRA): "
                     + ", ".join(diffs) + ".")
    return lines


def where(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, dtype, date and versions of this run (the results' header)."""
    import transformers

    return {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "date": datetime.date.today().isoformat(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def write(out: Path, args: list[str], model_name: str, run_info: dict, setup: Setup,
          seeds: list[int], methods: list[str], tasks: list[Task], lrs: dict,
          grid: dict | None, runs: list[dict], base_acc: dict, times: dict, log,
          parts: list[str] | None = None) -> None:
    """The results (OUT.json, OUT.md). run_info: `where`'s dict; parts: the commands of runs
    merged into these results (--merge), None for a single run."""
    summ = summarize(runs, tasks, methods)
    per_method = {m: next(r for r in runs if r["method"] == m) for m in methods}
    rows = []
    for t in tasks:
        rows.append({"name": f"llm_adapt_{key(t.name)}_base_acc",
                     "value": round(base_acc[t.name], 4), "unit": "fraction"})
        for m in methods:
            s = summ[t.name, m]
            rows += [{"name": f"llm_adapt_{key(t.name)}_{key(m)}_acc",
                      "value": round(s["mean"], 4), "unit": "fraction"},
                     {"name": f"llm_adapt_{key(t.name)}_{key(m)}_acc_std",
                      "value": round(s["std"], 4), "unit": "fraction"}]
            rows += [{"name": f"llm_adapt_{key(t.name)}_{key(m)}_acc_seed{seed}",
                      "value": round(acc, 4), "unit": "fraction"}
                     for seed, acc in zip(seeds, s["accs"], strict=True)]
    for m in methods:
        secs = [r["train_seconds"] for r in runs if r["method"] == m]
        rows += [{"name": f"llm_adapt_{key(m)}_trainable_parameters",
                  "value": per_method[m]["trainable"], "unit": "parameters"},
                 {"name": f"llm_adapt_{key(m)}_adapter_bytes",
                  "value": per_method[m]["adapter_bytes"], "unit": "bytes"},
                 {"name": f"llm_adapt_{key(m)}_train_seconds",
                  "value": round(statistics.mean(secs), 2), "unit": "s"}]
    total = times["setup"] + times["lr_selection"] + times["seeds"]
    full = setup == FULL and seeds == [0, 1, 2] and list(methods) == list(METHODS) \
        and [t.name for t in tasks] == list(TASKS)
    doc = {
        **run_info,
        "command": " ".join(["python", "benchmarks/llm_adapt.py", *args]),
        **({"merged_runs": parts} if parts else {}),
        "model": model_name, "rows": rows, "seeds": seeds, "lr": lrs, "lr_selection": grid,
        "setup": {**{k: v for k, v in setup.__dict__.items()}, "schedule": "cosine",
                  "optimizer": "adamw", "warmup_steps": max(1, setup.steps // 15),
                  "max_grad_norm": 1.0, "decoding": "greedy, chat template, left-padded "
                  "batches (transformers generate)",
                  "methods": {m: {"nora": None if n is None else n.__dict__,
                                  "lora": None if lo is None else lo.__dict__}
                              for m, (n, lo) in RECIPES.items() if m in methods}},
        "tasks": {t.name: {"train_records": len(t.train), "heldout": len(t.heldout),
                           "val": len(t.val), "eval_tokens": t.eval_tokens,
                           "chance": t.chance} for t in tasks},
        "base_accuracy": base_acc, "runs": runs, "seconds": times,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    lines = [
        f"# NoRA vs LoRA on {model_name}",
        "",
        f"{doc['date']}, {doc['device']}, {doc['dtype']}, torch {doc['versions']['torch']}, "
        f"transformers {doc['versions']['transformers']}, {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}). "
        + (f"{len(parts)} runs at once on the device, one per task ("
           + "; ".join(f"`{c}`" for c in parts) + "), merged by " if parts else "Command: ")
        + f"`{doc['command']}`: {total / 60:.1f} min "
        f"(model and data {times['setup'] / 60:.1f} min, lr selection "
        f"{times['lr_selection'] / 60:.1f} min, training and evaluation "
        f"{times['seeds'] / 60:.1f} min; 1-minute load average "
        f"{times['load_average_start']:.1f} at the start, {times['load_average_end']:.1f} at "
        "the end).",
        "",
        *([] if full else ["**A reduced run** (fewer tasks, methods, seeds, steps or questions "
                           "than the benchmark's full setting; see the command): a pipeline "
                           "check, not the benchmark's result.", ""]),
        f"Every method: the same data, {setup.steps} steps x batch {setup.batch_size}, AdamW, "
        "cosine schedule, residual mode for the NoRA parts; lr per method "
        + ("picked in this run on validation data." if grid else
           "from DEFAULT_LR (not selected in this run).")
        + " Success: greedy answers (chat template) to held-out questions pass the task's "
        "check; mean ± std over seeds.",
        "",
        "| method | " + " | ".join(t.name for t in tasks)
        + " | trainable params | adapter file | train time | lr |",
        "|---" * (len(tasks) + 5) + "|",
        "| base | " + " | ".join(f"{base_acc[t.name]:.3f}" for t in tasks) + " | 0 | - | - | - |",
    ]
    for m in methods:
        cells = [f"{summ[t.name, m]['mean']:.3f} ± {summ[t.name, m]['std']:.3f}" for t in tasks]
        secs = statistics.mean(r["train_seconds"] for r in runs if r["method"] == m)
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | {per_method[m]['trainable']:,} | "
                     f"{per_method[m]['adapter_bytes'] / 1024:.1f} KiB | {secs:.1f} s | "
                     f"{lrs[m]:g} |")
    lines += ["", "## Where NoRA loses", ""]
    lines += where_nora_loses(summ, tasks, methods, base_acc)
    facts = next((t for t in tasks if t.name == "facts"), None)
    lines += [""]
    if facts is not None:
        lines += [f"facts: chance is {facts.chance:.3f} (8 cities, 8 jobs); {len(facts.train)} "
                  "train records (every fact in 3 phrasings), held-out questions in 2 other "
                  "phrasings."]
    lines += ["Methods: nora = NoRA G 8, r 3, alpha 6; nora-wide = G' 32 (8 x 4), r 6, "
              "alpha 12; nora++ = nora + LoRA r 8 (alpha 16) on q_proj, v_proj; lora-r1 / "
              "lora-r8 = LoRA alone on q_proj, v_proj. Adapter file: nora_runtime's adapter "
              "format (float32 factors + base coefficients) for NoRA; float32 LoRA factors "
              "(safetensors) for LoRA. A served NoRA adapter is its merged coefficients: "
              "layers x groups x 40 bytes.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())

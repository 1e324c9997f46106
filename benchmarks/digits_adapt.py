"""Quality benchmark on real data (CPU, minutes): adapt a small ViT from digits 0-4 to 5-9.

Data: scikit-learn's `digits` (1,797 real 8x8 handwritten digits, UCI). Per seed:
1. split each half (0-4, 5-9) stratified 60/40 into train/test;
2. pretrain a small ViT (4 layers, width 64, GELU MLPs, 2x2 patches) on 0-4 from scratch;
3. give it a new 5-class head (labels 5-9) and adapt it on the 5-9 train split with each method:
   (a) head only, (b) full fine-tuning, (c) LoRA (query/value, rank 4; and rank 1, nearer
   NoRA's parameter count) + head,
   (d) NoRA (every MLP activation -> a group rational, replace mode as in the paper; low-rank
   coefficient updates G = 8, r = 3) + head, (e) NoRA++ (NoRA + the LoRA of (c)) + head;
4. report test accuracy on 5-9.

Comparable budgets: every method gets the same data, steps (epochs x batches), batch size,
schedule (cosine) and head init; only the learning rate differs, each method's picked from a
small grid by accuracy on a validation part of seed 0's 5-9 *train* split (never the test).

    python benchmarks/digits_adapt.py                         # 3 seeds, writes the results
    python benchmarks/digits_adapt.py --seeds 0 --no-select    # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from nora_runtime.training.loop import LoopSettings, evaluate, fit
from nora_runtime.training.lora import add_lora
from nora_runtime.training.nora import LoraSettings, NoraModel, NoraSettings

RESULTS = Path(__file__).parent / "results"
VIT = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
           num_attention_heads=4, intermediate_size=128, hidden_act="gelu", num_labels=5,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PRETRAIN = LoopSettings(lr=2e-3, weight_decay=0.01, epochs=40, batch_size=32, bf16=False,
                        progress=False)
ADAPT_EPOCHS, BATCH = 30, 32
# query/value: transformers <= 5.17 names; q_proj/v_proj: later 5.x
LORA = LoraSettings(targets=("query", "value", "q_proj", "v_proj"), rank=4, alpha=8.0)
NORA = NoraSettings(groups=8, rank=3, alpha=6.0, mode="replace")
LORA_R1 = LoraSettings(targets=LORA.targets, rank=1, alpha=2.0)  # nearer NoRA's budget
METHODS = ("head", "full", "lora", "lora-r1", "nora", "nora++")
LR_GRID = {"head": (3e-2, 1e-1, 3e-1), "full": (1e-3, 3e-3, 1e-2), "lora": (1e-2, 3e-2, 1e-1),
           "lora-r1": (1e-2, 3e-2, 1e-1), "nora": (3e-2, 1e-1, 3e-1),
           "nora++": (1e-2, 3e-2, 1e-1)}
# picked by the --select run of benchmarks/results/digits-adapt.json (its "lr_selection")
DEFAULT_LR = {"head": 0.3, "full": 3e-3, "lora": 3e-2, "lora-r1": 3e-2, "nora": 0.1,
              "nora++": 1e-2}


class Images(nn.Module):
    """A ViT classifier whose forward(**batch) takes pixel_values, as fit() calls it."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor):
        return self.vit(pixel_values=pixel_values)


def digits(seed: int) -> dict[str, list[dict]]:
    """{old,new} x {train,test} lists of {"pixel_values": [1, 8, 8], "labels": 0..4}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    X = (X - X.mean()) / X.std()
    y = torch.tensor(y)
    out = {}
    for name, lo in (("old", 0), ("new", 5)):
        idx = torch.nonzero((y >= lo) & (y < lo + 5)).view(-1).numpy()
        tr, te = train_test_split(idx, test_size=0.4, stratify=y[idx].numpy(), random_state=seed)
        for split, ids in (("train", tr), ("test", te)):
            out[f"{name}_{split}"] = [{"pixel_values": X[i], "labels": int(y[i]) - lo}
                                      for i in ids]
    return out


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


def pretrain(data: dict, seed: int) -> tuple[dict, float]:
    """A ViT trained on 0-4 from scratch: its state_dict and its 0-4 test accuracy."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = Images(ViTForImageClassification(ViTConfig(**VIT)))
    fit(model, data["old_train"], [], collate, LoopSettings(**{**PRETRAIN.__dict__,
                                                                "seed": seed}))
    _, acc = evaluate(model, data["old_test"], collate, PRETRAIN, torch.device("cpu"))
    return model.vit.state_dict(), acc


def adapter_model(method: str, state: dict, seed: int) -> tuple[nn.Module, int]:
    """The pretrained ViT with a new head (same init for every method of a seed) and the
    method's trainable parts; and its number of trainable parameters."""
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(**VIT))
    vit.load_state_dict(state)
    torch.manual_seed(10_000 + seed)
    vit.classifier.reset_parameters()
    head = ("classifier",)
    if method in ("nora", "nora++"):
        nm = NoraModel.build(vit, NORA, LORA if method == "nora++" else None, head=head,
                             seed=seed)
        return Images(nm), nm.num_trainable()
    vit.requires_grad_(method == "full")
    if method.startswith("lora"):
        lora = LORA if method == "lora" else LORA_R1
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            add_lora(vit, list(lora.targets), lora.rank, lora.alpha)
    vit.classifier.requires_grad_(True)
    model = Images(vit)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt(method: str, state: dict, train: list, test: list, lr: float,
          seed: int) -> tuple[float, int, float]:
    """(test accuracy, trainable parameters, seconds) of one method."""
    model, n = adapter_model(method, state, seed)
    s = LoopSettings(lr=lr, epochs=ADAPT_EPOCHS, batch_size=BATCH, bf16=False, progress=False,
                     seed=seed)
    t0 = time.perf_counter()
    fit(model, train, [], collate, s)
    seconds = time.perf_counter() - t0
    _, acc = evaluate(model, test, collate, s, torch.device("cpu"))
    return acc, n, seconds


def select_lrs(methods: list[str], log) -> tuple[dict[str, float], dict[str, dict]]:
    """Each method's lr from LR_GRID by accuracy on a validation third of seed 0's 5-9 train
    split (trained on the other two thirds); and every grid point's accuracy."""
    data = digits(0)
    state, _ = pretrain(data, 0)
    n_val = len(data["new_train"]) // 3
    val, train = data["new_train"][:n_val], data["new_train"][n_val:]
    picked, grid = {}, {}
    for m in methods:
        scores = {lr: adapt(m, state, train, val, lr, 0)[0] for lr in LR_GRID[m]}
        picked[m] = max(scores, key=lambda lr: (scores[lr], -lr))
        grid[m] = {str(lr): round(acc, 4) for lr, acc in scores.items()}
        log(f"lr select {m:7s} {grid[m]} -> {picked[m]}")
    return picked, grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--select", action="store_true", help="pick each method's lr first (slow)")
    p.add_argument("--out", default=str(RESULTS / "digits-adapt"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]  # other jobs on the machine slow the wall clock

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    lrs, grid = select_lrs(a.methods, log) if a.select else (dict(DEFAULT_LR), None)
    t_select = time.perf_counter() - t_start
    runs = []  # {"seed", "method", "accuracy", "trainable", "seconds", "lr"}
    pre = []
    for seed in a.seeds:
        data = digits(seed)
        state, acc0 = pretrain(data, seed)
        pre.append(acc0)
        log(f"seed {seed}: pretrained on 0-4, test accuracy {acc0:.4f}")
        for m in a.methods:
            acc, n, sec = adapt(m, state, data["new_train"], data["new_test"], lrs[m], seed)
            runs.append({"seed": seed, "method": m, "accuracy": acc, "trainable": n,
                         "seconds": round(sec, 2), "lr": lrs[m]})
            log(f"seed {seed}: {m:7s} accuracy {acc:.4f}  trainable {n:,}  {sec:.1f} s")
    times = {"lr_selection": round(t_select, 1),
             "seeds": round(time.perf_counter() - t_start - t_select, 1),
             "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
             "cpu_cores": os.cpu_count()}
    args = sys.argv[1:] if argv is None else argv
    write(a, args, runs, pre, lrs, grid, times, log)
    return 0


def write(a, args: list[str], runs: list[dict], pre: list[float], lrs: dict,
          grid: dict | None, times: dict,
          log) -> None:
    import sklearn
    import transformers
    from transformers import ViTConfig, ViTForImageClassification

    rows, table = [], []
    full = sum(p.numel() for p in ViTForImageClassification(ViTConfig(**VIT)).parameters())
    for m in a.methods:
        accs = [r["accuracy"] for r in runs if r["method"] == m]
        n = next(r["trainable"] for r in runs if r["method"] == m)
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows += [{"name": f"{m}/accuracy_mean", "value": round(mean, 4), "unit": "fraction"},
                 {"name": f"{m}/accuracy_std", "value": round(std, 4), "unit": "fraction"},
                 {"name": f"{m}/trainable_parameters", "value": n, "unit": "parameters"}]
        table.append((m, mean, std, n, lrs[m]))
    doc = {
        "device": f"CPU ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} torch threads)",
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "scikit-learn": sklearn.__version__},
        "command": " ".join(["python", "benchmarks/digits_adapt.py", *args]),
        "rows": rows,
        "seeds": a.seeds, "runs": runs, "pretrain_accuracy_0_4": pre, "lr": lrs,
        "lr_selection": grid, "seconds": times,
        "setup": {"vit": VIT, "pretrain": {"epochs": PRETRAIN.epochs, "lr": PRETRAIN.lr,
                                           "batch_size": PRETRAIN.batch_size},
                  "adapt": {"epochs": ADAPT_EPOCHS, "batch_size": BATCH, "schedule": "cosine",
                            "optimizer": "adamw"},
                  "lora": LORA.__dict__, "nora": NORA.__dict__,
                  "data": "sklearn.datasets.load_digits, per half stratified 60/40 split "
                          "(random_state = seed)"},
    }
    total = times["lr_selection"] + times["seeds"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Digits 0-4 -> 5-9: adapting a small pretrained ViT",
        "",
        f"{doc['date']}, {doc['device']}, torch {torch.__version__}, "
        f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}). Command: `{doc['command']}`: "
        f"{total / 60:.1f} min in all, of which the seeds {times['seeds'] / 60:.1f} min and "
        f"the lr selection {times['lr_selection'] / 60:.1f} min (wall clock; 1-minute load "
        f"average {times['load_average_start']:.1f} at the start and "
        f"{times['load_average_end']:.1f} at the end on {times['cpu_cores']} cores; without "
        "`--select` only the seeds part runs).",
        "",
        "Real data: scikit-learn's `digits` (8x8 handwritten digits). A ViT (4 layers, width 64, "
        "GELU MLPs) is pretrained on digits 0-4 "
        f"(test accuracy {statistics.mean(pre):.4f} mean), then adapted to 5-9 with a new "
        f"5-class head in every method: {ADAPT_EPOCHS} epochs, batch {BATCH}, AdamW, cosine "
        "schedule, same head init per seed; learning rate per method (column lr) "
        + ("picked in this run" if a.select else "as picked by `--select`")
        + " on a validation part of seed 0's 5-9 train split. Accuracy on the 5-9 test split "
        "(40%, ~360 images).",
        "",
        "| method | test accuracy (mean ± std) | trainable parameters | % of full | lr |",
        "|---|---|---|---|---|",
    ]
    for m, mean, std, n, lr in table:
        lines.append(f"| {m} | {mean:.4f} ± {std:.4f} | {n:,} | {100 * n / full:.2f}% "
                     f"| {lr:g} |")
    lines += ["", "Trainable parameters include the new head (325) in every method. NoRA: "
              "4 MLP activation sites x (8 groups, rank 3) = 312 coefficients' factors; "
              "LoRA: rank 4 (lora-r1: rank 1) on query and value of every layer.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())

"""`nora-train`: train a NoRA / NoRA++ adapter from JSONL data (defaults from TrainConfig,
NoraSettings, LoraSettings and LoopSettings)."""

from __future__ import annotations

import argparse
import sys

from nora_runtime.rational import MODES
from nora_runtime.training.loop import OPTIMIZERS, SCHEDULES, LoopSettings
from nora_runtime.training.nora import LoraSettings, NoraSettings
from nora_runtime.training.trainer import TASKS, TrainConfig, train


def parse_layers(text: str) -> tuple[int, ...]:
    """"0-3,6" -> (0, 1, 2, 3, 6)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out += range(int(lo), int(hi or lo) + 1)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"layers must look like 0-3,6; got {text!r}") from e
    return tuple(sorted(set(out)))


def build_parser() -> argparse.ArgumentParser:
    T, N, R, L = TrainConfig, NoraSettings(), LoraSettings(targets=()), LoopSettings()
    p = argparse.ArgumentParser(
        prog="nora-train", description="Train a NoRA (activation) adapter, or NoRA++ (plus LoRA "
        "on linear layers), on JSONL data: {prompt, completion}, {messages}, {text} or "
        "{text, label}.")
    p.add_argument("data", help="training data, JSONL")
    p.add_argument("--model", default=None, help="base checkpoint directory or hub id "
                   "(default: the built-in demo model)")
    p.add_argument("--out", default=T.out, help="output directory (default %(default)s)")
    p.add_argument("--task", choices=TASKS, default=T.task)
    p.add_argument("--eval-data", default=None, help="eval JSONL (default: hold out "
                   "--eval-fraction of the data)")
    p.add_argument("--eval-fraction", type=float, default=T.eval_fraction)
    p.add_argument("--max-length", type=int, default=T.max_length)
    p.add_argument("--no-train-head", dest="train_head", action="store_false",
                   help="classification: keep the model's head frozen")
    p.add_argument("--device", default=T.device)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=T.dtype)
    g = p.add_argument_group("NoRA")
    g.add_argument("--groups", type=int, default=N.groups)
    g.add_argument("--group-extend", type=int, default=N.group_extend)
    g.add_argument("--rank", type=int, default=N.rank)
    g.add_argument("--alpha", type=float, default=N.alpha)
    g.add_argument("--layers", type=parse_layers, default=None,
                   help="activation sites to adapt, e.g. 0-3,6 (default: all)")
    g.add_argument("--mode", choices=MODES, default=N.mode)
    g = p.add_argument_group("NoRA++ (LoRA on linear layers)")
    g.add_argument("--lora", default="", help="comma-separated glob patterns of linear "
                   "modules, e.g. q_proj,v_proj (default: none, plain NoRA)")
    g.add_argument("--lora-rank", type=int, default=R.rank)
    g.add_argument("--lora-alpha", type=float, default=R.alpha)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=L.lr)
    g.add_argument("--weight-decay", type=float, default=L.weight_decay)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=L.optimizer)
    g.add_argument("--schedule", choices=SCHEDULES, default=L.schedule)
    g.add_argument("--warmup-steps", type=int, default=L.warmup_steps)
    g.add_argument("--epochs", type=int, default=L.epochs)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=L.batch_size)
    g.add_argument("--grad-accum", type=int, default=L.grad_accum)
    g.add_argument("--max-grad-norm", type=float, default=L.max_grad_norm,
                   help="clip gradients to this norm (0: no clipping)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="no bfloat16 autocast on GPU")
    g.add_argument("--seed", type=int, default=L.seed)
    g = p.add_argument_group("eval, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=L.eval_every)
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many evals without a better eval loss")
    g.add_argument("--min-delta", type=float, default=L.min_delta)
    g.add_argument("--save-every", type=int, default=None,
                   help="write OUT/checkpoint.pt every N steps")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="no loss.png")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    lora = None
    if a.lora:
        lora = LoraSettings(targets=tuple(t.strip() for t in a.lora.split(",") if t.strip()),
                            rank=a.lora_rank, alpha=a.lora_alpha)
    return TrainConfig(
        data=a.data, out=a.out, model=a.model, task=a.task, eval_data=a.eval_data,
        eval_fraction=a.eval_fraction, max_length=a.max_length, train_head=a.train_head,
        device=a.device, dtype=a.dtype, plot=a.plot, resume=a.resume,
        nora=NoraSettings(groups=a.groups, group_extend=a.group_extend, rank=a.rank,
                          alpha=a.alpha, layers=a.layers, mode=a.mode),
        lora=lora,
        loop=LoopSettings(lr=a.lr, weight_decay=a.weight_decay, optimizer=a.optimizer,
                          schedule=a.schedule, warmup_steps=a.warmup_steps, epochs=a.epochs,
                          max_steps=a.max_steps, batch_size=a.batch_size,
                          grad_accum=a.grad_accum, max_grad_norm=a.max_grad_norm or None,
                          eval_every=a.eval_every, patience=a.patience,
                          min_delta=a.min_delta, save_every=a.save_every, bf16=a.bf16,
                          seed=a.seed, progress=a.progress))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"nora-train: {e}", file=sys.stderr)
        return 2
    r = train(cfg)
    h = r.history
    best = "" if h.best_eval is None else f", best eval loss {h.best_eval:.4f} at step " \
                                          f"{h.best_step}"
    stop = " (early stop)" if h.stopped_early else ""
    print(f"wrote {r.adapter}: {r.trainable:,} trainable parameters "
          f"({100 * r.trainable / r.base_parameters:.3f}% of {r.base_parameters:,}), "
          f"{h.steps} steps in {h.seconds:.1f} s{stop}{best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

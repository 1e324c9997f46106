"""`nora-train`: train a NoRA / NoRA++ adapter from JSONL data (defaults from TrainConfig,
NoraSettings, LoraSettings and LoopSettings)."""

from __future__ import annotations

import argparse
import sys

from nora_runtime.checkpoint import DEFAULT_MODEL_NAME
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
        "{text, label}. The defaults train a NoRA adapter on the default model "
        f"({DEFAULT_MODEL_NAME}) in residual mode.")
    d = " (default: %(default)s)"
    p.add_argument("data", help="training data, JSONL")
    p.add_argument("--model", default=None, help="base checkpoint directory, hub id or .gguf "
                   f"file (default: the default model, {DEFAULT_MODEL_NAME})")
    p.add_argument("--out", default=T.out, help="output directory" + d)
    p.add_argument("--task", choices=TASKS, default=T.task,
                   help="auto: classification for {text, label} data, else causal_lm" + d)
    p.add_argument("--eval-data", default=None, help="eval JSONL (default: hold out "
                   "--eval-fraction of the data)")
    p.add_argument("--eval-fraction", type=float, default=T.eval_fraction,
                   help="share of the data held out for eval when there is no --eval-data; "
                   "0: no eval" + d)
    p.add_argument("--max-length", type=int, default=T.max_length,
                   help="tokens per example (longer ones are cut on the right)" + d)
    p.add_argument("--no-train-head", dest="train_head", action="store_false",
                   help="classification: keep the model's head frozen (default: train it)")
    p.add_argument("--device", default=T.device, help="auto: cuda if there is one, else "
                   "cpu" + d)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=T.dtype,
                   help="base weights" + d)
    g = p.add_argument_group("NoRA")
    g.add_argument("--groups", type=int, default=N.groups,
                   help="rational groups G of the base coefficients" + d)
    g.add_argument("--group-extend", type=int, default=N.group_extend,
                   help="the adapter has G x this many groups" + d)
    g.add_argument("--rank", type=int, default=N.rank, help="rank r of the updates" + d)
    g.add_argument("--alpha", type=float, default=N.alpha, help="scale alpha / r" + d)
    g.add_argument("--layers", type=parse_layers, default=None,
                   help="activation sites to adapt, e.g. 0-3,6 (default: all)")
    g.add_argument("--mode", choices=MODES, default=N.mode,
                   help="residual: the base model stays exact, the adapter adds a bounded "
                   "change; replace: the rational is the activation" + d)
    g = p.add_argument_group("NoRA++ (LoRA on linear layers)")
    g.add_argument("--lora", default="", help="comma-separated glob patterns of linear "
                   "modules, e.g. q_proj,v_proj (default: none, plain NoRA)")
    g.add_argument("--lora-rank", type=int, default=R.rank, help="LoRA rank" + d)
    g.add_argument("--lora-alpha", type=float, default=R.alpha, help="LoRA alpha" + d)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=L.lr, help="peak learning rate" + d)
    g.add_argument("--weight-decay", type=float, default=L.weight_decay, help="weight decay" + d)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=L.optimizer, help="optimizer" + d)
    g.add_argument("--schedule", choices=SCHEDULES, default=L.schedule,
                   help="learning rate after warmup" + d)
    g.add_argument("--warmup-steps", type=int, default=L.warmup_steps,
                   help="linear warmup steps" + d)
    g.add_argument("--epochs", type=int, default=L.epochs, help="passes over the data" + d)
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: epochs' worth)")
    g.add_argument("--batch-size", type=int, default=L.batch_size,
                   help="examples per micro-batch" + d)
    g.add_argument("--grad-accum", type=int, default=L.grad_accum,
                   help="micro-batches per optimizer step" + d)
    g.add_argument("--max-grad-norm", type=float, default=L.max_grad_norm,
                   help="clip gradients to this norm; 0: no clipping" + d)
    g.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="no bfloat16 autocast on GPU (default: autocast on GPU; the CPU runs "
                   "float32)")
    g.add_argument("--seed", type=int, default=L.seed,
                   help="adapter init, data split and order" + d)
    g = p.add_argument_group("eval, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=L.eval_every,
                   help="optimizer steps between evals (also one at step 0 and one at the "
                   "end)" + d)
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many evals without a better eval loss (default: "
                   "no early stopping)")
    g.add_argument("--min-delta", type=float, default=L.min_delta,
                   help="an eval loss must beat the best by more than this" + d)
    g.add_argument("--save-every", type=int, default=None,
                   help="write OUT/checkpoint.pt every N steps (default: no checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--no-plot", dest="plot", action="store_false",
                   help="no loss.png (default: write it)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: show it)")
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
    r = train(cfg, log=_logger(args.progress))
    h = r.history
    best = ""
    if h.best_eval is not None:
        base = f" (step 0: {h.eval[0][1]:.4f})" if h.eval and h.eval[0][0] == 0 else ""
        best = f", best eval loss {h.best_eval:.4f} at step {h.best_step}{base}"
    stop = " (early stop)" if h.stopped_early else ""
    print(f"wrote {r.adapter}: {r.trainable:,} trainable parameters "
          f"({100 * r.trainable / r.base_parameters:.3f}% of {r.base_parameters:,}), "
          f"{h.steps} steps in {h.seconds:.1f} s{stop}{best}")
    return 0


def _logger(progress: bool):
    """print, or tqdm.write while a progress bar is drawn (so that lines do not break it)."""
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the loop says that the bar needs tqdm
            return print
        return tqdm.write
    return print


if __name__ == "__main__":
    sys.exit(main())

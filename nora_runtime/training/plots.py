"""PNG plots (matplotlib, imported lazily: it is an optional dependency, `nora[train]`)."""

from __future__ import annotations

from pathlib import Path

import torch

from nora_runtime.rational import base_activation, rational


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'nora[train]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(train: list[tuple[int, float]], evals: list[tuple[int, float, float | None]],
               path: str | Path, title: str = "") -> None:
    """Train loss per optimizer step (and its running mean) with the eval losses."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        k = len(losses) // 50  # a running mean over ~2% of the run, when that is > 1 step
        ax.plot(steps, losses, color="tab:blue", alpha=0.3 if k > 1 else 1.0, lw=1,
                label="train")
        if k > 1:
            avg = torch.tensor(losses).unfold(0, k, 1).mean(1).tolist()
            ax.plot(steps[k - 1:], avg, color="tab:blue", lw=2, label=f"train (mean of {k})")
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:orange",
                label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def activation_curves(coefs: torch.Tensor, base: torch.Tensor, act: str, sites: list[str],
                      path: str | Path, x_range: float = 4.0) -> None:
    """One panel per site: each group's adapted R(x) (coefs [L, G, 10]), the base rational
    (base [L, Gb, 10], group 0) and the exact base activation, on [-x_range, x_range]."""
    plt = pyplot()
    L, G = coefs.shape[:2]
    cols = min(4, L)
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3 * rows), squeeze=False)
    x = torch.linspace(-x_range, x_range, 401, dtype=torch.float64)
    cmap = plt.get_cmap("viridis")
    for l in range(L):
        ax = axes[l // cols][l % cols]
        ax.plot(x, base_activation(act, x), color="black", lw=2.5, alpha=0.35,
                label=f"{act} (exact)")
        ax.plot(x, rational(x, base[l, 0].double()), "k--", lw=1, label="base rational")
        for g in range(G):
            ax.plot(x, rational(x, coefs[l, g].double()), color=cmap(g / max(1, G - 1)), lw=1,
                    label="adapted, per group" if g == 0 else None)
        ax.set_title(sites[l] if len(sites[l]) <= 40 else "..." + sites[l][-37:], fontsize=8)
        ax.grid(alpha=0.3)
        if l == 0:
            ax.legend(fontsize=7)
    for l in range(L, rows * cols):
        axes[l // cols][l % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

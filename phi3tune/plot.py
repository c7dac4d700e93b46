"""loss.png: train and eval loss against step, when matplotlib (the "plot" extra) is installed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("phi3tune")


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the loss curve; without matplotlib, say so (once per call site) and return None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no %s was written (pip install 'phi3tune[plot]')", path.name)
        return None
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

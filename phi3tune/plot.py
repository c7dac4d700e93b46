"""loss.png: train and eval loss against step, when matplotlib (the "plot" extra) is installed."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from .files import LOSS_PLOT_NAME

log = logging.getLogger("phi3tune")


@functools.cache
def say_no_matplotlib() -> None:
    """The warning, once per process (cached; ``say_no_matplotlib.cache_clear()`` lets it speak again)."""
    log.warning("matplotlib is not installed, so no %s is written for this or later runs "
                "(pip install 'phi3tune[plot]')", LOSS_PLOT_NAME)


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the loss curve; without matplotlib return None, saying so once per process (not once per run).

    Uses matplotlib's object API (no pyplot), so a notebook's plotting backend is left as it was.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        say_no_matplotlib()
        return None
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
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
    return path

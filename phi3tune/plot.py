"""loss.png: the run's loss and learning rate against step, when matplotlib (the "plot" extra) is installed.

Two panels sharing the step axis: the loss on a log scale (a fall from 10 to 0.1 stays readable, where a linear
axis shows a flat line at zero), train and eval (eval from step 0: the held-out loss before training); and
the learning rate. The title names the run and its final numbers.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import LOSS_PLOT_NAME

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("phi3tune")


@functools.cache
def say_no_matplotlib() -> None:
    """The warning, once per process (cached; ``say_no_matplotlib.cache_clear()`` lets it speak again)."""
    log.warning("matplotlib is not installed, so no %s is written for this or later runs "
                "(pip install 'phi3tune[plot]')", LOSS_PLOT_NAME)


def _points(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if h.get(key) is not None]


def summary(history: list[dict[str, Any]]) -> str:
    """The final numbers: ``step 100: train loss 0.1234, eval loss 0.2345 (perplexity 1.26)``."""
    train, evals = _points(history, "loss"), _points(history, "eval_loss")
    steps = max((h["step"] for h in history), default=0)
    parts = [f"train loss {train[-1][1]:.4f}"] if train else []
    if evals:
        ppl = [h["eval_perplexity"] for h in history if "eval_perplexity" in h]
        parts.append(f"eval loss {evals[-1][1]:.4f}" + (f" (perplexity {ppl[-1]:.2f})" if ppl else ""))
    return f"step {steps}: " + ", ".join(parts)


def _plain_log_formatter() -> Any:
    """Log-axis tick labels as plain numbers (0.3, 4.4; not 3e-01, 4.4 x 10^0), on the ticks matplotlib's
    LogFormatter would label (minor ticks too when the axis spans little more than a decade)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))


def loss_figure(history: list[dict[str, Any]], name: str = "") -> Figure | None:
    """The loss.png figure of a run's ``history`` (``RunResult.history``, or metrics.jsonl's lines); ``name``
    heads the title. None when the history holds no loss. Raises ImportError without matplotlib.

    Uses matplotlib's object API (no pyplot), so a notebook's plotting backend is left as it was."""
    from matplotlib.figure import Figure

    train, evals, lrs = _points(history, "loss"), _points(history, "eval_loss"), _points(history, "lr")
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 5), dpi=100)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if train:
        loss_ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        loss_ax.plot(*zip(*evals), label="eval loss", marker="o")
    loss_ax.set_yscale("log")
    for axis_formatter in (loss_ax.yaxis.set_major_formatter, loss_ax.yaxis.set_minor_formatter):
        axis_formatter(_plain_log_formatter())
    loss_ax.set_ylabel("loss (log scale)")
    loss_ax.grid(alpha=0.3, which="both")
    loss_ax.legend()
    if lrs:
        lr_ax.plot(*zip(*lrs), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.grid(alpha=0.3)
    fig.suptitle(f"{name}\n{summary(history)}" if name else summary(history), fontsize=10)
    fig.tight_layout()
    return fig


def plot_history(history: list[dict[str, Any]], path: Path, name: str | None = None) -> Path | None:
    """Write the loss curve to ``path`` (``name`` heads the title; default: the run directory's name). Without
    matplotlib return None, saying so once per process (not once per run)."""
    try:
        fig = loss_figure(history, Path(path).resolve().parent.name if name is None else name)
    except ImportError:
        say_no_matplotlib()
        return None
    if fig is None:
        return None
    fig.savefig(path)
    return path

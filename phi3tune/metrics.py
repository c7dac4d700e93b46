"""Where a run's numbers go: ``RunResult.history``, ``output_dir/metrics.jsonl``, the trackers, the progress
bar (or, without one, a progress line per log step) and the step callbacks. The loop hands over each step's
result and says when a log line is due. Every eval's loss and perplexity is also said as a line on the
``phi3tune`` logger, so it reaches the console while training, bar or not (logs.py says who shows it).

A log line averages the loss over every trained token since the previous line (the *window*), so it weighs
tokens the same way a step does; a checkpoint saves the window, and a resumed run's next line averages the
same steps as an unbroken run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tracking
from .files import METRICS_NAME

log = logging.getLogger("phi3tune")
StepCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, summed over its micro-batches and every rank (``batch_tokens``: this rank's)."""

    loss: float | None  # mean over the step's trained tokens; None when it had none
    grad_norm: float  # before clipping
    real_tokens: int  # non-pad tokens
    trained_tokens: int  # tokens with a label
    batch_tokens: int  # tokens of the micro-batches as laid out, pads included
    # host seconds: queuing the step's passes (forward, backward, clipping), then waiting for the device to read
    # its loss and gradient norm (read late: once the next step is queued). A wait near zero means the host, not the
    # device, set the step's pace
    queue_s: float = 0.0
    wait_s: float = 0.0
    # CUDA: an event recorded after the step's update (None elsewhere). ``a.elapsed_time(b)`` of two steps' events
    # is the device's milliseconds between them, including any time it waited for the host, with no wait here
    done_event: Any = None


@dataclass
class _Window:
    """Loss sum and tokens since the last log line; ``real`` and ``t0`` give its tokens/s."""

    loss_sum: float = 0.0
    tokens: int = 0
    real: int = 0
    t0: float = field(default_factory=time.perf_counter)


class Metrics:
    """History, metrics.jsonl (main process), trackers, progress bar and callbacks of one run."""

    def __init__(self, accelerator: Any, output_dir: Path, training_config: dict[str, Any], progress_bar: bool,
                 callbacks: list[StepCallback] | None = None) -> None:
        self.accelerator, self.output_dir = accelerator, output_dir
        self.show_bar = progress_bar and accelerator.is_main_process
        self.callbacks = list(callbacks or [])  # called after every optimizer step with that step's numbers
        self.history: list[dict[str, Any]] = []
        self.window = _Window()
        self.bar: Any = None
        self.real_total, self.started, self.start_step, self.total_steps = 0, 0.0, 0, 0
        tracking.start(accelerator, output_dir, {"training": training_config})

    # ---------------------------------------------------------------- checkpoint state
    def state(self) -> dict[str, Any]:
        return {"history": self.history,
                "log_window": {"loss_sum": self.window.loss_sum, "tokens": self.window.tokens}}

    def restore(self, state: dict[str, Any]) -> None:
        """The history and window of a checkpoint; metrics.jsonl is rewritten to that history (no duplicates)."""
        self.history = list(state["history"])
        saved = state.get("log_window", {})
        self.window = _Window(saved.get("loss_sum", 0.0), saved.get("tokens", 0))
        if self.accelerator.is_main_process:
            with open(self.output_dir / METRICS_NAME, "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)

    # ---------------------------------------------------------------- during training
    def start(self, step: int, total_steps: int) -> None:
        """Training starts (or resumes) at ``step``: the bar appears and the clocks start."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=step, desc="training", dynamic_ncols=True,
                        disable=not self.show_bar)
        # a resumed run carries on the window of the checkpoint; tokens/s counts from now
        self.window.real, self.window.t0 = 0, time.perf_counter()
        self.started, self.start_step, self.total_steps = time.perf_counter(), step, total_steps

    def step_done(self, step: int, result: StepResult, lr: float) -> None:
        self.window.loss_sum += (result.loss or 0.0) * result.trained_tokens  # a step without tokens adds nothing
        self.window.tokens += result.trained_tokens
        self.window.real += result.real_tokens
        self.real_total += result.real_tokens
        self.bar.update(1)
        if self.callbacks:
            event = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
                     "real_tokens": result.real_tokens, "trained_tokens": result.trained_tokens,
                     "batch_tokens": result.batch_tokens, "queue_s": result.queue_s, "wait_s": result.wait_s,
                     "done_event": result.done_event}
            for fn in self.callbacks:
                fn(event)

    def log_train(self, step: int, epoch: float, lr: float, grad_norm: float) -> None:
        """A log line: the window's mean loss and tokens/s; the window starts over."""
        now, w = time.perf_counter(), self.window
        loss: dict[str, Any] = {"loss": w.loss_sum / w.tokens} if w.tokens else \
            {"note": "no trained tokens in these steps (every label masked): no loss"}
        entry = {"step": step, "epoch": round(epoch, 4), **loss, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": w.real / max(1e-9, now - w.t0), "trained_tokens": w.tokens}
        self.record(entry)
        if w.tokens:
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}")
        if not self.show_bar and self.accelerator.is_main_process:  # a batch job's log shows progress
            self.say(progress_line(entry, self.total_steps, self.eta_s(step)))
        self.window = _Window(t0=now)

    def log_eval(self, step: int, loss: float) -> dict[str, float]:
        entry = {"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        self.record(entry)
        if self.accelerator.is_main_process:
            self.say(f"step {step}: eval loss {loss:.4f}, perplexity {entry['eval_perplexity']:.2f}")
        return {"eval_loss": loss, "eval_perplexity": entry["eval_perplexity"]}

    def eta_s(self, step: int) -> float | None:
        """Seconds left at this run's pace so far (None before a step has been timed)."""
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total_steps - step) if done > 0 else None

    def say(self, line: str) -> None:
        """An INFO line on the phi3tune logger; above a live progress bar, without tearing it."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        live = self.bar is not None and not self.bar.disable
        with logging_redirect_tqdm([log]) if live else nullcontext():
            log.info(line)

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(entry) + "\n")
        tracking.log_entry(self.accelerator, entry)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ---------------------------------------------------------------- the end
    def finish(self, step: int, final: dict[str, Any]) -> dict[str, Any]:
        """Close the trackers; the run's final numbers (``final``: the last eval, if any)."""
        tracking.finish(self.accelerator)
        elapsed = time.perf_counter() - self.started
        train_losses = [h["loss"] for h in self.history if "loss" in h]
        return {**final, "steps": step, "runtime_s": round(elapsed, 3),
                "train_loss": train_losses[-1] if train_losses else None,
                "tokens_per_s": self.real_total / elapsed if elapsed and step > self.start_step else None}


def progress_line(entry: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    """``step 20/100  loss 1.2345  lr 2.00e-04  812 tokens/s  ETA 0:04:10``: a log step, for logs without a bar."""
    eta = "?" if eta_s is None else time.strftime("%H:%M:%S", time.gmtime(eta_s)) if eta_s < 86_400 \
        else f"{eta_s / 86_400:.1f} days"
    loss = f"loss {entry['loss']:.4f}" if "loss" in entry else "no trained tokens"
    return (f"step {entry['step']}/{total_steps}  {loss}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_s']:,.0f} tokens/s  ETA {eta}")

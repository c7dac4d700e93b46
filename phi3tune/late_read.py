"""A step's loss and gradient norm off the device: read at once, or one step late.

Reading them waits for the device. The host queues a step's kernels ahead of the device (20-45 ms on the 16 GiB
quickstart, session 18's ``wait_s``), and a read at the step's end throws that lead away: the device then idles
while the host queues the next step's first kernels. Read one step late (``RunPlan.read_late``), the two numbers are
copied to pinned host memory behind the step's kernels and read once the next step is queued, by when the device is
past them; the host never waits at a step's end. CUDA plans do so (knobs.read_late_wanted): on the 16 GiB quickstart,
+4.1% and +7.1% tokens/s in two ABBA calls (session 19, docs/performance.md).

What that changes: the optimizer steps before its step's numbers are checked, so a non-finite loss or gradient
norm is found one step later, when its update (and the next step's) has reached the adapter in memory. Nothing is
written in between: the loop reads a pending step before any eval, checkpoint or final save (``Trainer._due``), so
every checkpoint is still of steps whose numbers were read and finite. Step callbacks get a step's numbers once the
next step is queued.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoints as ckpt
from .batching import Position
from .errors import TrainingError
from .metrics import StepResult

log = logging.getLogger("phi3tune")


@dataclass
class Pending:
    """A step whose passes and update are queued; ``numbers`` is [loss sum, gradient norm]: on the device (read at
    once) or pinned host memory that ``copied`` says is filled (read late)."""

    pos: Position
    lr: float
    numbers: torch.Tensor
    copied: Any  # torch.cuda.Event, or None: nothing to wait for but the read itself
    trained: int  # the step's trained tokens, all ranks (the loss sum's divisor)
    real: int
    batch_tokens: int
    queue_s: float
    done: Any = None  # torch.cuda.Event after the step's update (CUDA): the device's clock at the step's end
    result: StepResult | None = None


def hold(numbers: torch.Tensor, late: bool) -> tuple[torch.Tensor, Any]:
    """``numbers`` as a Pending holds them: read late on CUDA, a pinned host copy queued behind the step and the
    event that marks it filled; else the tensor itself (the read waits for it)."""
    if not late or numbers.device.type != "cuda":
        return numbers, None
    host = torch.empty(numbers.shape, dtype=numbers.dtype, pin_memory=True)
    host.copy_(numbers, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def step_done_event(device: torch.device) -> Any:
    """An event after everything queued so far on ``device`` (CUDA; None elsewhere): two steps' events give the
    device's time between them without waiting for it (``torch.cuda.Event.elapsed_time``)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def read(p: Pending, output_dir: Path, precision: str) -> StepResult:
    """The step's numbers (waiting for them if they are not there yet); a TrainingError if non-finite. Read at
    once, this is before the step's update and its ``done`` event: the loop adds that event when it hands the
    result on."""
    if p.result is not None:
        return p.result
    started = time.perf_counter()
    if p.copied is not None:
        p.copied.synchronize()
    summed, grad_norm = p.numbers.tolist()
    waited = time.perf_counter() - started
    loss = summed / p.trained if p.trained else None  # None: no token of the step has a label
    if loss is None:
        log.warning("step %d: no trained tokens (every label of its micro-batches is masked, e.g. answers cut "
                    "off by data.max_seq_length); no loss is logged for it", p.pos.step)
    if not math.isfinite(loss or 0.0) or (not math.isfinite(grad_norm) and precision != "fp16"):
        last = ckpt.list_checkpoints(output_dir)
        raise TrainingError(
            f"step {p.pos.step}: non-finite {'gradient norm' if math.isfinite(loss or 0.0) else 'loss'} "
            f"(loss={loss}, grad_norm={grad_norm}); last good checkpoint: "
            f"{str(last[-1]) if last else 'none'}. Lower training.learning_rate or use precision=\"bf16\""
        )
    p.result = StepResult(loss, grad_norm, p.real, p.trained, p.batch_tokens, queue_s=p.queue_s, wait_s=waited)
    return p.result

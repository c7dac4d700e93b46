"""Profile a peer's recipe (Unsloth's) over a few optimizer steps: how busy its GPU is, and on what.

    python as_card.py 16 examples/benchmarks/peer_profile.py OUT.txt START STEPS SCRIPT.py [script args...]
    (cards.sh's uprof@ runs: Unsloth's fast path, as its u@ runs take it)

Runs SCRIPT in this process (as peer_peak.py does) with torch's global optimizer-step hook
(``register_optimizer_step_post_hook``, which every ``torch.optim.Optimizer`` step calls, the peer's paged AdamW
included): the profiler starts when step START ends and stops when step START + STEPS ends, the device synchronized
at both, so it holds whole steps. It records GPU kernels only (the host near its own speed, as profile_steps.py
--light does for ours) and writes to OUT.txt: the steps' wall time against their kernel time (the GPU's busy
share: a step that keeps the GPU busy is the GPU's pace, one that does not is the host's), the kernel time by kind
(kernel_kinds.py) and the 30 costliest kernels. With the recipe's ``--model DIR`` and ``--out LINES`` (its
measured real tokens and steps), the matmuls' TFLOP/s too. Without CUDA it profiles the host's ops (a rehearsal).
The profiler adds to each launch's host cost, so read the busy time a step against the median step of an unprofiled
run in the same call (a u@ run): where they match, the GPU sets the pace.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_kinds import busy_us, device_kernels, kinds_report, matmul_flops_per_token


class StepWindow:
    """Starts ``profiler`` when optimizer step ``start`` ends and stops it when step ``start + steps`` ends (hooked
    on every optimizer's steps); ``wall`` is the time between, the device synchronized at both ends."""

    def __init__(self, profiler: Any, start: int, steps: int) -> None:
        self.profiler, self.start, self.steps = profiler, start, steps
        self.seen, self.wall, self._t0 = 0, 0.0, 0.0

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.start:
            _sync()
            self.profiler.start()
            self._t0 = time.perf_counter()
        elif self.seen == self.start + self.steps:
            _sync()
            self.wall = time.perf_counter() - self._t0
            self.profiler.stop()

    @property
    def done(self) -> bool:
        return self.seen >= self.start + self.steps

    def close(self) -> None:
        """Stop a profiler the script's end left running (it ran fewer steps than the window)."""
        if self.start <= self.seen < self.start + self.steps:
            self.profiler.stop()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernels_of(profiler: Any) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of each device kernel the profiler recorded (the host's top-level ops where none ran
    on a GPU: the CPU rehearsal)."""
    from torch.autograd import DeviceType

    events = profiler.events()
    return device_kernels(events) or [(e.name, e.time_range.start, e.time_range.end) for e in events
                                      if e.device_type == DeviceType.CPU and not e.is_user_annotation
                                      and _outermost(e)]


def _outermost(event: Any) -> bool:
    """No op encloses ``event`` (a user annotation such as a peer's step may)."""
    parent = event.cpu_parent
    while parent is not None and parent.is_user_annotation:
        parent = parent.cpu_parent
    return parent is None


def option(argv: list[str], name: str) -> str | None:
    """The value after ``name`` in a script's ``argv`` (None where it is not given)."""
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def matmul_flops(script_argv: list[str], steps: int) -> float | None:
    """The profiled steps' matmul FLOPs, from the recipe's model config (``--model``), rank (``--r``, 64) and the
    real tokens a step its result line measured (``--out``); None where any is missing."""
    model, lines = option(script_argv, "--model"), option(script_argv, "--out")
    if not model or not lines or not Path(lines).exists() or not (Path(model) / "config.json").exists():
        return None
    rows = [json.loads(row) for row in Path(lines).read_text().splitlines() if row.startswith("{")]
    if not rows or not rows[-1].get("measured_steps"):
        return None
    per_step = rows[-1]["measured_real_tokens"] / rows[-1]["measured_steps"]
    config = json.loads((Path(model) / "config.json").read_text())
    return matmul_flops_per_token(config, int(option(script_argv, "--r") or 64)) * per_step * steps


def report(kernels: list[tuple[str, float, float]], wall: float, steps: int, flops: float | None) -> str:
    """The head (wall, the kernels' busy time and share of it), the kinds and the costliest kernels."""
    busy = busy_us([(s, e) for _, s, e in kernels]) / 1e6
    timed = [(name, e - s) for name, s, e in kernels]
    totals: dict[str, list[float]] = {}
    for name, us in timed:
        totals.setdefault(name, []).append(us)
    lines = [f"{steps} steps: wall {wall:.3f} s, GPU busy {busy:.3f} s ({100 * busy / max(wall, 1e-9):.0f}%)",
             "", kinds_report(timed, steps, flops), "costliest kernels (ms in all, runs):"]
    for name, runs in sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:30]:
        lines.append(f"{sum(runs) / 1e3:9.2f} ms {len(runs):6d}  {name[:110]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit("usage: peer_profile.py OUT.txt START STEPS SCRIPT.py [script args...]")
    out, start, steps, script = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sys.argv = sys.argv[4:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    cpu, cuda = torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA
    profiler = torch.profiler.profile(activities=[cuda] if torch.cuda.is_available() else [cpu])
    window = StepWindow(profiler, start, steps)
    handle = register_optimizer_step_post_hook(window)
    code: str | int | None = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code  # kept for cards.sh, once the report is written
    finally:
        handle.remove()
        window.close()
    if not window.done:
        sys.exit(f"peer_profile: the script ran {window.seen} optimizer steps, fewer than {start} + {steps}")
    out.write_text(report(kernels_of(profiler), window.wall, steps, matmul_flops(sys.argv, steps)))
    print(f"peer_profile: {steps} steps from step {start} written to {out}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()

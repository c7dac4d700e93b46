"""Profile a few optimizer steps of a phi3tune config with torch.profiler; print the top CUDA kernels.

    python examples/benchmarks/profile_steps.py CONFIG.yaml [--set key=value ...] [--out FILE]

Under torchrun each rank writes FILE.rank<N>. Two tables: by GPU time, then by CPU time (host-side cost).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from phi3tune import FineTuner
from phi3tune.cli import apply_overrides, parse_assignment, read_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=parse_assignment)
    ap.add_argument("--start", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    ft = FineTuner.from_config(apply_overrides(read_config(a.config), a.overrides))
    ft.training(max_steps=a.start + a.steps, save_strategy="no", progress_bar=False, overwrite_output_dir=True,
                output_dir="/tmp/phi3tune-profile")
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])

    wall = [0.0]

    def on_step(event: dict) -> None:
        if event["step"] == a.start:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            prof.start()
            wall[0] = time.perf_counter()
        elif event["step"] == a.start + a.steps:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            wall[0] = time.perf_counter() - wall[0]
            prof.stop()

    ft.run(callbacks=[on_step])
    avg = prof.key_averages()
    # the GPU's busy share: kernel time over the profiled steps' wall time. Kernel time as the table's own "Self
    # CUDA time total" counts it: device events only (a CPU op's row repeats its kernels' time, and GPU-side user
    # annotations such as "Optimizer.step#..." span kernels already counted)
    from torch.autograd import DeviceType

    kernels = sum(e.self_device_time_total for e in avg
                  if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    head = (f"{a.steps} steps from step {a.start}: wall {wall[0]:.3f} s, GPU kernels {kernels:.3f} s "
            f"({100 * kernels / max(wall[0], 1e-9):.0f}% busy)\n\n")
    table = head + (avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70) + "\n\nby CPU time:\n"
             + avg.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70))
    rank = os.environ.get("RANK")  # under torchrun: one file per rank
    if a.out:
        with open(a.out if rank is None else f"{a.out}.rank{rank}", "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)


if __name__ == "__main__":
    main()

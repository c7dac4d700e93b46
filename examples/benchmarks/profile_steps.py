"""Profile a few optimizer steps of a phi3tune config with torch.profiler; print the top CUDA kernels.

    python examples/benchmarks/profile_steps.py CONFIG.yaml [--set key=value ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch
import yaml

from phi3tune import FineTuner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--start", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = yaml.safe_load(open(a.config))
    for item in a.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    ft = FineTuner.from_config(cfg).training(max_steps=a.start + a.steps, save_strategy="no",
                                             progress_bar=False, overwrite_output_dir=True,
                                             output_dir="/tmp/phi3tune-profile")
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])

    def on_step(event: dict) -> None:
        if event["step"] == a.start:
            torch.cuda.synchronize()
            prof.start()
        elif event["step"] == a.start + a.steps:
            torch.cuda.synchronize()
            prof.stop()

    ft.run(callbacks=[on_step])
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    (open(a.out, "w") if a.out else sys.stdout).write(table)


if __name__ == "__main__":
    main()

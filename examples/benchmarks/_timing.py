"""GPU time of a call, for the kernel benchmarks run as scripts from this folder (check_twins.py,
dequant_kernels.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def median_us(fn: Callable[[], Any], runs: int = 50) -> float:
    """fn's GPU time, median of ``runs`` calls (CUDA events), in microseconds."""
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(sorted(times)[runs // 2], 1)

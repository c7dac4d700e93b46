"""The machine's host, described and timed: CPU model, cores, and how long the host takes to queue one small CUDA op.

Runs of one plan differ 10-25% between machines of one kind, Unsloth's more than ours (sessions 34-37: its fast path
10,941-20,888 tokens/s on a 16 GiB card, ours 17,771-22,339). A step that the host paces (Python and kernel
launches; Unsloth's layers are not compiled whole) follows the host's speed, a step that the GPU paces does not, so
_device_setup.sh logs this line into gpu.txt beside the host link's: a slow run can then be set against its host.

    python3 examples/benchmarks/host_speed.py
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def launch_us(ops: int = 20_000, tries: int = 3) -> float:
    """The best of ``tries`` mean host times, in µs, to queue one elementwise op on a tiny CUDA tensor: what a
    launch-bound step pays per kernel. The GPU runs each in a few µs; a host that queues faster fills the launch
    queue and then reads the GPU's pace instead (a floor, not the host's time)."""
    x = torch.ones(16, device="cuda")
    for _ in range(1000):  # warm the allocator and the op's dispatch
        x.add_(1.0)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        best = min(best, (time.perf_counter() - start) / ops * 1e6)
        torch.cuda.synchronize()
    return best


def main() -> None:
    queued = round(launch_us(), 2) if torch.cuda.is_available() else None  # None: no CUDA device to queue on
    print(json.dumps({"host": {"cpu": cpu_model(), "cores": os.cpu_count(), "launch_us": queued}}))


if __name__ == "__main__":
    main()

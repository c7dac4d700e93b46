"""The machine's host link, measured: pinned host-to-device and device-to-host copies of 256 MiB, GB/s (best of 5).

A streamed base (phi3tune/streamed_base.py) copies Phi-3-mini's 1.7 GiB of packed weights in twice a pass, and
activations in host memory (offload.py) cross it too, so two machines of one kind can differ where their links do
(session 26: the same 6 GiB plan ran 13,327 and 18,153 tokens/s in two calls). _device_setup.sh logs this line
into gpu.txt beside the driver and versions. Prints a line saying so where there is no CUDA device.

    python3 examples/benchmarks/host_link.py
"""

from __future__ import annotations

import json

import torch

MIB = 2**20


def rate(src: torch.Tensor, dst: torch.Tensor, tries: int = 5) -> float:
    """The best of ``tries`` copies of ``src`` into ``dst``, in GB/s (CUDA events on the current stream)."""
    best = float("inf")
    for _ in range(tries):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return src.numel() * src.element_size() / best / 1e9


def main() -> None:
    if not torch.cuda.is_available():
        print("host link: no CUDA device")
        return
    host = torch.empty(256 * MIB, dtype=torch.uint8).pin_memory()
    device = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
    print(json.dumps({"host_link": {"h2d_gb_s": round(rate(host, device), 1),
                                    "d2h_gb_s": round(rate(device, host), 1)}}))


if __name__ == "__main__":
    main()

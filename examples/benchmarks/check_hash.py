"""The hashed LoRA dropout mask (lora_dropout.keep_mask) in wrapping int32 arithmetic against the int64 hash it
replaced: the same bits, eager and compiled, on this device; and on CUDA each compiled mask's kernel time for one
quickstart-sized input (4,864 tokens x 8,192, the down projection's; median of 50, CUDA events). One JSON line.

    python examples/benchmarks/check_hash.py [cpu]   (on the GPU: cards.sh run "hash@full")
"""

import json
import sys

import torch

from phi3tune import lora_dropout as ld


def int64_mask(x: torch.Tensor, p: float, key: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """The mask as session 9 computed it: every step in int64."""
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    return ld.mix32(ld.mix32(key ^ salt) ^ ld.mix32(index)) >= round(p * 2**32)


def median_us(fn) -> float:
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    device = torch.device("cpu" if "cpu" in sys.argv[1:] or not torch.cuda.is_available() else "cuda")
    x = torch.empty(64, 4099, device=device)
    ours, theirs = torch.compile(ld.keep_mask, dynamic=False), torch.compile(int64_mask, dynamic=False)
    checked = 0
    for key in (0, 1, 2**31 - 1, 2**31, 2**32 - 1, ld.micro_batch_key(0, 0, 3, 1)):
        for salt in (1, ld.mix32(3), 2**32 - 5):
            k, s = (torch.tensor(v, dtype=torch.int64, device=device) for v in (key, salt))
            for p in (0.05, 0.1, 0.5):
                want = int64_mask(x, p, k, s)
                for got in (ld.keep_mask(x, p, k, s), ours(x, p, k, s), theirs(x, p, k, s)):
                    assert torch.equal(got, want), (key, salt, p)
                    checked += 1
    out = {"check": "hash", "device": str(device), "equal_masks": checked}
    if device.type == "cuda":
        big = torch.empty(4864, 8192, device=device, dtype=torch.bfloat16)
        k, s = (torch.tensor(v, dtype=torch.int64, device=device) for v in (12345, ld.mix32(9)))
        out["int32_us"] = round(median_us(lambda: ours(big, 0.1, k, s)), 1)
        out["int64_us"] = round(median_us(lambda: theirs(big, 0.1, k, s)), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The hashed LoRA dropout's masks (phi3tune/lora_dropout.py) in int32 against the int64 hash they replace: the
same bits, eager and compiled, on this device, and each one's time as a compiled layer runs it (the mask applied to
an input the size of the quickstart's down_proj input at 4,864 tokens). One JSON line.

    python examples/benchmarks/dropout_hash.py [cpu]     (on the GPU: cards.sh run "hash@full")
"""

import json
import os
import sys
import time

import torch

from phi3tune import lora_dropout as ld


def dropped(x: torch.Tensor, key: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    return x * (ld.keep_mask(x, 0.1, key, salt).to(x.dtype) * (1 / 0.9))


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    x = torch.randn(4864, 8192, device=device, dtype=torch.bfloat16)
    key = torch.tensor(ld.micro_batch_key(0, 0, 3, 1), dtype=torch.int64, device=device)
    salt = torch.tensor(ld.mix32(7), dtype=torch.int64, device=device)
    out, times = {}, {}
    for width in ("int64", "int32"):
        os.environ["PHI3TUNE_DROPOUT_HASH"] = width if width == "int64" else ""
        torch._dynamo.reset()
        mask = torch.compile(ld.keep_mask)
        out[width] = (ld.keep_mask(x, 0.1, key, salt), mask(x, 0.1, key, salt))
        torch._dynamo.reset()
        compiled = torch.compile(dropped)
        for _ in range(3):
            compiled(x, key, salt)
        if device.type == "cuda":
            from _timing import median_us  # this folder's

            times[width] = median_us(lambda f=compiled: f(x, key, salt))
        else:
            start = time.perf_counter()
            for _ in range(5):
                compiled(x, key, salt)
            times[width] = round((time.perf_counter() - start) / 5 * 1e6, 1)
    same = all(torch.equal(a, b) for a, b in zip(out["int32"], out["int64"], strict=True))
    same_compiled = all(torch.equal(eager, compiled) for eager, compiled in out.values())
    print(json.dumps({"run": "dropout_hash", "device": str(device), "elements": x.numel(),
                      "same_bits": same, "compiled_as_eager": same_compiled, "us": times}))


if __name__ == "__main__":
    main()

"""The compiled 4-bit dequantization, several ways, against bitsandbytes' own kernel: Phi-3-mini's largest 4-bit
weight (gate_up_proj, 16,384 x 3,072, NF4, blocks of 64), each way compiled alone as inductor compiles it inside a
layer. Checks every way gives bitsandbytes' values bit for bit, and on CUDA times each (median of 50, CUDA events),
alone and followed by the matmul of a 4,864-token micro-batch. One JSON line.

    python examples/benchmarks/dequant_kernels.py            (on the GPU: cards.sh run "deq@full")

Ways: ``table`` (compiled_layers' default: a 16-entry table, shifts from a 2-element tensor), ``select``
(compiled_layers' alternative: PHI3TUNE_COMPILE=dequant=select), and candidates: ``pairs`` (a byte's two values
loaded at once from a 256 x 2 table), ``iota`` (the table with the shifts as index arithmetic, no tensor), ``tuned``
(the table under inductor's coordinate-descent tuning of its kernel). Measured: docs/performance.md, session 13.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from _timing import median_us  # this folder's

from phi3tune import compiled_layers as cl


def byte_pairs(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
               dtype: torch.dtype) -> torch.Tensor:
    """Both values of each byte loaded at once from a 256 x 2 table: no shifts, one load a byte."""
    n = math.prod(shape)
    values = cl.code_tables()[quant_type]
    pairs = torch.tensor([[values[b >> 4], values[b & 15]] for b in range(256)], dtype=torch.float32,
                         device=packed.device)[packed.reshape(-1).to(torch.int64)]
    return cl._scale_blocks(pairs.reshape(-1)[:n], absmax.float(), blocksize).view(tuple(shape)).to(dtype)


def iota_table(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
               dtype: torch.dtype) -> torch.Tensor:
    """The table lookup with each code's shift computed from its index (a candidate for compiled_layers)."""
    n = math.prod(shape)
    codes = packed.reshape(-1)
    shifts = (4 - 4 * torch.arange(2, device=codes.device)).to(torch.uint8)
    nibbles = ((codes.unsqueeze(-1) >> shifts) & 15).reshape(-1)[:n]
    table = torch.tensor(cl.code_tables()[quant_type], dtype=torch.float32, device=codes.device)
    return cl._scale_blocks(table[nibbles.to(torch.int64)], absmax.float(), blocksize).view(tuple(shape)).to(dtype)


def timed(fn: Callable[[], Any], cuda: bool) -> float | None:
    return median_us(fn) if cuda else None


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    out_features, in_features, tokens = (16384, 3072, 4864) if cuda else (512, 256, 64)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device) * 0.02
    packed, qs = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    want = bnbf.dequantize_4bit(packed, qs)
    args = (packed, qs.absmax, qs.blocksize, qs.quant_type, tuple(qs.shape), torch.bfloat16)
    torch._dynamo.config.recompile_limit = 64
    ways: dict[str, Callable[[], torch.Tensor]] = {"bitsandbytes": functools.partial(bnbf.dequantize_4bit, packed, qs)}
    for name, fn, options in (("table", cl.dequantize_4bit, None),
                              ("select", functools.partial(cl.dequantize_4bit, lookup="select"), None),
                              ("pairs", byte_pairs, None),
                              ("iota", iota_table, None),
                              ("tuned", cl.dequantize_4bit, {"coordinate_descent_tuning": True})):
        compiled = torch.compile(fn, dynamic=False, options=options)
        ways[name] = functools.partial(compiled, *args)
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device)
    line: dict[str, Any] = {"label": "dequant_kernels", "shape": [out_features, in_features], "tokens": tokens,
                            "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for name, fn in ways.items():
        got = fn()  # compiles
        line[f"{name}_equal"] = bool(torch.equal(got, want))
        line[f"{name}_us"] = timed(fn, cuda)
        line[f"{name}_with_matmul_us"] = timed(lambda fn=fn: torch.nn.functional.linear(x, fn()), cuda)
    line["matmul_alone_us"] = timed(lambda: torch.nn.functional.linear(x, want), cuda)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

"""The compiled 4-bit dequantization, several ways, against bitsandbytes' own kernel: Phi-3-mini's largest 4-bit
weight (gate_up_proj, 16,384 x 3,072, NF4, blocks of 64), each way compiled alone as inductor compiles it inside a
layer. Checks every way gives bitsandbytes' values bit for bit, and on CUDA times each (median of 50, CUDA events),
alone and followed by the matmul of a 4,864-token micro-batch. One JSON line.

    python examples/benchmarks/dequant_kernels.py [WAY...]   (on the GPU: cards.sh run "deq@full"; DEQ_WAYS="a b")

Per way: bit-equality, the median GPU time alone and before the matmul, and the host's time per call (the mean of
200 calls without a sync: what a compiled layer's wrapper pays to launch it).

Ways: ``table`` (compiled_layers' default: a 16-entry table, shifts from a 2-element tensor), ``select``
(compiled_layers' alternative: PHI3TUNE_COMPILE=dequant=select), ``kernel`` (dequant_kernel.py's Triton kernel as the
op a compiled layer traces through, PHI3TUNE_COMPILE=dequant=kernel; on CUDA also launched directly with 256 to 4,096
bytes a program: ``kernelN``; session 35 measured a second kernel, a quantization block a program row, at commit
356990a, and removed it), and candidates: ``pairs`` (a byte's two values
loaded at once from a 256 x 2 table), ``iota`` (the table with the shifts as index arithmetic, no tensor), ``tuned``
(the table under inductor's coordinate-descent tuning of its kernel). Measured: docs/performance.md, sessions 13-14,
where every way but ``kernel`` read the code tables inside the compiled function: 3 graph breaks and eager code in
each call, so those rows timed the breaks, not a layer's kernel (mended since; session 15 measured them again).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from _timing import median_us  # this folder's

from phi3tune import compiled_layers as cl
from phi3tune import dequant_kernel


def byte_pairs(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
               dtype: torch.dtype, tables: dict[str, list[float]]) -> torch.Tensor:
    """Both values of each byte loaded at once from a 256 x 2 table: no shifts, one load a byte."""
    values = tables[quant_type]
    pairs = torch.tensor([[values[b >> 4], values[b & 15]] for b in range(256)], dtype=torch.float32,
                         device=packed.device)[packed.reshape(-1).to(torch.int64)]
    return dequant_kernel.scale_blocks(pairs.reshape(-1)[:math.prod(shape)], absmax, blocksize, shape, dtype)


def iota_table(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
               dtype: torch.dtype, tables: dict[str, list[float]]) -> torch.Tensor:
    """The table lookup with each code's shift computed from its index (a candidate for compiled_layers)."""
    codes = packed.reshape(-1)
    shifts = (4 - 4 * torch.arange(2, device=codes.device)).to(torch.uint8)
    nibbles = ((codes.unsqueeze(-1) >> shifts) & 15).reshape(-1)[:math.prod(shape)]
    table = torch.tensor(tables[quant_type], dtype=torch.float32, device=codes.device)
    return dequant_kernel.scale_blocks(table[nibbles.to(torch.int64)], absmax, blocksize, shape, dtype)


def timed(fn: Callable[[], Any], cuda: bool) -> float | None:
    return median_us(fn) if cuda else None


def host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - start) / calls * 1e6, 1)


def main() -> None:
    chosen = set(sys.argv[1:])  # none: every way
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    out_features, in_features, tokens = (16384, 3072, 4864) if cuda else (512, 256, 64)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device) * 0.02
    packed, qs = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    want = bnbf.dequantize_4bit(packed, qs)
    args = (packed, qs.absmax, qs.blocksize, qs.quant_type, tuple(qs.shape), torch.bfloat16)
    torch._dynamo.config.recompile_limit = 64
    tables = cl.code_tables()
    ways: dict[str, Callable[[], torch.Tensor]] = {"bitsandbytes": functools.partial(bnbf.dequantize_4bit, packed, qs)}
    for name, fn, options in (("table", cl.dequantize_4bit, None),
                              ("select", functools.partial(cl.dequantize_4bit, lookup="select"), None),
                              ("pairs", byte_pairs, None),
                              ("iota", iota_table, None),
                              ("tuned", cl.dequantize_4bit, {"coordinate_descent_tuning": True}),
                              ("kernel", functools.partial(cl.dequantize_4bit, lookup="kernel"), None)):
        if chosen and name not in chosen:
            continue
        # the code tables read here, outside the trace, as compiled_layers.decompositions does: read inside, they
        # break each way into 4 graphs with eager code between (sessions 13-14 timed those, see the module docstring)
        compiled = torch.compile(functools.partial(fn, tables=tables), dynamic=False, options=options)
        ways[name] = functools.partial(compiled, *args)
    if cuda:
        table = torch.tensor(tables["nf4"], dtype=torch.float32, device=device)
        for per_program in (256, 512, 1024, 2048, 4096):
            if chosen and f"kernel{per_program}" not in chosen:
                continue
            ways[f"kernel{per_program}"] = functools.partial(dequant_kernel.launch, packed, qs.absmax, qs.blocksize,
                                                             table, tuple(qs.shape), torch.bfloat16, per_program)
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device)
    line: dict[str, Any] = {"label": "dequant_kernels", "shape": [out_features, in_features], "tokens": tokens,
                            "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for name, fn in ways.items():
        got = fn()  # compiles
        line[f"{name}_equal"] = bool(torch.equal(got, want))
        line[f"{name}_us"] = timed(fn, cuda)
        line[f"{name}_with_matmul_us"] = timed(lambda fn=fn: torch.nn.functional.linear(x, fn()), cuda)
        line[f"{name}_host_us"] = host_us(fn)
        if cuda:
            torch.cuda.synchronize()
    line["matmul_alone_us"] = timed(lambda: torch.nn.functional.linear(x, want), cuda)
    line["clone_us"] = timed(want.clone, cuda)  # the weight's bytes read and written once: the memory's pace
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

"""compiled_layers' torch-ops twin of bitsandbytes' 4-bit dequantization against bitsandbytes' own CUDA kernel, on
every 4-bit weight of a checkpoint, eager and compiled (as the compiled layers run it), with a code's value loaded
from a table and selected by its bits: one JSON line per double_quant. On CUDA also one line of kernel times for the
largest weight (bitsandbytes' kernel, the compiled table, the compiled selects: median of 50, CUDA events).

    python examples/benchmarks/check_twins.py /tmp/phi3 [cpu]   (on the GPU: cards.sh run "twins@full")
"""

import functools
import json
import sys

import bitsandbytes.functional as bnbf
import torch
from _timing import median_us  # this folder's

from phi3tune import compiled_layers as cl
from phi3tune.model import load_weights
from phi3tune.specs import QuantSpec


def kernel_times(weight, qs, args, compiled) -> dict:
    """One weight dequantized by bitsandbytes' kernel, the compiled table lookup and the compiled selects."""
    kernels = {"bitsandbytes": functools.partial(bnbf.dequantize_4bit, weight.data, qs),
               "compiled_table": functools.partial(compiled, *args),
               "compiled_select": functools.partial(compiled, *args, lookup="select")}
    for fn in kernels.values():
        fn()  # compile, warm
    return {"values": weight.data.numel() * 2, **{k: median_us(fn) for k, fn in kernels.items()}}


torch._dynamo.config.recompile_limit = 64  # 4 weight shapes x 2 lookups (x double quant) are all graphs of one function
for double_quant in (False, True):
    base = load_weights(sys.argv[1], QuantSpec(compute_dtype="bfloat16", double_quant=double_quant),
                        torch.bfloat16, torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda"))
    # the code tables read outside the trace, as compiled_layers.decompositions does (inside, they break the graph)
    compiled = torch.compile(functools.partial(cl.dequantize_4bit, tables=cl.code_tables()), dynamic=False)
    counts = {"weights": 0, "eager_equal": 0, "compiled_equal": 0, "compiled_select_equal": 0}
    largest = None
    for module in base.modules():
        weight = getattr(module, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            continue
        absmax = qs.absmax if not qs.nested else cl.dequantize_blockwise(
            qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
        want = bnbf.dequantize_4bit(weight.data, qs)
        args = (weight.data, absmax, qs.blocksize, qs.quant_type, tuple(qs.shape), qs.dtype)
        counts["weights"] += 1
        counts["eager_equal"] += int(torch.equal(cl.dequantize_4bit(*args), want))
        if counts["weights"] <= 8:  # one compiled graph per weight shape: the first layers' four, twice
            counts["compiled_equal"] += int(torch.equal(compiled(*args), want))
            counts["compiled_select_equal"] += int(torch.equal(compiled(*args, lookup="select"), want))
        if largest is None or weight.data.numel() > largest[0].data.numel():
            largest = (weight, qs, args)
    print(json.dumps({"label": "twins", "double_quant": double_quant, **counts}), flush=True)
    if torch.cuda.is_available() and largest is not None:
        print(json.dumps({"label": "twins_us", "double_quant": double_quant, **kernel_times(*largest, compiled)}),
              flush=True)
    del base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

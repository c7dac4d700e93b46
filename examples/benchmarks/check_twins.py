"""compiled_layers' torch-ops twin of bitsandbytes' 4-bit dequantization against bitsandbytes' own CUDA kernel, on
every 4-bit weight of a checkpoint, eager and compiled (as the compiled layers run it): one JSON line.

    python examples/benchmarks/check_twins.py /tmp/phi3 [cpu]   (on the GPU: cards.sh run "twins@full")
"""

import json
import sys

import bitsandbytes.functional as bnbf
import torch

from phi3tune import compiled_layers as cl
from phi3tune.model import load_weights
from phi3tune.specs import QuantSpec

for double_quant in (False, True):
    base = load_weights(sys.argv[1], QuantSpec(compute_dtype="bfloat16", double_quant=double_quant),
                        torch.bfloat16, torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda"))
    compiled = torch.compile(cl.dequantize_4bit, dynamic=False)
    counts = {"weights": 0, "eager_equal": 0, "compiled_equal": 0}
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
    print(json.dumps({"label": "twins", "double_quant": double_quant, **counts}), flush=True)
    del base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

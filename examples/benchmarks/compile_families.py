"""How many graphs a symbolic-length plan's compiled layers build, and how long the warm-up compiles them, with the
layers' token-dimension inputs marked dynamic (the default: compiled_layers.symbolic_from_the_first_length) or not
(``--unmarked``: dynamo first builds a static graph at the first length each family meets). A tiny random Phi-3,
varlen attention (no mask: the CUDA plans' layer inputs), checkpointed inside the graphs for the longer passes, so
both families compile; inductor generates the code, on whatever device this runs.

    python examples/benchmarks/compile_families.py [--unmarked]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from phi3tune import FineTuner, pipeline
from phi3tune.tiny import write_tiny_phi3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unmarked", action="store_true")
    a = ap.parse_args()
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = Path(tempfile.mkdtemp()) / "tiny"
    write_tiny_phi3(model)
    os.environ["PHI3TUNE_COMPILE"] = "dynamic_lengths=1"
    real = pipeline.resolve_plan

    def by_length(*args: Any, **kwargs: Any) -> Any:  # what a small card's plan does, on any device
        return replace(real(*args, **kwargs), checkpointing=True, checkpoint_layers=2,
                       checkpoint_lengths=((96, 0), (128, 2)), recompute_in_graph=True)

    pipeline.resolve_plan = by_length
    if a.unmarked:
        pipeline.symbolic_from_the_first_length = lambda decoder: None
    rows = [{"text": f"### Human: count to {i}\n### Assistant: " + " ".join(map(str, range(i % 40 + 3)))}
            for i in range(48)]
    tuner = (FineTuner(model, attn_implementation="phi3tune_varlen").adapter(r=8, alpha=16, dropout=0.1)
             .data(source=rows, max_seq_length=64)
             .training(output_dir=str(model.parent / "out"), batch_size=3, grad_accum=2, max_steps=3,
                       logging_steps=1, save_strategy="no", progress_bar=False, optimizer="adamw_torch",
                       optimize_for="speed",
                       compile=True, micro_batch_tokens=128))
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    started = time.perf_counter()
    result = tuner.run(callbacks=[lambda e: graphs.append(counters["stats"]["unique_graphs"])])
    print({"marked": not a.unmarked, "graphs_after_each_step": graphs, "run_s": round(time.perf_counter() - started, 1),
           "losses": [round(x, 6) for x in result.losses]})


if __name__ == "__main__":
    main()

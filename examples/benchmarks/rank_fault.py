"""One rank of a 2-process run fails after step 1; what does the other rank see? Run under torchrun:

    torchrun --nproc_per_node 2 examples/benchmarks/rank_fault.py MODEL DATA OUT dies|hangs [TIMEOUT_S]

``dies``: rank 1 SIGKILLs itself. ``hangs``: rank 1 sleeps for 3x the timeout (stops calling collectives). Rank 0
writes OUT.rank0.json: the error it raised (a phi3tune TrainingError is the goal: it names
training.collective_timeout_s) and the seconds from the failure to it. The CPU version of this is
tests/test_distributed.py (gloo); this is the one for NCCL on GPUs (examples/benchmarks/h200.sh fault_*).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch.distributed as dist

from phi3tune import FineTuner, TrainingError

model, data, out, mode = sys.argv[1:5]
timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
seen: dict[str, float] = {}


def rank1_fails(event: dict) -> None:
    seen["t"] = time.monotonic()
    if event["step"] == 1 and dist.get_rank() == 1:
        if mode == "dies":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3 * timeout)


result: dict = {"mode": mode, "timeout_s": timeout, "env": {k: v for k, v in os.environ.items() if "NCCL" in k}}
try:
    (FineTuner(model).adapter(r=8).data(source=data, max_seq_length=128)
     .training(output_dir=out, batch_size=2, grad_accum=1, max_steps=4, save_strategy="no", progress_bar=False,
               collective_timeout_s=timeout, overwrite_output_dir=True).run(callbacks=[rank1_fails]))
    result["error"] = None
except TrainingError as e:
    result.update(error=f"TrainingError: {e}", after_failure_s=time.monotonic() - seen.get("t", 0.0))
except BaseException as e:  # what else reaches the user: the point of this script is to see it
    result.update(error=f"{type(e).__name__}: {e}"[:2000], after_failure_s=time.monotonic() - seen.get("t", 0.0))
    raise
finally:
    with open(f"{out}.rank{dist.get_rank() if dist.is_initialized() else 'x'}.json", "w") as f:
        json.dump(result, f)

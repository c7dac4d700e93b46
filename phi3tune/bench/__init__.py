"""Benchmark a run (real tokens/s, step time, peak device memory, MFU, padding) and estimate its memory.

``benchmark`` times optimizer steps after a warm-up by the device's own events (no wait between steps, so the
run keeps its pace), and reads peak memory from
the *device* (used memory sampled in a thread), so paged optimizer state and allocator slack count, not only
PyTorch's allocator peak. ``estimate_memory`` predicts the peak from the config alone, before any weights load.
The command line is ``phi3tune bench`` (cli/train.py); ``python -m phi3tune.bench`` runs the same (``__main__.py``).
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from typing import Any

import torch

from ..finetuner import FineTuner, execute
from ..late_read import step_done_event
from ..memory import GIB
from ..plan import RunPlan
from ..runspec import RunSpec

# Dense bf16 matmul throughput measured on the H200 we benchmark on (docs/performance.md).
PEAK_TFLOPS = {"H200": 808.0, "H100": 760.0}


def plan_for(ft: FineTuner, device: str | None = None, free_gib: float | None = None,
             processes: int | None = None, step_tokens: int | None = None,
             steps: list[int] | None = None) -> RunPlan:
    """The RunPlan ``ft`` gets on ``device`` ("cuda" / "cpu"; default: this machine's), without loading weights.
    ``free_gib`` plans for a card with that much free memory (``optimize_for="auto"`` picks what fits);
    ``processes`` for that many ranks (default: as launched; under ``distributed="fsdp"`` the peak is per GPU);
    ``steps``: each step's tokens (a run learns them from the prepared unpacked rows: batching.step_lengths),
    or ``step_tokens``: the longest step alone (default: the most of ``steps``)."""
    import os

    from ..model import preflight_model, resolve_target_modules
    from ..plan_search import resolve_plan
    from ..precision import resolve_device

    run = ft.freeze()
    info = preflight_model(run.model, run.trust_remote_code, need_weights=False)
    assert info.shape is not None
    targets = resolve_target_modules(run.adapter, info.linear_layers)
    dev = torch.device(device) if device else resolve_device("auto")  # a named device needs not be here
    n = processes if processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    return resolve_plan(run, info.shape, targets, dev, None if free_gib is None else int(free_gib * GIB), n,
                        step_tokens, steps)


def estimate_memory(ft: FineTuner, device: str | None = None, free_gib: float | None = None,
                    processes: int | None = None) -> dict[str, Any]:
    """Predict peak memory (bytes per component, and GiB in all; per GPU under FSDP) from specs and the model
    config only: the prediction of the RunPlan the run would get (``plan_for``). The data is not read, so for
    unpacked rows a whole-step micro-batch is predicted full (an upper bound: the run sizes it to the data's
    longest step, ``pipeline.whole_steps_of_the_data``)."""
    plan = plan_for(ft, device, free_gib, processes)
    return {**plan.memory, "total_gib": plan.predicted_peak_gib, "tokens_per_micro_batch": plan.peak_micro_batch_tokens,
            "mode": plan.mode, "plan": plan.describe()}


class _DeviceMemory:
    """Samples device-wide used memory in a thread; peak minus the level before the run started. The device is
    named: a new thread's current device is GPU 0, so under torchrun every other rank would read GPU 0 and put a
    CUDA context there (measured: 518 MiB of GPU 0 held by rank 1, which ran an emulated 8 GiB card out of memory)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(self.device)
        self.base = total - free
        self.since_mark: int | None = None  # the peak since ``mark()`` (the timed steps'), None before it
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            if self.since_mark is not None:
                self.since_mark = max(self.since_mark, total - free)
            time.sleep(self.interval)

    def mark(self) -> None:
        """Start a second peak from now (the first sample after this call counts)."""
        self.since_mark = 0

    def __enter__(self) -> _DeviceMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return (self.peak - self.base) / GIB

    @property
    def peak_since_mark_gib(self) -> float | None:
        return None if self.since_mark is None else (self.since_mark - self.base) / GIB


def _useful_flops_per_token(run: RunSpec) -> float:
    """4 x non-embedding parameters: forward 2N + backward input-gradients 2N (the base is frozen)."""
    from ..model import preflight_model

    shape = preflight_model(run.model, run.trust_remote_code, need_weights=False).shape
    assert shape is not None
    n = shape.other_params + sum(i * o for _, i, o in shape.linears) - shape.vocab * shape.hidden
    return 4.0 * n


def _frames_compiled() -> int:
    """Frames torch.compile has built in this process so far (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def benchmark(ft: FineTuner, steps: int = 20, warmup: int = 5, label: str | None = None) -> dict[str, Any]:
    """Run ``warmup + steps`` optimizer steps; report the timed ``steps`` as one JSON-ready dict."""
    out_dir = tempfile.mkdtemp(prefix="phi3tune-bench-")
    run = ft.freeze().with_training(max_steps=warmup + steps, save_strategy="no", logging_steps=10**6,
                                    progress_bar=False, output_dir=out_dir, overwrite_output_dir=True)
    cuda = torch.cuda.is_available() and run.train.device != "cpu"
    events: list[dict[str, Any]] = []
    # per timed step, to place a slow one: frames torch.compile built during it, and the allocator's reserve after it
    # (a reserve that grows asks the driver for memory, which may first evict paged optimizer state). Read late
    # (late_read.py), a step's callback comes once the next step is queued: what that queuing built counts here too
    compiles: list[int] = []
    reserved: list[float] = []
    ends: list[Any] = []  # per step from the last warm-up one: its end, the device's event (CUDA) or the host's clock
    last_frames = _frames_compiled()
    # the whole run's allocator peaks up to the warm-up's end; from there to the last step's callback, the timed
    # steps' own (without the load, the first step's compiles, and a streamed base's return to the device at the
    # run's end, which session 28 found to be the streamed runs' allocator peak)
    before_steps: dict[str, int] = {}
    steps_peaks: dict[str, float | None] = {}
    first_step: list[float] = []  # the host's clock at the first step's callback: load, data, compile and one step

    def on_step(event: dict[str, Any]) -> None:
        # no wait for the device here: a run's callbacks must not change its pace (the loop may read a step's
        # numbers one step late, late_read.py); CUDA steps are timed by their events once the run is over
        nonlocal last_frames
        frames = _frames_compiled()
        if not first_step:
            first_step.append(time.perf_counter())
        if event["step"] == warmup and cuda:
            before_steps.update(alloc=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
            monitor.mark()
        if event["step"] >= warmup:
            ends.append(event["done_event"] if cuda else time.perf_counter())
        if event["step"] > warmup:
            events.append(event)
            compiles.append(frames - last_frames)
            if cuda:
                reserved.append(round(torch.cuda.memory_reserved() / GIB, 3))
                steps_peaks.update(alloc=torch.cuda.max_memory_allocated() / GIB,
                                   reserved=torch.cuda.max_memory_reserved() / GIB, device=monitor.peak_since_mark_gib)
        last_frames = frames

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        monitor: Any = _DeviceMemory()
    else:
        monitor = None
    started = time.perf_counter()
    if warmup == 0:  # the first step is timed from here
        ends.append(step_done_event(torch.device("cuda")) if cuda else started)
    if monitor is not None:
        with monitor:
            result = execute(run, callbacks=[on_step])
    else:
        result = execute(run, callbacks=[on_step])
    from accelerate import PartialState

    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(ends)]
    else:
        times = [b - a for a, b in itertools.pairwise(ends)]

    gpus = PartialState().num_processes  # the run's processes (accelerate launch / torchrun), as accelerate sees them
    real = sum(e["real_tokens"] for e in events)
    # real tokens are counted over all ranks, batch tokens per rank: ranks lay out their own examples, so this rank's
    # batch tokens times the ranks is not the run's (it gave a negative share under FSDP): no padding share there
    batch = sum(e["batch_tokens"] for e in events)
    tok_s = real / sum(times) if times else 0.0
    report: dict[str, Any] = {
        "label": label or run.train.optimize_for, "optimize_for": run.train.optimize_for,
        "plan": result.plan.describe() if result.plan else None, "mode": result.plan.mode if result.plan else None,
        "packing": run.data.packing, "batch_size": run.train.batch_size,
        "grad_accum": run.train.grad_accum, "max_seq_length": run.data.max_seq_length,
        "optimizer": run.train.optimizer, "attn": run.attn_implementation or "auto",
        "steps": len(times), "warmup": warmup,
        "real_tokens_per_s": round(tok_s, 1),
        "median_step_s": round(sorted(times)[len(times) // 2], 4) if times else None,
        "step_s": [round(t, 4) for t in times],
        "frames_compiled": compiles,
        # per step, host seconds queuing its passes / waiting for the device: a wait near zero, the host set the pace
        "queue_s": [round(e["queue_s"], 4) for e in events], "wait_s": [round(e["wait_s"], 4) for e in events],
        "padding_fraction": round(1 - real / max(1, batch), 4) if gpus == 1 else None,
        "losses": [round(e["loss"], 4) for e in events],
        "total_s": round(time.perf_counter() - started, 1),
        # what a user waits before training starts: the first compile shows here (a cold cache's 114.6 s on 8 GiB)
        "first_step_s": round(first_step[0] - started, 1) if first_step else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "predicted_peak_gib": result.plan.predicted_peak_gib if result.plan else None,  # the run's own plan
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        alloc, reserve = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        report.update(device=name, peak_device_gib=round(monitor.peak_gib, 3),
                      peak_alloc_gib=round(max(alloc, before_steps.get("alloc", 0)) / GIB, 3),
                      peak_reserved_gib=round(max(reserve, before_steps.get("reserved", 0)) / GIB, 3),
                      reserved_gib=reserved)
        if steps_peaks:  # the timed steps' own peaks, as of the last step's callback
            report.update({f"steps_peak_{k}_gib": None if v is None else round(v, 3) for k, v in steps_peaks.items()})
        stats = torch.cuda.memory_stats()  # allocator retries: a plan too close to the card's size frees and re-asks
        report.update(alloc_retries=stats.get("num_alloc_retries", 0), ooms=stats.get("num_ooms", 0))
        if peak:
            # tokens/s counts every rank; MFU is per GPU
            report["mfu"] = round(tok_s * _useful_flops_per_token(run) / (peak * 1e12 * gpus), 4)
    return report

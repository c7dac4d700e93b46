"""What is alive on the GPU at a run's allocator peak, and which code allocated it.

    python examples/benchmarks/memory_peak.py CONFIG.yaml [--set key=value ...] [--steps 4] [--out FILE]
    (on the GPU: cards.sh runs "mem@GIB[+VARIANT...]", e.g. mem@full+seq4096)

The config runs for a few steps through ``FineTuner.run`` with CUDA's allocation history recorded from before the
weights load. The history is then replayed to the moment the allocated bytes peak, and the blocks alive then are
summed twice: by the first frame outside torch that allocated them (ours, a library's, or a compiled graph's
generated code), and by the first frame of phi3tune; then again for the steps after the first alone (the model's
loading, whose peak was every streamed run's in session 27, left out), with the allocator's reserved and inactive
split peaks over those steps. It asks where a plan's predicted peak and the measured one part
(the memory plan at seq 4096: 4.20 GiB allocated where session 9 measured 3.90, session 23). A run that runs out of
memory is reported too: the replayed peak is then what was alive when it did. On the CPU it only runs
the steps (a rehearsal). Known to fail on the GPU under the memory plan (session 24): with Python stacks recorded,
torch.utils.checkpoint's recomputation raised a SystemError inside AOT autograd's compiled forward.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import torch

from phi3tune import FineTuner
from phi3tune.cli import apply_overrides, parse_assignment, read_config

GIB = 2**30


def alive_at_peak(trace: list[dict[str, Any]], start: int = 0) -> tuple[int, int, list[dict[str, Any]]]:
    """Replay an allocator trace (``torch.cuda.memory._snapshot()``'s device trace): the most bytes allocated at
    once from event ``start`` on, the event where that was reached, and the allocations alive then. A block counts
    from its ``alloc`` to its free (``free_requested``, else ``free_completed``); a free of a block allocated before
    the trace began is ignored, so the replayed peak misses those bytes (the report says by how much)."""
    def replay(stop: int | None) -> tuple[int, int, dict[int, dict[str, Any]]]:
        live: dict[int, dict[str, Any]] = {}
        total = peak = 0
        at = -1
        for i, event in enumerate(trace if stop is None else trace[:stop + 1]):
            action, addr = event.get("action"), event.get("addr")
            if action == "alloc":
                live[addr] = event
                total += event["size"]
            elif action in ("free_requested", "free_completed") and addr in live:
                total -= live.pop(addr)["size"]
            if total > peak and i >= start:
                peak, at = total, i
        return peak, at, live

    peak, at, _ = replay(None)
    _, _, live = replay(at) if at >= 0 else (0, 0, {})
    return peak, at, list(live.values())


def _frame(event: dict[str, Any], inside: str | None) -> str:
    """The innermost frame of ``event`` in a file whose path holds ``inside``; else (``inside`` None) the innermost
    outside torch's own Python files (inductor's generated code, whose files live elsewhere, counts as outside)."""
    for f in event.get("frames") or []:
        name = f.get("filename", "")
        if (inside in name) if inside else "/torch/" not in name:
            short = name.rsplit("/site-packages/", 1)[-1].rsplit("/phi3tune/", 1)[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(no such frame)"


def report(trace: list[dict[str, Any]], reported_peak: int, top: int = 20, start: int = 0, what: str = "",
           marks: tuple[int, ...] = ()) -> str:
    """The replayed peak from event ``start`` on, what is alive then by frame and by size, and (``marks``: the trace's
    length at each step callback) after which step each alive block was allocated."""
    peak, at, live = alive_at_peak(trace, start)
    lines = [f"allocator peak{what}, replayed: {peak / GIB:.3f} GiB at event {at:,} of {len(trace):,}; "
             f"torch.cuda.max_memory_allocated{what}: {reported_peak / GIB:.3f} GiB "
             f"({(reported_peak - peak) / GIB:.3f} GiB not in the trace)", ""]
    for title, inside in (("by the first frame outside torch", None), ("by the first frame of phi3tune", "/phi3tune/")):
        sums: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        for event in live:
            key = _frame(event, inside)
            sums[key] += event["size"]
            counts[key] += 1
        lines.append(f"{title}: GiB, blocks, frame")
        lines += [f"  {size / GIB:8.3f} {counts[key]:6d}  {key}" for key, size in sums.most_common(top)]
        lines.append("")
    sizes = collections.Counter(event["size"] for event in live)
    lines.append("the largest block sizes alive: MiB x count")
    lines += [f"  {size / 2**20:10.1f} x {n}" for size, n in sorted(sizes.items(), reverse=True)[:top]]
    if marks:  # which step's callback each alive block follows (callbacks come a step late where the loop reads late)
        index = {id(e): i for i, e in enumerate(trace)}
        spans: collections.Counter[int] = collections.Counter()
        for event in live:
            spans[sum(1 for m in marks if m <= index.get(id(event), 0))] += event["size"]
        lines.append("alive at the peak, by the step callbacks before their allocation: callbacks, GiB "
                     f"(the peak's event follows {sum(1 for m in marks if m <= at)})")
        lines += [f"  {n:3d} {size / GIB:8.3f}" for n, size in sorted(spans.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=parse_assignment)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-entries", type=int, default=5_000_000)
    ap.add_argument("--out")
    # none: no stack traces (sizes, order and step marks only): on the GPU, recording Python stacks made
    # torch.utils.checkpoint's recomputation raise a SystemError under the memory plan (sessions 24 and 28)
    ap.add_argument("--stacks", choices=("python", "none"), default="python")
    a = ap.parse_args()
    ft = FineTuner.from_config(apply_overrides(read_config(a.config), a.overrides))
    ft.training(max_steps=a.steps, save_strategy="no", progress_bar=False, overwrite_output_dir=True,
                output_dir="/tmp/phi3tune-memory-peak")
    if not torch.cuda.is_available():
        ft.run()
        text = "memory_peak: no CUDA device; the steps ran, nothing was recorded (a rehearsal)\n"
    else:
        device = torch.cuda.current_device()
        # what is held before the run (as_card.py's filler, which patches max_memory_allocated but not
        # memory_stats): subtracted from the allocator's peaks below, so both reports count the run alone
        held = torch.cuda.memory_stats()
        held_alloc = held.get("allocated_bytes.all.current", 0)
        held_reserved = held.get("reserved_bytes.all.current", 0)
        after: dict[str, int] = {}
        marks: list[int] = []  # the trace's length at each step callback

        def first_step(_event: Any) -> None:  # from here on the training steps alone, not the model's loading
            marks.append(len(torch.cuda.memory._snapshot()["device_traces"][device]))
            if not after:
                after["event"] = marks[-1]
                after["whole"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        if a.stacks == "none":
            torch.cuda.memory._record_memory_history(max_entries=a.max_entries, context=None)
        else:
            torch.cuda.memory._record_memory_history(max_entries=a.max_entries, stacks="python")
        oom = ""
        try:
            result: Any = ft.run(callbacks=[first_step])
        except torch.OutOfMemoryError as error:  # what was alive when it ran out is the question then (s35c4)
            result, oom = None, f"ran out of memory: {str(error).splitlines()[0][:300]}"
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        stats = torch.cuda.memory_stats()
        plan = oom or (result.plan.describe() if result.plan is not None else "(no plan)")
        trace = snapshot["device_traces"][device]
        alloc_peak = stats["allocated_bytes.all.peak"] - held_alloc
        reserved_peak = stats["reserved_bytes.all.peak"] - held_reserved
        steps = (f"after the first step: allocated peak {alloc_peak / GIB:.3f} GiB, reserved "
                 f"peak {reserved_peak / GIB:.3f}, inactive split peak "
                 f"{stats['inactive_split_bytes.all.peak'] / GIB:.3f}, allocator retries {stats['num_alloc_retries']}")
        text = "\n".join([plan, steps, report(trace, max(after.get("whole", 0), torch.cuda.max_memory_allocated()),
                                              marks=tuple(marks)),
                          report(trace, torch.cuda.max_memory_allocated(), start=after.get("event", 0),
                                 what=" after the first step", marks=tuple(marks))])
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

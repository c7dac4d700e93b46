"""Profile a few optimizer steps of a phi3tune config with torch.profiler; print the top CUDA kernels.

    python examples/benchmarks/profile_steps.py CONFIG.yaml [--set key=value ...] [--out FILE]

Under torchrun each rank writes FILE.rank<N>. The GPU's kernel time by kind (kernel_kinds.py: matmuls with their
TFLOP/s, attention, compiled fusions, ...), then two tables: by GPU time, then by CPU time (host-side cost), and
where the GPU waits. ``--light`` records GPU kernels only (the host near its own speed; no CPU table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from phi3tune import FineTuner
from phi3tune.cli import apply_overrides, parse_assignment, read_config
from phi3tune.plugins import AdapterFacts, facts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_kinds import busy_gaps, device_kernels, kinds_report, matmul_flops_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=parse_assignment)
    ap.add_argument("--start", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--trace", help="also write the profiled steps as a Chrome trace (gzipped where it ends in .gz)")
    ap.add_argument("--light", action="store_true",
                    help="GPU kernels only (no CPU ops, no stacks): the host runs near its own speed, so the idle "
                         "report shows where the GPU waits in a normal step, placed by the kernels around each gap")
    a = ap.parse_args()
    ft = FineTuner.from_config(apply_overrides(read_config(a.config), a.overrides))
    # one step more than profiled: a plan that reads its numbers late calls back for step n once step n + 1 is
    # queued, so the last profiled step's callback must not be the run's end (session 29: with the run ending at
    # start + steps, two calls' "2 steps" held one step, a third's two)
    ft.training(max_steps=a.start + a.steps + 1, save_strategy="no", progress_bar=False, overwrite_output_dir=True,
                output_dir="/tmp/phi3tune-profile")
    cpu, cuda = torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA
    gpu = torch.cuda.is_available()
    activities = ([cuda] if gpu else [cpu]) if a.light else [cpu, cuda]  # light on the CPU: a rehearsal
    prof = torch.profiler.profile(activities=activities, with_stack=not a.light)

    wall = [0.0]
    tokens = {"real": 0, "batch": 0}  # of the profiled steps: a per-token cost to compare packed and unpacked runs

    def on_step(event: dict) -> None:
        if a.start < event["step"] <= a.start + a.steps:
            tokens["real"] += event["real_tokens"]
            tokens["batch"] += event["batch_tokens"]
        if event["step"] == a.start:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            prof.start()
            wall[0] = time.perf_counter()
        elif event["step"] == a.start + a.steps:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            wall[0] = time.perf_counter() - wall[0]
            prof.stop()

    ft.run(callbacks=[on_step])
    avg = prof.key_averages()
    # the GPU's busy share: kernel time over the profiled steps' wall time. Kernel time as the table's own "Self
    # CUDA time total" counts it: device events only (a CPU op's row repeats its kernels' time, and GPU-side user
    # annotations such as "Optimizer.step#..." span kernels already counted)
    from torch.autograd import DeviceType

    kernels = sum(e.self_device_time_total for e in avg
                  if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    head = (f"{a.steps} steps from step {a.start}: wall {wall[0]:.3f} s, GPU kernels {kernels:.3f} s "
            f"({100 * kernels / max(wall[0], 1e-9):.0f}% busy); {tokens['real']:,} real tokens of "
            f"{tokens['batch']:,} laid out\n\n")
    events = prof.events()
    timed = [(name, end - start) for name, start, end in device_kernels(events)]
    head += kinds_report(timed, a.steps, step_flops(ft, tokens["batch"])) + "\n"
    table = head + (avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70) + "\n\nby CPU time:\n"
             + avg.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70))
    table += "\n\n" + (gap_report(events) if a.light else idle_report(events))
    if a.trace:  # every kernel and copy on its stream, to read the timeline (chrome://tracing, Perfetto)
        raw = a.trace.removesuffix(".gz")
        prof.export_chrome_trace(raw)
        if a.trace.endswith(".gz"):
            import gzip
            import shutil

            with open(raw, "rb") as src, gzip.open(a.trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(raw)
    rank = os.environ.get("RANK")  # under torchrun: one file per rank
    if a.out:
        with open(a.out if rank is None else f"{a.out}.rank{rank}", "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)


def step_flops(ft: FineTuner, laid_out: int) -> float | None:
    """The profiled steps' matmul FLOPs (kernel_kinds.matmul_flops_per_token over their laid-out tokens, pads
    included: the matmuls run on them); None where the model is not a local directory with a config.json."""
    config = Path(str(ft.model)) / "config.json"
    if not config.exists():
        return None
    return matmul_flops_per_token(json.loads(config.read_text()), facts(ft.adapter_spec, AdapterFacts).r) * laid_out


def _where(stack: list[str]) -> str:
    """The innermost frame of ours or of the libraries we call into (the place the host was, not torch's own)."""
    for frame in stack:
        if any(k in frame for k in ("phi3tune/", "transformers/", "peft/", "accelerate/", "bitsandbytes/")):
            return frame.split("site-packages/")[-1]
    return stack[0] if stack else "?"


def idle_report(events: list, least_us: float = 50.0, rows: int = 25) -> str:
    """Where the GPU waits: every gap of >= ``least_us`` between kernels, charged to what the host was running
    when it ended (the innermost CPU op then active, and the Python frame of ours or a library above it)."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU and e.stack]
    gaps = busy_gaps([(s, e) for _, s, e in device_kernels(events)], least_us)
    charged: dict[tuple[str, str], list[float]] = {}
    for start, end in gaps:
        active = [e for e in cpu if e.time_range.start <= end <= e.time_range.end]
        inner = min(active, key=lambda e: e.time_range.end - e.time_range.start, default=None)
        key = (inner.name if inner else "?", _where(inner.stack) if inner else "?")
        charged.setdefault(key, []).append(end - start)
    lines = [f"GPU idle: {len(gaps)} gaps of >= {least_us:.0f} us, {sum(e - s for s, e in gaps) / 1e3:.1f} ms in all, "
             "charged to the host op running when each ended:"]
    for (name, where), us in sorted(charged.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"{sum(us) / 1e3:9.2f} ms {len(us):5d} gaps  {name[:40]:40s}  {where[:110]}")
    return "\n".join(lines) + "\n"


def gap_report(events: list, least_us: float = 20.0, rows: int = 25) -> str:
    """Where the GPU waits, with no CPU ops recorded: every gap of >= ``least_us`` between kernels, in the step's
    order (its position as a share of the profiled time) and by the kernels before and after it. Then the same on
    the compute stream alone (the stream with the most kernel time): there a gap that a copy on another stream
    fills is the compute waiting for that copy (a streamed base's layer, an input coming back), which the first
    report, of all streams at once, counts as busy; each such gap names the other stream's work that ended last
    before it did."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end, e.name, getattr(e, "device_resource_id", 0))
                     for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    if not kernels:
        return "GPU idle: no kernel recorded\n"
    first, last = kernels[0][0], max(k[1] for k in kernels)
    gaps, end, before = [], kernels[0][1], kernels[0][2]
    for s, e, name, _ in kernels[1:]:
        if s - end >= least_us:
            gaps.append((s - end, (end - first) / max(1e-9, last - first), before, name))
        if e > end:
            end, before = e, name
    tenths = [sum(g[0] for g in gaps if int(10 * g[1]) == i) / 1e3 for i in range(10)]
    lines = [f"GPU idle: {len(gaps)} gaps of >= {least_us:.0f} us, {sum(g[0] for g in gaps) / 1e3:.1f} ms in all; "
             "by tenth of the profiled time (ms): " + " ".join(f"{t:.1f}" for t in tenths), "largest:"]
    for us, at, prev, nxt in sorted(gaps, reverse=True)[:rows]:
        lines.append(f"{us / 1e3:8.2f} ms at {100 * at:5.1f}%  after {prev[:50]:50s}  before {nxt[:50]}")
    return "\n".join(lines) + "\n\n" + stream_report(kernels, first, last, least_us, rows)


def stream_report(kernels: list[tuple[float, float, str, int]], first: float, last: float, least_us: float,
                  rows: int) -> str:
    """Each stream's busy time, and the compute stream's gaps by what filled them elsewhere (gap_report)."""
    busy: dict[int, float] = {}
    for s, e, _, stream in kernels:
        busy[stream] = busy.get(stream, 0.0) + (e - s)
    compute = max(busy, key=lambda k: sum(e - s for s, e, n, st in kernels if st == k and "Memcpy" not in n))
    lines = [f"streams over {(last - first) / 1e3:.1f} ms: " + ", ".join(
        f"{k}{' (compute)' if k == compute else ''} {v / 1e3:.1f} ms" for k, v in sorted(busy.items()))]
    own = [k for k in kernels if k[3] == compute]
    others = sorted((k for k in kernels if k[3] != compute), key=lambda k: k[1])
    by_filler: dict[str, list[float]] = {}
    end, gaps = own[0][1], []
    for s, e, name, _ in own[1:]:
        if s - end >= least_us:
            filler = [o for o in others if end < o[1] <= s + 1.0]  # other-stream work that ended inside the gap
            what = f"{filler[-1][2][:40]} (stream {filler[-1][3]})" if filler else "nothing (the host)"
            by_filler.setdefault(what, []).append(s - end)
            gaps.append((s - end, name))
        end = max(end, e)
    lines.append(f"compute stream {compute} idle: {len(gaps)} gaps of >= {least_us:.0f} us, "
                 f"{sum(g for g, _ in gaps) / 1e3:.1f} ms in all; by what ended last inside each gap:")
    for what, us in sorted(by_filler.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"{sum(us) / 1e3:9.2f} ms {len(us):5d} gaps  {what}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

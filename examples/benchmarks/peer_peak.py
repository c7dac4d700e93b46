"""Run a peer's recipe and add the device's peak memory to the JSON lines it wrote.

    python as_card.py 16 examples/benchmarks/peer_peak.py LINES.jsonl SCRIPT.py [script args...]
    (cards.sh runs every u@ / ug@ peer through it)

The peers' recipes (../shared/bench/peers/) report the allocator's peaks only. Ours report the device's too:
``phi3tune.bench`` samples device-wide used memory in a thread and subtracts the level before the run, which under
as_card.py already holds the filler and the CUDA context. This samples the same way around the peer's script, run
in this process as as_card.py runs it. When the script ends, it adds ``peak_device_gib`` to each line the script
appended to LINES.jsonl. So the card table can set both tools' device peaks side by side. Without CUDA it only runs
the script (the CPU rehearsal).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path


def add_device_peak(lines: Path, before: int, peak_gib: float) -> int:
    """Add ``peak_device_gib`` to each JSON line of ``lines`` after its first ``before`` lines (the ones this run
    appended); returns how many it changed."""
    if not lines.exists():
        return 0
    rows = lines.read_text().splitlines()
    changed = 0
    for i in range(before, len(rows)):
        if rows[i].startswith("{"):
            rows[i] = json.dumps({**json.loads(rows[i]), "peak_device_gib": round(peak_gib, 3)})
            changed += 1
    lines.write_text("".join(row + "\n" for row in rows))
    return changed


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: peer_peak.py LINES.jsonl SCRIPT.py [script args...]")
    lines, script = Path(sys.argv[1]), sys.argv[2]
    before = len(lines.read_text().splitlines()) if lines.exists() else 0
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import torch

    if not torch.cuda.is_available():
        runpy.run_path(script, run_name="__main__")
        return
    from phi3tune.bench import _DeviceMemory

    code: object = 0
    with _DeviceMemory() as sampled:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:  # kept for cards.sh, once the lines it did write have their peak
            code = stop.code
    n = add_device_peak(lines, before, sampled.peak_gib)
    print(f"peer_peak: device peak {sampled.peak_gib:.2f} GiB added to {n} line(s) of {lines}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()

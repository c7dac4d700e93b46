"""Data at scale: rows/s per core, peak memory, and time to the first optimizer step (first run, second run,
streaming) on a generated JSONL file of N conversations (~200 Phi-3 tokens each). Numbers: docs/data.md.

    python examples/benchmarks/data_scale.py --rows 1000000 --tokenizer ../shared/models/phi3-mini-4k-instruct \
        --work /tmp/data-scale [--phases first,second,stream] [--packing]

Each phase runs in a fresh Python process (its peak RSS is its own; tokenizing workers are counted too):
``prepare`` times prepare_data alone on a cold cache; ``first`` / ``second`` time a whole FineTuner run (a tiny random
Phi-3 that uses the given tokenizer, one CPU step) from process start to the end of step 1, cold then warm cache;
``stream`` does the same with DataSpec(streaming=True). The model is tiny on purpose: what is timed is the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def make_rows(path: Path, n: int, seed_file: Path) -> None:
    """N rows of {"text": "### Human: ... ### Assistant: ..."}: the seed rows repeated, each made unique."""
    seeds = [json.loads(line)["text"] for line in seed_file.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"[{i}] {seeds[i % len(seeds)]}"}) + "\n")


def _rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes: Rss, Pss, and Pss split into Pss_Anon (memory no file backs: what the kernel
    cannot drop) and Pss_File (pages of mapped files: the libraries, memory-mapped Arrow files)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class PeakMemory:
    """Samples this process and its children (the tokenizing workers) every 0.5 s: the peak of their summed PSS
    (proportional set size: pages shared between forked processes counted once, not per process), of their
    summed anonymous PSS (file-backed pages, such as a memory-mapped Arrow file's, excluded), and of the
    parent's own RSS."""

    def __init__(self) -> None:
        import threading

        self.pss = self.anon = self.rss = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            pss = anon = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    got = _rollup(p.pid)
                except OSError:
                    continue
                pss, anon = pss + got["Pss"], anon + got["Pss_Anon"]
            self.pss, self.anon = max(self.pss, pss / 2**30), max(self.anon, anon / 2**30)
            self.rss = max(self.rss, _rollup(me.pid)["Rss"] / 2**30)
            time.sleep(0.5)

    def report(self) -> dict[str, float]:
        return {"peak_pss_tree_gb": round(self.pss, 2), "peak_anon_pss_tree_gb": round(self.anon, 2),
                "peak_rss_parent_gb": round(self.rss, 2)}


MEMORY: PeakMemory | None = None


def peak_rss_gb() -> dict[str, float]:
    assert MEMORY is not None
    return MEMORY.report()


def phase_prepare(a: argparse.Namespace) -> dict[str, object]:
    from phi3tune import DataSpec
    from phi3tune.data import prepare_data
    from phi3tune.data.build import default_num_proc
    from phi3tune.model import load_tokenizer

    tok = load_tokenizer(a.tokenizer)
    spec = DataSpec(source=str(a.file), max_seq_length=512, packing=a.packing, cache_dir=str(a.work / "cache"))
    t0 = time.perf_counter()
    data = prepare_data(spec, tok)
    took = time.perf_counter() - t0
    procs = default_num_proc(data.summary.examples, None)
    return {"rows": data.summary.examples, "packed_rows": data.summary.rows, "tokens": data.summary.tokens,
            "seconds": round(took, 1), "rows_per_s": round(data.summary.examples / took),
            "processes": procs, "rows_per_s_per_process": round(data.summary.examples / took / procs),
            **peak_rss_gb()}


def phase_run(a: argparse.Namespace, streaming: bool) -> dict[str, object]:
    from phi3tune import FineTuner
    from phi3tune.tiny import write_tiny_phi3

    model = a.work / "tiny-model"
    if not model.is_dir():
        from phi3tune.model import load_tokenizer

        write_tiny_phi3(model, tokenizer=load_tokenizer(a.tokenizer))
    first_step: list[float] = []
    ft = (FineTuner(str(model)).adapter(r=8).quantize(None)
          .data(source=str(a.file), max_seq_length=512, packing=a.packing, streaming=streaming,
                cache_dir=str(a.work / "cache"))
          .training(output_dir=str(a.work / "out"), max_steps=1, batch_size=4, grad_accum=1, save_strategy="no",
                    progress_bar=False, device="cpu", overwrite_output_dir=True, optimizer="adamw_torch"))
    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logging.getLogger("phi3tune").addHandler(Keep())
    logging.getLogger("phi3tune").setLevel(logging.INFO)
    ft.run(callbacks=[lambda _: first_step.append(time.perf_counter() - STARTED)])
    out: dict[str, object] = {"first_step_s": round(first_step[0], 1)}
    done = next((m for m in logged if m.startswith("data: tokenized")), None)
    if done:  # "data: tokenized N examples with P process(es) in T s into ..."
        words = done.split()
        n, procs, took = int(words[2]), int(words[5]), float(words[8])
        out.update(tokenize_s=took, processes=procs, rows_per_s=round(n / took),
                   rows_per_s_per_process=round(n / took / procs))
    return {**out, **peak_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tokenizer", default="../shared/models/phi3-mini-4k-instruct")
    ap.add_argument("--seed-file", default="../shared/data/alpaca1k_guanaco_text.jsonl")
    ap.add_argument("--work", default="/tmp/phi3tune-data-scale", type=Path)
    ap.add_argument("--phases", default="first,second,stream")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    a = ap.parse_args()
    a.file = a.work / f"rows-{a.rows}.jsonl"
    if a.phase:
        global MEMORY
        MEMORY = PeakMemory()
        result = {"prepare": phase_prepare, "first": lambda x: phase_run(x, False),
                  "second": lambda x: phase_run(x, False), "stream": lambda x: phase_run(x, True)}[a.phase](a)
        print("RESULT " + json.dumps(result), flush=True)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    if not a.file.is_file():
        make_rows(a.file, a.rows, Path(a.seed_file))
    print(f"# {a.rows:,} rows, {a.file.stat().st_size / 2**20:.0f} MiB, {os.cpu_count()} cores, packing={a.packing}")
    for phase in a.phases.split(","):
        if phase in ("prepare", "first"):  # cold: no prepared rows yet (the JSON's own datasets cache stays)
            shutil.rmtree(a.work / "cache", ignore_errors=True)
        cmd = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{phase} failed:\n{out.stderr[-3000:]}")
        print(f"{phase}: {line.removeprefix('RESULT ')}", flush=True)


if __name__ == "__main__":
    main()

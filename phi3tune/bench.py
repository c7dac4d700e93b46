"""Benchmark a run (real tokens/s, step time, peak device memory, MFU, padding) and estimate its memory.

``benchmark`` times optimizer steps after a warm-up with the device synchronized, and reads peak memory from
the *device* (used memory sampled in a thread), so paged optimizer state and allocator slack count, not only
PyTorch's allocator peak. ``estimate_memory`` predicts the peak from the config alone, before any weights load.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import threading
import time
from typing import Any

import torch

from .finetuner import MODES, FineTuner
from .loss import CE_CHUNK

GIB = 2**30
# Dense bf16 matmul throughput measured on the H200 we benchmark on (docs/performance.md).
PEAK_TFLOPS = {"H200": 808.0, "H100": 760.0}
# Saved activation elements per token per decoder layer = 14 x hidden + 5 x intermediate + 95, LoRA dropout on:
# fitted with saved-tensor hooks on seven CPU shapes (13.65 / 5.05 / 95; tests/test_bench.py re-measures it),
# and the same within 10% on the H200 under bf16 autocast (15.0 / 4.7, docs/performance.md).
_ACT_COEF = (14.0, 5.0, 95.0)
_NO_DROPOUT = 0.83  # share of the above left without LoRA dropout (cpu fit)
_COMPILED = 0.85  # compiled layers keep fewer intermediates (H200: 12.3 vs 14.0 GiB at equal batches)


def _dtype_bytes(name: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[name]


def _meta_model(ft: FineTuner) -> tuple[Any, Any]:
    """(preflight info, a weightless copy of the model): shapes without loading anything."""
    from transformers import AutoModelForCausalLM

    from .model import preflight_model

    info = preflight_model(ft.model, ft.trust_remote_code, need_weights=False)
    with torch.device("meta"):
        return info, AutoModelForCausalLM.from_config(info.config)


def estimate_memory(ft: FineTuner, device: str | None = None) -> dict[str, Any]:
    """Predict peak memory (bytes per component, and GiB in all) from specs and the model config only."""
    from torch import nn

    from .model import resolve_target_modules

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info, meta = _meta_model(ft)
    cfg = info.config
    t, d_spec, q = ft.train_spec, ft.data_spec, ft.quant
    mode = MODES[t.optimize_for]
    precision = t.precision if t.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    act_b = _dtype_bytes(precision)
    head = meta.get_output_embeddings()
    targets = set(resolve_target_modules(ft.adapter_spec, info.linear_layers))
    quantized = other = lora = 0
    for name, mod in meta.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head:
            n = mod.weight.numel()
            if q is None:
                other += n * act_b
            elif q.bits == 4:
                quantized += n // 2 + (n // 64) * (1 if q.double_quant else 4)
            else:
                quantized += n + mod.out_features * 4
            if name.rsplit(".", 1)[-1] in targets:
                lora += ft.adapter_spec.r * (mod.in_features + mod.out_features)
    linear_params = sum(m.weight.numel() for m in meta.modules() if isinstance(m, nn.Linear) and m is not head)
    rest = sum(p.numel() for p in meta.parameters()) - linear_params
    other += rest * (4 if (mode["upcast_frozen"] and q is not None) or precision == "fp32" else act_b)
    opt_state = 2 if "8bit" in t.optimizer.lower() else 8  # bytes of optimizer state per adapter weight
    adapter = lora * (4 + 4 + opt_state)
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    tokens = t.micro_batch_tokens or mode["micro_batch_tokens"] or t.batch_size * d_spec.max_seq_length
    a, b, c = _ACT_COEF
    per_layer = act_b * (a * d + b * ff + c) * (1.0 if ft.adapter_spec.dropout > 0 else _NO_DROPOUT)
    if device == "cuda" and (t.compile or (t.compile is None and mode["compile"] and d_spec.packing)):
        per_layer *= _COMPILED
    if t.gradient_checkpointing or mode["checkpointing"]:
        activations = tokens * (layers * d * act_b + per_layer)
    else:
        activations = tokens * layers * per_layer
    logits = min(tokens, CE_CHUNK) * cfg.vocab_size * (act_b + 4 + 4)
    context = int(0.5 * GIB) if device == "cuda" else 0
    parts = {"quantized_weights": quantized, "other_weights": other, "adapter_and_optimizer": adapter,
             "activations": int(activations), "logits_chunk": logits, "cuda_context": context}
    return {**parts, "total_gib": round(sum(parts.values()) / GIB, 3), "tokens_per_micro_batch": tokens,
            "lora_params": lora}


class _DeviceMemory:
    """Samples device-wide used memory in a thread; peak minus the level before the run started."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        free, total = torch.cuda.mem_get_info()
        self.base = total - free
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.interval)

    def __enter__(self) -> _DeviceMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return (self.peak - self.base) / GIB


def _useful_flops_per_token(ft: FineTuner) -> float:
    """4 x non-embedding parameters: forward 2N + backward input-gradients 2N (the base is frozen)."""
    _, meta = _meta_model(ft)
    n = sum(p.numel() for p in meta.parameters()) - meta.get_input_embeddings().weight.numel()
    return 4.0 * n


def benchmark(ft: FineTuner, steps: int = 20, warmup: int = 5, label: str | None = None) -> dict[str, Any]:
    """Run ``warmup + steps`` optimizer steps; report the timed ``steps`` as one JSON-ready dict."""
    cuda = torch.cuda.is_available() and ft.train_spec.device != "cpu"
    out_dir = tempfile.mkdtemp(prefix="phi3tune-bench-")
    ft = copy.copy(ft)  # the builder replaces specs, never mutates them: the caller's FineTuner stays as it was
    ft.training(max_steps=warmup + steps, save_strategy="no", logging_steps=10**6, progress_bar=False,
                output_dir=out_dir, overwrite_output_dir=True)
    times: list[float] = []
    events: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    def on_step(event: dict[str, Any]) -> None:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if event["step"] > warmup:
            times.append(now - last[0])
            events.append(event)
        last[0] = now

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        monitor: Any = _DeviceMemory()
    else:
        monitor = None
    started = time.perf_counter()
    if monitor is not None:
        with monitor:
            result = ft.run(callbacks=[on_step])
    else:
        result = ft.run(callbacks=[on_step])
    real = sum(e["real_tokens"] for e in events)
    # real tokens are counted over all ranks, batch tokens per rank
    batch = sum(e["batch_tokens"] for e in events) * int(os.environ.get("WORLD_SIZE", "1"))
    tok_s = real / sum(times) if times else 0.0
    report: dict[str, Any] = {
        "label": label or ft.train_spec.optimize_for, "optimize_for": ft.train_spec.optimize_for,
        "packing": ft.data_spec.packing, "batch_size": ft.train_spec.batch_size,
        "grad_accum": ft.train_spec.grad_accum, "max_seq_length": ft.data_spec.max_seq_length,
        "optimizer": ft.train_spec.optimizer, "attn": ft.attn_implementation or "auto",
        "steps": len(times), "warmup": warmup,
        "real_tokens_per_s": round(tok_s, 1),
        "median_step_s": round(sorted(times)[len(times) // 2], 4) if times else None,
        "padding_fraction": round(1 - real / max(1, batch), 4),
        "losses": [round(e["loss"], 4) for e in events],
        "total_s": round(time.perf_counter() - started, 1),
        "final_loss": result.losses[-1] if result.losses else None,
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        report.update(device=name, peak_device_gib=round(monitor.peak_gib, 3),
                      peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
        if peak:
            gpus = int(os.environ.get("WORLD_SIZE", "1"))  # tokens/s counts every rank; MFU is per GPU
            report["mfu"] = round(tok_s * _useful_flops_per_token(ft) / (peak * 1e12 * gpus), 4)
    return report


def add_arguments(p: Any) -> None:
    """The options of `phi3tune bench` (also `python -m phi3tune.bench`)."""
    from .cli import parse_assignment

    p.add_argument("config", metavar="CONFIG", help="a FineTuner.to_config() YAML/JSON file")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--estimate", action="store_true", help="only predict peak memory; load no weights")
    p.add_argument("--label", help="a name for this run in the JSON line")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   type=parse_assignment, help="override a config value, e.g. training.optimize_for=speed")
    p.add_argument("--out", help="also append the JSON line to this file")


def run_cli(args: Any) -> int:
    """Benchmark (or estimate) the config and print one JSON line."""
    from .cli import apply_overrides, read_config

    ft = FineTuner.from_config(apply_overrides(read_config(args.config), args.overrides))
    if args.estimate:
        report: dict[str, Any] = {"label": args.label, "estimate": estimate_memory(ft)}
    else:
        report = benchmark(ft, args.steps, args.warmup, args.label)
        report["estimate_gib"] = estimate_memory(ft)["total_gib"]
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="phi3tune bench", description=__doc__)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

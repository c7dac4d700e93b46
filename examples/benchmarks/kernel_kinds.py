"""GPU kernel time by kind (matmuls, attention, compiled fusions, ...): where a step's device time goes, for ours
and for a peer's run alike (profile_steps.py, peer_profile.py).

A kernel's kind comes from its name: cuBLAS' (nvjet, gemm, cutlass, xmma) are matmuls, flash / fmha ones attention,
``triton_`` ones inductor's compiled fusions, bitsandbytes' dequantization and optimizer kernels their own kinds,
copies and memsets memory traffic, torch's eager elementwise / reduction kernels theirs; any other kernel (a peer's
own Triton kernels, named by their function) is "other". With the step's matmul FLOPs the report also gives the
matmuls' rate, the number to set against the GPU's peak when asking how much faster a step could run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("memory", re.compile(r"^Memcpy|^Memset|copy_kernel|direct_cop", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|cublas|^sm\d\d_", re.I)),
    ("dequantize", re.compile(r"dequant", re.I)),
    ("optimizer", re.compile(r"kOptimizer|adam|multi_tensor_apply", re.I)),
    ("compiled", re.compile(r"^triton_")),
    ("eager elementwise", re.compile(r"elementwise|reduce_kernel|softmax|cunn_|index|scatter|gather|cat_", re.I)),
)


def kind_of(name: str) -> str:
    """The kind of the kernel called ``name`` (the first of ``KINDS`` whose pattern it matches; else "other")."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def device_kernels(events: Iterable[Any]) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of each GPU kernel among a profiler's ``events`` (not the GPU-side user annotations,
    which span kernels already counted)."""
    from torch.autograd import DeviceType

    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def busy_gaps(spans: list[tuple[float, float]], least_us: float) -> list[tuple[float, float]]:
    """The gaps of at least ``least_us`` between the union of ``spans`` (start, end): when no kernel ran."""
    out, end = [], None
    for s, e in sorted(spans):
        if end is not None and s - end >= least_us:
            out.append((end, s))
        end = e if end is None else max(end, e)
    return out


def busy_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``spans``: time some kernel ran, kernels on two streams at once counted once."""
    if not spans:
        return 0.0
    extent = max(e for _, e in spans) - min(s for s, _ in spans)
    return extent - sum(e - s for s, e in busy_gaps(spans, 0.0))


def by_kind(kernels: Iterable[tuple[str, float]]) -> dict[str, tuple[float, int]]:
    """(name, µs) of each kernel run -> {kind: (µs in all, runs)}, the largest first."""
    out: dict[str, tuple[float, int]] = {}
    for name, us in kernels:
        kind = kind_of(name)
        total, runs = out.get(kind, (0.0, 0))
        out[kind] = (total + us, runs + 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def kinds_report(kernels: Iterable[tuple[str, float]], steps: int, matmul_flops: float | None = None) -> str:
    """One line per kind: ms a step, its share of the kernel time, runs a step; with ``matmul_flops`` (the matmul
    FLOPs of the profiled steps) the matmuls' rate in TFLOP/s."""
    kinds = by_kind(kernels)
    total = sum(us for us, _ in kinds.values()) or 1.0
    lines = [f"GPU kernel time by kind, per step ({steps} steps):"]
    for kind, (us, runs) in kinds.items():
        rate = ""
        if kind == "matmul" and matmul_flops:
            rate = f"  {matmul_flops / (us * 1e-6) / 1e12:.0f} TFLOP/s on the step's matmul FLOPs"
        lines.append(f"{kind:18s} {us / 1e3 / steps:9.2f} ms {100 * us / total:5.1f}% {runs / steps:8.0f} runs{rate}")
    return "\n".join(lines) + "\n"


def matmul_flops_per_token(config: dict, rank: int) -> float:
    """A training step's matmul FLOPs a laid-out token for a Phi-3-family ``config`` (config.json's fields), every
    decoder linear with a rank-``rank`` LoRA adapter, the base frozen: the base's and the output head's forward and
    input gradients (2 + 2 FLOPs a weight), and each adapter's two products forward, their input gradients and
    their weight gradients (6 FLOPs a weight of A and B). Attention's own products are not counted (the attention
    kind times them)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    linears = [(h, h + 2 * kv * head), (h, h), (h, 2 * i), (i, h)]  # qkv_proj, o_proj, gate_up_proj, down_proj
    base = sum(n * m for n, m in linears)
    adapters = sum(rank * (n + m) for n, m in linears)
    per_layer = 4 * base + 6 * adapters
    return float(config["num_hidden_layers"] * per_layer + 4 * h * config["vocab_size"])

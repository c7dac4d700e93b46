"""Device, precision and dtype resolution: what "auto" means, in one place.

``training.precision`` ("auto", "bf16", "fp16", "fp32") picks the loop's autocast; ``quant.compute_dtype``
("auto" or a dtype name) the frozen base's matmul dtype. Training (the RunPlan), inference and the demo all
resolve them here, so "auto" is the same everywhere: bf16 where the device supports it, fp16 on older GPUs,
fp32 on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PRECISION_DTYPE: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``device`` ("auto", "cpu", "cuda") on this machine. A training run passes its rank on this host as
    accelerate's ``PartialState`` reports it (accelerate launch / torchrun), so each rank gets its own GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('training.device="cuda" but no CUDA device is visible; use "auto" or "cpu"')
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":  # without CUDA here this is a plan for a GPU elsewhere: assume a current one
        return bool(torch.cuda.is_bf16_supported()) if torch.cuda.is_available() else True
    return device.type == "cpu"


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" = bf16 where the device supports it, fp16 on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type == "cpu":
            return "fp32"
        return "bf16" if bf16_supported(device) else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError('training.precision="fp16" needs a GPU (fp16 autocast with a grad scaler); '
                          'on the CPU use "fp32", "bf16" or "auto"')
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(
            f'training.precision="bf16" but {device} has no bf16 support; use precision="fp16" or "auto"'
        )
    return precision


def resolve_compute_dtype(quant: Any, precision: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``quant.compute_dtype``, where "auto" follows the loop's precision."""
    name = quant.compute_dtype if quant is not None else "auto"  # QuantizationSpec declares it
    if name == "auto":
        return PRECISION_DTYPE[precision]
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and not bf16_supported(device):
        raise ConfigError(
            f'quant.compute_dtype="bfloat16" but {device} has no bf16 support; use "float16" or "auto"'
        )
    return dtype


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype of ``precision="auto"`` on ``device`` (what inference and the demo load a base in)."""
    return PRECISION_DTYPE[resolve_precision("auto", device)]

"""phi3tune: QLoRA fine-tuning for Microsoft Phi-3, on its own accelerate loop.

    from phi3tune import FineTuner
    result = FineTuner("microsoft/Phi-3-mini-4k-instruct").training(max_steps=100).run()

The public names are imported on first use (PEP 562), so ``import phi3tune`` and ``phi3tune --help`` do not
load torch, transformers or peft until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOME = {  # public name -> the module that defines it
    "benchmark": "bench", "estimate_memory": "bench", "plan_for": "bench",
    "PreparedData": "data", "prepare_dataset": "data", "register_format": "data", "registered_formats": "data",
    "CheckpointError": "errors", "ConfigError": "errors", "DataFormatError": "errors",
    "DataSourceError": "errors", "ModelSourceError": "errors", "OutputDirError": "errors",
    "Phi3TuneError": "errors", "TargetModulesError": "errors", "TrainingError": "errors",
    "TrainingInterrupted": "errors",
    "export_adapter": "export", "export_gguf": "gguf_export",
    "FineTuner": "finetuner", "RunResult": "finetuner",
    "HubError": "hub", "push_to_hub": "hub",
    "FineTunedModel": "inference", "load_finetuned": "inference", "merge_adapter": "inference",
    "RunPlan": "plan",
    "AdapterConfigSpec": "plugins", "DataPipelineSpec": "plugins", "QuantizationSpec": "plugins",
    "AdapterSpec": "specs", "DataSpec": "specs", "QuantSpec": "specs", "TrainSpec": "specs",
}

if TYPE_CHECKING:
    from .bench import benchmark, estimate_memory, plan_for
    from .data import PreparedData, prepare_dataset, register_format, registered_formats
    from .errors import (
        CheckpointError,
        ConfigError,
        DataFormatError,
        DataSourceError,
        ModelSourceError,
        OutputDirError,
        Phi3TuneError,
        TargetModulesError,
        TrainingError,
        TrainingInterrupted,
    )
    from .export import export_adapter
    from .finetuner import FineTuner, RunResult
    from .gguf_export import export_gguf
    from .hub import HubError, push_to_hub
    from .inference import FineTunedModel, load_finetuned, merge_adapter
    from .plan import RunPlan
    from .plugins import AdapterConfigSpec, DataPipelineSpec, QuantizationSpec
    from .specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then cached in the package namespace)."""
    if name not in _HOME:
        raise AttributeError(f"module 'phi3tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "AdapterConfigSpec",
    "AdapterSpec",
    "CheckpointError",
    "ConfigError",
    "DataFormatError",
    "DataPipelineSpec",
    "DataSourceError",
    "DataSpec",
    "FineTunedModel",
    "FineTuner",
    "HubError",
    "ModelSourceError",
    "OutputDirError",
    "Phi3TuneError",
    "PreparedData",
    "QuantSpec",
    "QuantizationSpec",
    "RunPlan",
    "RunResult",
    "TargetModulesError",
    "TrainSpec",
    "TrainingError",
    "TrainingInterrupted",
    "benchmark",
    "estimate_memory",
    "export_adapter",
    "export_gguf",
    "load_finetuned",
    "merge_adapter",
    "plan_for",
    "prepare_dataset",
    "push_to_hub",
    "register_format",
    "registered_formats",
]

"""phi3tune: QLoRA fine-tuning for Microsoft Phi-3, on its own accelerate loop.

    from phi3tune import FineTuner
    result = FineTuner("microsoft/Phi-3-mini-4k-instruct").training(max_steps=100).run()
"""

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

__version__ = "0.1.0"

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

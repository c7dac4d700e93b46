"""Plugin specs for tests/test_plugins.py, importable by path (plugin_specs:FP4Quant) like a user's package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phi3tune import QuantSpec

CALLS: list[str] = []


class FP4Quant(QuantSpec):
    """A subclass: always FP4, and records that the builder asked it."""

    def quantization_config(self, compute_dtype: Any) -> Any:
        CALLS.append("quantization_config")
        return QuantSpec(**{**self.model_dump(), "quant_type": "fp4"}).quantization_config(compute_dtype)


@dataclass
class QkvOnlyAdapter:
    """Not a phi3tune class at all: any object with target_modules and peft_config()."""

    r: int = 4
    target_modules: Any = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def peft_config(self, target_modules: list[str]) -> Any:
        from peft import LoraConfig

        CALLS.append("peft_config")
        return LoraConfig(r=self.r, lora_alpha=8, target_modules=[t for t in target_modules if t == "qkv_proj"],
                          lora_dropout=0.0, task_type="CAUSAL_LM")


class NotASpec:
    pass

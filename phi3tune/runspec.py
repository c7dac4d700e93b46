"""RunSpec: one run as a frozen value, what the builder holds when ``run()`` starts.

``FineTuner`` is the mutable builder users chain; ``FineTuner.freeze()`` turns it into a ``RunSpec``, and from
then on the plan, every phase of the run and the bench read this value, never the builder. The builder replaces
a spec on every call and never changes one in place, so a RunSpec keeps what it was made with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ._preflight import merge_spec
from .data.fingerprint import describe_in_memory
from .plugins import AdapterConfigSpec, DataPipelineSpec, QuantizationSpec, spec_to_config
from .specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec

IN_MEMORY = "in-memory:"  # how to_config writes rows given in memory (data/sources.py refuses to load it)


@dataclass(frozen=True)
class RunSpec:
    """The model and the four specs of one run, with the two model-loading switches."""

    model: str
    quant: QuantizationSpec | None  # None: LoRA on an unquantized base
    adapter: AdapterConfigSpec
    data: DataPipelineSpec
    train: TrainSpec
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def with_training(self, **kwargs: Any) -> RunSpec:
        """The same run with these training fields changed (validated like ``FineTuner.training``)."""
        return replace(self, train=merge_spec(TrainSpec, self.train, None, kwargs, object, "training"))

    def to_config(self) -> dict[str, Any]:
        """The whole run as plain data (YAML/JSON-ready): ``FineTuner.to_config``."""
        data = spec_to_config(self.data, DataSpec)
        for key in ("source", "eval_source"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):  # rows: a fingerprint, never the rows themselves
                data[key] = IN_MEMORY + describe_in_memory(getattr(self.data, key))
        return {
            "model": self.model,
            "trust_remote_code": self.trust_remote_code,
            "attn_implementation": self.attn_implementation,
            "quant": spec_to_config(self.quant, QuantSpec) if self.quant is not None else None,
            "adapter": spec_to_config(self.adapter, AdapterSpec),
            "data": data,
            "training": spec_to_config(self.train, TrainSpec),
        }

"""FineTuner: the builder that composes the four specs and runs them.

``run()`` freezes the builder into a ``RunSpec`` and hands it to ``execute``, the recipe: check everything that
user input can get wrong (device, output directory, model config, target layers, data) and resolve the plan
before a single weight is loaded or a file written, then claim the output dir, build the model, fit, save. Each
phase is a function of ``pipeline.py``; the loop is ``loop.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _preflight
from ._isolation import allocator_for, leaves_process_as_found
from ._preflight import merge_spec
from .dequantized import restore_4bit
from .errors import ConfigError
from .files import read_config, write_config
from .logs import console
from .loop import StopFlag, Trainer
from .lora_dropout import make_plain
from .pipeline import build_model, check_run, claim_output_dir, save_outputs
from .plan import RunPlan
from .plugins import (
    AdapterConfigSpec,
    DataPipelineSpec,
    QuantizationSpec,
    spec_from_config,
)
from .runspec import RunSpec
from .specs import DEFAULT_MODEL, AdapterSpec, DataSpec, QuantSpec, TrainSpec
from .streamed_base import unstream_base


@dataclass
class RunResult:
    """What a run produced. ``model``/``tokenizer`` are the trained objects still in memory: ``model`` is a plain
    PEFT model in eval mode (PEFT's own LoRA dropout and scale, its 4-bit layers on the device, as the plan may have
    changed them for the run), ready to ``generate`` or to train again after ``.train()``."""

    adapter_dir: Path
    output_dir: Path
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    config: dict[str, Any]
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    plan: RunPlan | None = None  # how the run executed (also output_dir/phi3tune_plan.json)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]


class FineTuner:
    """Fine-tune a Phi-3 checkpoint with (Q)LoRA. Chain .quantize/.adapter/.data/.training, then .run()."""

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_MODEL, *, quant: QuantSpec | None = None,
                 adapter: AdapterSpec | None = None, data: DataSpec | None = None,
                 training: TrainSpec | None = None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None, quantized: bool = True) -> None:
        self.model = _preflight.model_argument(model)
        quantized = _preflight.as_bool(quantized, "quantized")
        # a built-in spec, a subclass, or a plugin implementing the protocol (plugins.py)
        self.quant: QuantizationSpec | None = _preflight.spec_argument(QuantSpec, quant, QuantizationSpec,
                                                                       "quant") if quantized else None
        self.adapter_spec: AdapterConfigSpec = _preflight.spec_argument(AdapterSpec, adapter, AdapterConfigSpec,
                                                                        "adapter")
        self.data_spec: DataPipelineSpec = _preflight.spec_argument(DataSpec, data, DataPipelineSpec, "data")
        self.train_spec: TrainSpec = _preflight.spec_argument(TrainSpec, training, object, "training")
        self.trust_remote_code = _preflight.as_bool(trust_remote_code, "trust_remote_code")
        self.attn_implementation = _preflight.attn_implementation(attn_implementation)

    # ------------------------------------------------------------------ builder
    def quantize(self, spec: QuantSpec | bool | None = True, **kwargs: Any) -> FineTuner:
        """Set the quantization; ``quantize(None)`` trains plain LoRA on an unquantized base."""
        if spec is None or spec is False:
            if kwargs:
                raise ConfigError("quantize(None) takes no other arguments")
            self.quant = None
        else:
            self.quant = merge_spec(QuantSpec, self.quant, None if spec is True else spec, kwargs,
                                    QuantizationSpec, "quant")
        return self

    def adapter(self, spec: AdapterSpec | None = None, **kwargs: Any) -> FineTuner:
        self.adapter_spec = merge_spec(AdapterSpec, self.adapter_spec, spec, kwargs, AdapterConfigSpec,
                                       "adapter")
        return self

    def data(self, spec: DataSpec | None = None, **kwargs: Any) -> FineTuner:
        self.data_spec = merge_spec(DataSpec, self.data_spec, spec, kwargs, DataPipelineSpec, "data")
        return self

    def training(self, spec: TrainSpec | None = None, **kwargs: Any) -> FineTuner:
        self.train_spec = merge_spec(TrainSpec, self.train_spec, spec, kwargs, object, "training")
        return self

    # ------------------------------------------------------------------ config round trip
    def freeze(self) -> RunSpec:
        """The run as it stands, a frozen value: what ``run()``, the plan and the bench read."""
        return RunSpec(self.model, self.quant, self.adapter_spec, self.data_spec, self.train_spec,
                       self.trust_remote_code, self.attn_implementation)

    def to_config(self) -> dict[str, Any]:
        """The whole run as plain data (YAML/JSON-ready)."""
        return self.freeze().to_config()

    def save_config(self, path: str | os.PathLike[str]) -> Path:
        """Write to_config() as YAML (.yaml/.yml) or JSON (.json)."""
        return write_config(self.to_config(), path)

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | dict[str, Any]) -> FineTuner:
        """Build from a to_config() dict or a YAML/JSON file of one."""
        if not isinstance(config, dict):
            config = read_config(config)
        known = {"model", "trust_remote_code", "attn_implementation", "quant", "adapter", "data", "training"}
        unknown = set(config) - known
        if unknown:
            raise ConfigError(f"config: unknown key(s) {sorted(unknown, key=str)}; use only the known keys "
                              f"{sorted(known)}")
        _preflight.check_sections(config)
        quant = config.get("quant", {})
        return cls(
            config.get("model", DEFAULT_MODEL),
            quant=spec_from_config("quant", quant, QuantSpec, QuantizationSpec) if quant is not None else None,
            quantized=quant is not None,
            adapter=spec_from_config("adapter", config.get("adapter"), AdapterSpec, AdapterConfigSpec),
            data=spec_from_config("data", config.get("data"), DataSpec, DataPipelineSpec),
            training=spec_from_config("training", config.get("training"), TrainSpec, object),
            trust_remote_code=config.get("trust_remote_code", False),
            attn_implementation=config.get("attn_implementation"),
        )

    def __repr__(self) -> str:
        return f"FineTuner({self.model!r}, quant={self.quant!r}, adapter={self.adapter_spec!r}, " \
               f"data={self.data_spec!r}, training={self.train_spec!r})"

    # ------------------------------------------------------------------ run
    def run(self, *, resume: bool | str = False, overwrite: bool | None = None,
            callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> RunResult:
        """Train and save. ``resume=True`` continues from the newest complete checkpoint in output_dir.

        ``callbacks`` are called after every optimizer step with a dict of that step's numbers
        (step, loss, grad_norm, lr, real_tokens, trained_tokens, batch_tokens).
        """
        return execute(self.freeze(), resume=resume, overwrite=overwrite, callbacks=callbacks)


@leaves_process_as_found
def execute(run: RunSpec, *, resume: bool | str = False, overwrite: bool | None = None,
            callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> RunResult:
    """The recipe of ``FineTuner.run``, one phase a line, on the frozen ``run``."""
    overwrite = run.train.overwrite_output_dir if overwrite is None else overwrite
    config = run.to_config()
    with console(logging.INFO):  # the data summary and the plan reach a user who set up no logging (logs.py)
        checked = check_run(run, resume, overwrite, config)  # user-input checks, plan, data: nothing written
        claim_output_dir(run, checked, config, overwrite, resume)  # now the output dir is ours: config and plan
        with allocator_for(checked.plan.expandable_segments):  # CUDA memory without fragments, as the plan says
            model = build_model(run, checked)  # weights load, as the plan says
            trainer = Trainer(model, checked.tokenizer, checked.data, run.train, checked.plan, callbacks)
            with StopFlag() as stop:  # Ctrl-C / SIGTERM from here on: the final adapter is still saved
                metrics = trainer.fit(checked.resume_from, stop)
                adapter_dir = save_outputs(run, trainer, checked)  # final adapter and loss.png
    model.eval()
    make_plain(model)  # PEFT's own LoRA dropout again, as a model loaded for more training would have it
    restore_4bit(model)  # the 4-bit layers again, where the plan dequantized them for the run (dequantized.py)
    unstream_base(model)  # and their weights on the device again, where it streamed them (streamed_base.py)
    if stop.signal:
        raise trainer.interrupted_after_training(stop.signal, adapter_dir)
    return RunResult(adapter_dir, checked.output_dir, trainer.history, metrics, config, model, checked.tokenizer,
                     checked.plan)

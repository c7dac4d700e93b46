"""FineTuner: the builder that composes the four specs and runs them.

``run()`` checks everything that user input can get wrong (device, output directory, model config, target
layers, data) before a single weight is loaded, then loads, trains and saves.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _preflight
from . import checkpoints as ckpt
from ._isolation import leaves_process_as_found
from .errors import ConfigError
from .inference import META_NAME
from .loss import CE_CHUNK
from .specs import DEFAULT_MODEL, AdapterSpec, DataSpec, QuantSpec, TrainSpec

log = logging.getLogger("phi3tune")
IN_MEMORY = "in-memory:"


# What TrainSpec.optimize_for switches. None changes which tokens are trained or how the loss is weighted.
MODES: dict[str, dict[str, Any]] = {
    # the classic recipe's layout: padded batches, frozen non-quantized weights upcast to fp32
    "balanced": {"padding_free": False, "upcast_frozen": True, "checkpointing": False, "compile": False,
                 "micro_batch_tokens": None},
    # no padding at all (each micro-batch is one row, examples fenced by position ids), frozen weights in bf16,
    # compiled decoder layers (CUDA), each step re-cut into micro-batches of 4096 tokens
    "speed": {"padding_free": True, "upcast_frozen": False, "checkpointing": False, "compile": True,
              "micro_batch_tokens": 4096},
    # speed's layout plus activation checkpointing, micro-batches as the user split them
    "memory": {"padding_free": True, "upcast_frozen": False, "checkpointing": True, "compile": True,
               "micro_batch_tokens": None},
}


def check_distributed(spec: TrainSpec, quant: QuantSpec | None, compute_dtype: Any) -> None:
    """FSDP shards flat parameters of one dtype: 4-bit weights must be stored in the compute dtype."""
    if spec.distributed != "fsdp" or quant is None:
        return
    import torch

    storage = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        quant.quant_storage)
    if quant.bits != 4 or storage != compute_dtype:
        raise ConfigError(
            f'training.distributed="fsdp" with a quantized base needs quant.bits=4 and quant.quant_storage equal '
            f"to the compute dtype ({str(compute_dtype).removeprefix('torch.')}); got bits={quant.bits}, "
            f'quant_storage="{quant.quant_storage}". Set quant_storage="{str(compute_dtype).removeprefix("torch.")}"'
        )


def default_attention(device: Any, fenced: bool) -> str | None:
    """FlexAttention for packed / padding-free batches on CUDA: its document mask skips the blocks between
    examples (SDPA computes them, then masks them: 1.6x slower measured on the H200). SDPA everywhere else."""
    import importlib.util

    if device.type == "cuda" and fenced and importlib.util.find_spec("torch.nn.attention.flex_attention"):
        return "flex_attention"
    return None


@dataclass
class RunResult:
    """What a run produced. ``model``/``tokenizer`` are the trained objects still in memory."""

    adapter_dir: Path
    output_dir: Path
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    config: dict[str, Any]
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]


def _merge(cls: Any, current: Any, spec: Any, kwargs: dict[str, Any]) -> Any:
    base = _preflight.spec_argument(cls, spec) if spec is not None else current
    values = _preflight.spec_values(base) if base is not None else {}
    return cls(**{**values, **kwargs})


class FineTuner:
    """Fine-tune a Phi-3 checkpoint with (Q)LoRA. Chain .quantize/.adapter/.data/.training, then .run()."""

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_MODEL, *, quant: QuantSpec | None = None,
                 adapter: AdapterSpec | None = None, data: DataSpec | None = None,
                 training: TrainSpec | None = None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None, quantized: bool = True) -> None:
        self.model = _preflight.model_argument(model)
        quantized = _preflight.as_bool(quantized, "quantized")
        self.quant: QuantSpec | None = _preflight.spec_argument(QuantSpec, quant) if quantized else None
        self.adapter_spec = _preflight.spec_argument(AdapterSpec, adapter)
        self.data_spec = _preflight.spec_argument(DataSpec, data)
        self.train_spec = _preflight.spec_argument(TrainSpec, training)
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
            self.quant = _merge(QuantSpec, self.quant, None if spec is True else spec, kwargs)
        return self

    def adapter(self, spec: AdapterSpec | None = None, **kwargs: Any) -> FineTuner:
        self.adapter_spec = _merge(AdapterSpec, self.adapter_spec, spec, kwargs)
        return self

    def data(self, spec: DataSpec | None = None, **kwargs: Any) -> FineTuner:
        self.data_spec = _merge(DataSpec, self.data_spec, spec, kwargs)
        return self

    def training(self, spec: TrainSpec | None = None, **kwargs: Any) -> FineTuner:
        self.train_spec = _merge(TrainSpec, self.train_spec, spec, kwargs)
        return self

    # ------------------------------------------------------------------ config round trip
    def to_config(self) -> dict[str, Any]:
        """The whole run as plain data (YAML/JSON-ready)."""
        data = self.data_spec.model_dump()
        for key in ("source", "eval_source"):
            value = data[key]
            if value is not None and not isinstance(value, (str, list)):
                data[key] = f"{IN_MEMORY}{type(value).__name__}({len(value)} rows)"
        return {
            "model": self.model,
            "trust_remote_code": self.trust_remote_code,
            "attn_implementation": self.attn_implementation,
            "quant": self.quant.model_dump() if self.quant is not None else None,
            "adapter": self.adapter_spec.model_dump(),
            "data": data,
            "training": self.train_spec.model_dump(),
        }

    def save_config(self, path: str | os.PathLike[str]) -> Path:
        """Write to_config() as YAML (.yaml/.yml) or JSON (.json)."""
        import yaml

        path = Path(path)
        cfg = self.to_config()
        text = json.dumps(cfg, indent=2) if path.suffix == ".json" else yaml.safe_dump(cfg, sort_keys=False)
        path.write_text(text)
        return path

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | dict[str, Any]) -> FineTuner:
        """Build from a to_config() dict or a YAML/JSON file of one."""
        import yaml

        if not isinstance(config, dict):
            path = Path(config)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; write one with FineTuner.save_config")
            config = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
            if not isinstance(config, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping with model/quant/adapter/data/"
                                  "training keys")
        known = {"model", "trust_remote_code", "attn_implementation", "quant", "adapter", "data", "training"}
        unknown = set(config) - known
        if unknown:
            raise ConfigError(f"config: unknown key(s) {sorted(unknown, key=str)}; use only the known keys "
                              f"{sorted(known)}")
        _preflight.check_sections(config)
        for key in ("source", "eval_source"):
            src = (config.get("data") or {}).get(key)
            if isinstance(src, str) and src.startswith(IN_MEMORY):
                raise ConfigError(f"config data.{key} was an in-memory dataset ({src}); set it to a file or hub name")
        quant = config.get("quant", {})
        return cls(
            config.get("model", DEFAULT_MODEL),
            quant=QuantSpec(**quant) if quant is not None else None,
            quantized=quant is not None,
            adapter=AdapterSpec(**(config.get("adapter") or {})),
            data=DataSpec(**(config.get("data") or {})),
            training=TrainSpec(**(config.get("training") or {})),
            trust_remote_code=config.get("trust_remote_code", False),
            attn_implementation=config.get("attn_implementation"),
        )

    def __repr__(self) -> str:
        return f"FineTuner({self.model!r}, quant={self.quant!r}, adapter={self.adapter_spec!r}, " \
               f"data={self.data_spec!r}, training={self.train_spec!r})"

    # ------------------------------------------------------------------ run
    @leaves_process_as_found
    def run(self, *, resume: bool | str = False, overwrite: bool | None = None,
            callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> RunResult:
        """Train and save. ``resume=True`` continues from the newest complete checkpoint in output_dir.

        ``callbacks`` are called after every optimizer step with a dict of that step's numbers
        (step, loss, grad_norm, lr, real_tokens, trained_tokens, batch_tokens).
        """
        from .data import prepare_data
        from .loop import Trainer
        from .model import (
            attach_adapter,
            check_modules_to_save,
            load_base_model,
            load_tokenizer,
            preflight_model,
            resolve_compute_dtype,
            resolve_device,
            resolve_precision,
            resolve_target_modules,
        )

        t, d = self.train_spec, self.data_spec
        overwrite = t.overwrite_output_dir if overwrite is None else overwrite
        config = self.to_config()
        # ---- checks that need no weights
        _preflight.check_specs(d, t)
        device = resolve_device(t.device)
        precision = resolve_precision(t.precision, device)
        compute_dtype = resolve_compute_dtype(self.quant or QuantSpec(), precision, device)
        check_distributed(t, self.quant, compute_dtype)
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu")  # one process, or a rank of accelerate launch / torchrun
        out = Path(t.output_dir)
        ckpt.check_output_dir(out, overwrite, resume, config)
        resume_from = ckpt.find_resume_checkpoint(out, resume) if resume and not overwrite else None
        info = preflight_model(self.model, self.trust_remote_code)
        _preflight.check_model(info, self.attn_implementation, self.trust_remote_code)
        targets = resolve_target_modules(self.adapter_spec, info.linear_layers)
        check_modules_to_save(self.adapter_spec, info.module_names)
        max_pos = getattr(info.config, "max_position_embeddings", None)
        if max_pos and d.max_seq_length > max_pos:
            raise ConfigError(f"data.max_seq_length={d.max_seq_length} exceeds the model's context of {max_pos} "
                              f"tokens; use max_seq_length <= {max_pos}")
        tokenizer = load_tokenizer(info.source, self.trust_remote_code)
        from accelerate.utils import set_seed

        set_seed(t.seed)
        data = prepare_data(d, tokenizer, t.seed)
        if t.progress_bar and state.is_main_process:
            from .data import padding_fraction
            from .loop import EpochSampler

            order = list(EpochSampler(len(data.train), t.seed))
            lengths = [len(x) for x in data.train["input_ids"]]
            print(data.summary.render(padding_fraction(lengths, order, t.batch_size)))
        # ---- heavy work from here on; every rank has checked output_dir before the main one writes to it
        state.wait_for_everyone()
        if state.is_main_process:
            if overwrite or (resume and resume_from is None):  # nothing to resume: a killed run's logs start over
                ckpt.clear_run(out)
            ckpt.remove_partial(out)  # temp dirs of a save that a kill interrupted
            out.mkdir(parents=True, exist_ok=True)
            self.save_config(out / ckpt.CONFIG_NAME)
        state.wait_for_everyone()
        mode = MODES[t.optimize_for]
        attn = self.attn_implementation or default_attention(device, mode["padding_free"] or d.packing)
        base = load_base_model(info, self.quant, compute_dtype, device, self.trust_remote_code,
                               t.gradient_checkpointing or mode["checkpointing"], attn,
                               upcast_frozen=mode["upcast_frozen"])
        set_seed(t.seed)
        model = attach_adapter(base, self.adapter_spec, targets)
        # Compiled layers specialise on shapes: only packed rows give the few shapes that keep it fast
        # (unpacked padding-free rows change length every step and recompile; measured 18x slower).
        if t.compile or (t.compile is None and mode["compile"] and device.type == "cuda" and d.packing):
            peft_model: Any = model
            for layer in peft_model.get_base_model().model.layers:
                layer.compile()
        trainer = Trainer(model, tokenizer, data, t, precision, device, padding_free=mode["padding_free"],
                          callbacks=callbacks, micro_batch_tokens=t.micro_batch_tokens or mode["micro_batch_tokens"],
                          ce_chunk=512 if t.optimize_for == "memory" else CE_CHUNK)
        trainer.setup()
        if resume_from is None and resume:
            log.info("resume: no complete checkpoint in %s, starting from step 0", out)
        metrics = trainer.train(resume_from)
        adapter_dir = out / ckpt.FINAL_DIR
        if trainer.accelerator.is_main_process:
            self._save_final(trainer.accelerator.unwrap_model(trainer.loss_module).model, tokenizer, adapter_dir)
            from .plot import plot_history

            plot_history(trainer.history, out / "loss.png")
        trainer.accelerator.wait_for_everyone()
        model.eval()
        return RunResult(adapter_dir, out, trainer.history, metrics, config, model, tokenizer)

    def _save_final(self, model: Any, tokenizer: Any, adapter_dir: Path) -> None:
        """Adapter + tokenizer + our metadata, written to a temp dir then renamed into place."""
        with ckpt.atomic_dir(adapter_dir, "the final adapter") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            meta = {"base_model": model.peft_config["default"].base_model_name_or_path,
                    "quant": self.quant.model_dump() if self.quant is not None else None,
                    "trust_remote_code": self.trust_remote_code}
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1))

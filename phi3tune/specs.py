"""The four declarative specs a run is made of.

Each spec is plain data (pydantic, extra fields forbidden) so that a run round-trips through YAML/JSON
and a typo in a field name fails at once instead of being ignored. Defaults are the classic Phi-3 QLoRA
recipe (NF4, r=64/alpha=16/dropout=0.1, seq 512, 4 x 4 sequences a step, paged AdamW, lr 2e-4, cosine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_DATASET = "timdettmers/openassistant-guanaco"

DataFormat = Literal["auto", "text", "alpaca", "messages", "prompt_completion", "guanaco"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


class QuantSpec(_Spec):
    """How the frozen base is quantized by bitsandbytes."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description='"auto": bf16 where supported, else fp16 on GPU, fp32 on CPU'
    )
    double_quant: bool = False
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="storage dtype of packed 4-bit weights; FSDP needs it to match the model dtype"
    )


class AdapterSpec(_Spec):
    """The LoRA adapter, handed to PEFT's LoraConfig."""

    r: int = Field(64, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description='"auto": every linear layer but the output head'
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(not isinstance(s, str) or not s for s in v)):
            raise ValueError('give "auto" or a non-empty list of layer names, e.g. ["qkv_proj", "o_proj"]')
        return v


class DataSpec(_Spec):
    """Where examples come from and how they become tokens."""

    source: Any = Field(
        DEFAULT_DATASET,
        description="hub dataset name, local .json/.jsonl/.csv/.parquet file or directory, "
        "a datasets.Dataset, or a list of dicts",
    )
    split: str = "train"
    text_field: str = "text"
    format: DataFormat = "auto"
    train_on: Literal["auto", "all", "completion"] = "auto"
    max_seq_length: int = Field(512, ge=8)
    packing: bool = False
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    eval_source: Any = None
    system_prompt: str | None = None

    @field_validator("source", "eval_source")
    @classmethod
    def _source_kind(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.field_name == "source":
            raise ValueError("give a data source: a file, directory or hub name, a datasets.Dataset or a list of dicts")
        if v is None or isinstance(v, (str, Path, list)):
            if isinstance(v, str) and not v.strip():
                raise ValueError("an empty string is not a data source; give a file, directory or hub name")
            if isinstance(v, list) and any(not isinstance(row, dict) for row in v):
                raise ValueError("a list source must hold dicts (one per example)")
            return str(v) if isinstance(v, Path) else v
        if type(v).__name__ in {"Dataset", "DatasetDict"}:
            return v
        raise ValueError(
            f"unsupported source of type {type(v).__name__}; give a path, hub name, datasets.Dataset "
            "or list of dicts"
        )

    @model_validator(mode="after")
    def _eval_choice(self) -> DataSpec:
        if self.eval_fraction and self.eval_source is not None:
            raise ValueError("set eval_fraction or eval_source, not both")
        return self


class TrainSpec(_Spec):
    """The training loop."""

    output_dir: str = "./results"
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(4, gt=0)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "paged_adamw_32bit"
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(100, gt=0, description="None = run by num_epochs")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_grad_norm: float | None = Field(1.0, gt=0, description="None: no clipping (norm still logged)")
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, gt=0)
    save_strategy: Literal["epoch", "steps", "no"] = "epoch"
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(None, gt=0, description="keep only the newest K checkpoints")
    eval_steps: int | None = Field(None, gt=0)
    seed: int = 42
    overwrite_output_dir: bool = False
    optimize_for: Literal["balanced", "speed", "memory"] = Field(
        "balanced", description="speed/memory trade-off; the loss is the same in every mode (docs/performance.md)"
    )
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="speed/memory modes: re-cut each step's examples into micro-batches of at most "
        "this many tokens (same examples and loss per step; trades memory for speed)")
    compile: bool | None = Field(None, description="torch.compile each decoder layer; None = on for the speed "
                                 "and memory modes with packing on CUDA, off otherwise")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="with several processes: ddp (each GPU holds the 4-bit base) or fsdp (shards it; "
        "needs quant.quant_storage = the compute dtype); auto = ddp")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True

    @model_validator(mode="after")
    def _save_steps(self) -> TrainSpec:
        if self.save_strategy == "steps" and self.save_steps is None:
            raise ValueError('save_strategy="steps" needs save_steps, e.g. save_steps=50')
        return self

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

"""The four declarative specs a run is made of.

Each spec is plain data (pydantic, extra fields forbidden) so that a run round-trips through YAML/JSON
and a typo in a field name fails at once instead of being ignored. Defaults are the classic Phi-3 QLoRA
recipe (NF4, r=64/alpha=16/dropout=0.1, seq 512, 4 x 4 sequences a step, paged AdamW, lr 2e-4, cosine).

Each spec also has the one method the builder calls (the protocols in plugins.py): QuantSpec.quantization_config,
AdapterSpec.peft_config, DataSpec.prepare; TrainSpec.create_optimizer / create_scheduler. Subclass a spec and
override its method to plug in your own (docs/extending.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_DATASET = "timdettmers/openassistant-guanaco"

if TYPE_CHECKING:
    import torch

AdapterInit = Literal["default", "gaussian", "orthogonal", "olora", "pissa", "loftq"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


class QuantSpec(_Spec):
    """How the frozen base is quantized by bitsandbytes."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4, QLoRA) or 8 (LLM.int8)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 or fp4")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description='"auto": bf16 where supported, else fp16 on GPU, fp32 on CPU'
    )
    double_quant: bool = Field(False, description="quantize the quantization constants too (~0.4 bit/param)")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="storage dtype of packed 4-bit weights; FSDP needs it to match the model dtype"
    )

    def quantization_config(self, compute_dtype: torch.dtype) -> Any:
        """The BitsAndBytesConfig the base is loaded with; ``compute_dtype`` is the resolved dtype."""
        import torch
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
        )


class AdapterSpec(_Spec):
    """The LoRA adapter, handed to PEFT's LoraConfig."""

    r: int = Field(64, gt=0, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="scaling numerator: alpha / r (alpha / sqrt(r) with rsLoRA)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="LoRA dropout, in [0, 1)")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description='"auto": every linear layer but the output head'
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train: none, all, lora_only")
    use_rslora: bool = Field(False, description="rank-stabilized scaling")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full and saved with the "
                                              'adapter, e.g. ["lm_head"]')
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (PEFT use_dora)")
    init: AdapterInit = Field("default", description="PEFT init_lora_weights; which work on which base: "
                              "phi3tune.adapters.INITS")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(not isinstance(s, str) or not s for s in v)):
            raise ValueError('give "auto" or a non-empty list of layer names, e.g. ["qkv_proj", "o_proj"]')
        return v

    def peft_config(self, target_modules: list[str]) -> Any:
        """PEFT's LoraConfig for the resolved layer names; PEFT's own refusals become a ConfigError."""
        from .adapters import lora_config

        return lora_config(self, target_modules)


class DataSpec(_Spec):
    """Where examples come from and how they become tokens."""

    source: Any = Field(
        DEFAULT_DATASET,
        description="hub dataset name, local .json/.jsonl/.csv/.parquet file or directory, "
        "a datasets.Dataset, or a list of dicts",
    )
    split: str = Field("train", description="split of a hub or directory dataset")
    text_field: str = Field("text", description="column holding the text (formats text and guanaco)")
    format: str = Field("auto", description='"auto", a built-in format, a register_format() name or '
                        '"module:function"')
    train_on: Literal["auto", "all", "completion"] = Field(
        "auto", description='which tokens train: "auto" (the completion for chat formats, all for text), "all", '
        '"completion"')
    max_seq_length: int = Field(512, ge=8, description="tokens per example; longer ones are truncated")
    packing: bool = Field(False, description="pack examples into rows, with no attention across examples")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this share of source for eval")
    eval_source: Any = Field(None, description="a separate eval set (same kinds as source); not with "
                             "eval_fraction")
    system_prompt: str | None = Field(None, description="a system message for chat examples that have none")
    num_proc: int | None = Field(None, gt=0, description="processes that tokenize; None = the cores this process "
                                 "may use, at most 8 (one for small datasets)")
    cache_dir: str | None = Field(None, description="where prepared rows are cached; None = phi3tune/ under the "
                                  "datasets cache (HF_DATASETS_CACHE)")
    streaming: bool = Field(False, description="read, tokenize and pack the source while training instead of "
                            "before (sources larger than RAM or disk); needs training.max_steps (docs/data.md)")

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
        if self.streaming and self.eval_fraction:
            raise ValueError("streaming=True cannot split off eval_fraction (a stream has no length to split); "
                             "give eval_source (it is streamed too), or set streaming=False")
        return self

    @field_validator("format")
    @classmethod
    def _format_named(cls, v: str) -> str:
        if not v.strip():  # registered names are checked when the data is prepared: a plugin may register later
            raise ValueError('give "auto", a built-in format or a register_format() name')
        return v

    @property
    def has_eval(self) -> bool:
        """Whether ``prepare`` returns eval data (``plugins.DataFacts``)."""
        return self.eval_source is not None or bool(self.eval_fraction)

    def prepare(self, tokenizer: Any, seed: int) -> Any:
        """Load, split, tokenize, mask and pack: the PreparedData the loop trains on."""
        from .data import prepare_data

        return prepare_data(self, tokenizer, seed)


class TrainSpec(_Spec):
    """The training loop."""

    output_dir: str = Field("./results", description="where the adapter, checkpoints, metrics.jsonl and "
                            "loss.png go; a directory holding a run needs resume or overwrite")
    batch_size: int = Field(4, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(4, gt=0, description="micro-batches per optimizer step")
    optimizer: str = Field("paged_adamw_32bit", description="a legacy name, any torch.optim / bitsandbytes.optim "
                           'class name, or "module:Class"')
    optimizer_kwargs: dict[str, Any] = Field({}, description="extra optimizer keywords")  # pydantic copies it
    loraplus_lr_ratio: float | None = Field(None, ge=1, description="LoRA+: lora_B learns at this x learning_rate")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    lr_scheduler: str = Field("cosine", description="a transformers SchedulerType name")
    lr_scheduler_kwargs: dict[str, Any] = Field({}, description="e.g. min_lr_rate, num_decay_steps")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    num_epochs: float = Field(1, gt=0, description="passes over the data, when max_steps is None")
    max_steps: int | None = Field(100, gt=0, description="None = run by num_epochs")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description='"auto": bf16 where supported, fp16 on older GPUs, fp32 on the CPU')
    max_grad_norm: float | None = Field(1.0, gt=0, description="None: no clipping (norm still logged)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    logging_steps: int = Field(10, gt=0, description="a progress line and a metrics.jsonl entry every N steps")
    save_strategy: Literal["epoch", "steps", "no"] = Field("epoch", description="when to write a resumable "
                                                           "checkpoint: epoch, steps, no")
    save_steps: int | None = Field(None, gt=0, description='a checkpoint every N steps (save_strategy="steps")')
    save_total_limit: int | None = Field(None, gt=0, description="keep only the newest K checkpoints")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps; with eval data the loss is "
                                   "also taken before the first step and at the end")
    seed: int = Field(42, description="data order, dropout, adapter init")
    overwrite_output_dir: bool = Field(False, description="replace a previous run's artifacts in output_dir")
    optimize_for: Literal["auto", "speed", "memory", "balanced"] = Field(
        "auto", description='how the run executes (the RunPlan); "auto": on CUDA the fastest plan whose predicted '
        'peak fits the free memory (speed, else memory), on the CPU "balanced" (the classic padded layout). The '
        "loss is the same in every mode (docs/performance.md)")
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="speed/memory plans: re-cut each step's examples into micro-batches of at most "
        "this many tokens (default: speed and memory 4096; optimize_for='auto' picks a whole step (<= 8192) / "
        "4096 / 2048 / 1024 to fit the card; same examples and loss per step; trades memory for speed)")
    compile: bool | None = Field(None, description="torch.compile each decoder layer; None = on for the speed "
                                 "and memory plans on CUDA, off otherwise")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="with several processes: ddp (each GPU holds the 4-bit base) or fsdp (shards it; "
        "needs quant.quant_storage = the compute dtype); auto = ddp")
    collective_timeout_s: float = Field(
        900, gt=0, description="with several processes: a collective (all-reduce, all-gather, barrier) that waits "
        "longer than this raises a TrainingError naming the likely cause instead of hanging (docs/distributed.md)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto, cpu or cuda")
    progress_bar: bool = Field(True, description="a tqdm bar; off: one progress line per logging step")
    report_to: str | list[str] | None = Field(
        None, description='experiment trackers fed the metrics.jsonl numbers: "tensorboard", "wandb", "mlflow", '
        '"trackio" (or a list); None = none (docs/tracking.md)')

    @field_validator("output_dir")
    @classmethod
    def _home(cls, v: str) -> str:
        """``~`` means the home directory, as in a shell (not a directory literally named ``~``)."""
        import os

        return os.path.expanduser(v)

    @model_validator(mode="after")
    def _save_steps(self) -> TrainSpec:
        if self.save_strategy == "steps" and self.save_steps is None:
            raise ValueError('save_strategy="steps" needs save_steps, e.g. save_steps=50')
        return self

    @model_validator(mode="after")
    def _optimizer_and_schedule(self) -> TrainSpec:
        from .optim import check_optimizer, check_scheduler

        check_optimizer(self.optimizer, self.optimizer_kwargs, self.weight_decay)
        check_scheduler(self.lr_scheduler, self.lr_scheduler_kwargs)
        return self

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def create_optimizer(self, model: Any, params: list[Any], device: torch.device) -> Any:
        """The optimizer over the trainable ``params`` of ``model`` (optim.py)."""
        from .optim import build_optimizer

        return build_optimizer(self.optimizer, params, self.learning_rate, self.weight_decay, device,
                               self.optimizer_kwargs, model, self.loraplus_lr_ratio)

    def create_scheduler(self, optimizer: Any, warmup_steps: int, total_steps: int) -> Any:
        """The learning-rate schedule, stepped once per optimizer step."""
        from .optim import build_scheduler

        return build_scheduler(self.lr_scheduler, optimizer, warmup_steps, total_steps, self.lr_scheduler_kwargs)

"""The phases of ``FineTuner.run``, one function each, in the order they run:

Each takes the frozen ``RunSpec`` (runspec.py), never the builder.

1. ``check_run``: everything user input can get wrong (device, output dir, model config, target layers), the
   RunPlan (``plan.py``), then the tokenizer and the data (``tokenize_data``): no weights loaded, nothing written;
2. ``claim_output_dir``: only now is anything written (the config and the plan);
3. ``build_model``: weights load as the plan says, the adapter is attached;
4. (``loop.Trainer(...).fit()`` trains;)
5. ``save_outputs``: the final adapter (``save_final``) and the loss curve.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoints as ckpt
from .batching import fit_lengths_to_data, step_lengths
from .compiled_layers import compile_layers, symbolic_from_the_first_length
from .data import PreparedData
from .distributed import process_group_kwargs
from .errors import ConfigError, DataFormatError
from .files import FINAL_DIR, LOSS_PLOT_NAME, META_NAME, METRICS_NAME, TRACKER_DIR, atomic_dir, write_config
from .files import PLAN_NAME as PLAN_NAME
from .loop import Trainer
from .lora_dropout import make_recomputable
from .model import ModelInfo
from .plan import FIT_FRACTION, RunPlan
from .plan_search import resolve_plan, whole_step_tokens
from .plugins import DataFacts, QuantFacts, QuantizationSpec, facts, spec_to_config
from .recompute import set_checkpointing
from .runspec import RunSpec
from .shards import check_optimizer_shardable
from .specs import QuantSpec, TrainSpec
from .tracking import check_report_to, tracker_names

log = logging.getLogger("phi3tune")
TRUNCATION_WARNING = 0.05  # share of examples cut by data.max_seq_length above which the run warns


@dataclass
class CheckedRun:
    """What the checks found: everything a run needs before loading weights."""

    plan: RunPlan
    info: ModelInfo
    targets: list[str]
    tokenizer: Any
    data: PreparedData
    output_dir: Path
    resume_from: Path | None
    state: Any  # accelerate's PartialState: this process's rank
    fingerprints: dict[str, str]  # what the run trains on (checkpoints.fingerprints), kept in the manifest


def check_distributed(spec: TrainSpec, quant: QuantizationSpec | None, compute_dtype: torch.dtype,
                      device_type: str = "cuda") -> None:
    """FSDP shards parameters of one dtype: 4-bit weights must be stored in the compute dtype. An optimizer that
    needs a norm over each whole parameter cannot step shards (shards.py). Both refused before anything loads."""
    if spec.distributed != "fsdp":
        return
    check_optimizer_shardable(spec.optimizer, spec.optimizer_kwargs, device_type)
    if quant is None:
        return
    dtype = str(compute_dtype).removeprefix("torch.")
    q = facts(quant, QuantFacts)
    if q.bits != 4 or q.quant_storage != dtype:
        storage = f'"{q.quant_storage}"' if q.quant_storage else f"not declared by {type(quant).__name__}"
        raise ConfigError(
            f'training.distributed="fsdp" with a quantized base needs quant.bits=4 and quant.quant_storage equal '
            f'to the compute dtype ({dtype}); got bits={q.bits}, quant_storage {storage}. '
            f'Set quant_storage="{dtype}"')


def check_fits(plan: RunPlan) -> None:
    """Refuse a run whose weights, adapter and optimizer state alone (no activation yet) exceed the free device
    memory: no micro-batch size can help, and loading would end in an out-of-memory error minutes later. Warn where
    a plan the user named (not ``auto``, which only takes what fits) predicts a peak past ``auto``'s margin."""
    from .memory import GIB, fixed_bytes, load_bytes

    if plan.device_memory_gib is None:
        return
    need = max(fixed_bytes(plan.memory), load_bytes(plan.memory)) / GIB  # a streamed base loads on the device first
    if need <= plan.device_memory_gib:
        if plan.optimize_for != "auto" and plan.predicted_peak_gib > FIT_FRACTION * plan.device_memory_gib:
            log.warning(
                "training.optimize_for=%r predicts a peak of %.1f GiB where %s has %.1f GiB free: it may run out of "
                'memory. optimize_for="auto" (the default) takes the fastest plan that fits; "memory" checkpoints '
                "activations; lower training.micro_batch_tokens or data.max_seq_length", plan.optimize_for,
                plan.predicted_peak_gib, plan.device, plan.device_memory_gib)
        return
    per_gpu = "per GPU " if plan.sharded else ""
    raise ConfigError(
        f"this model needs {need:.1f} GiB {per_gpu}for its weights, adapter and optimizer state before any "
        f"activation, and {plan.device} has {plan.device_memory_gib:.1f} GiB free. Shard it over several GPUs "
        '(training.distributed="fsdp" under torchrun / accelerate launch divides it by their number; '
        "phi3tune.estimate_memory(ft, processes=N) shows the share), or lower adapter.r, use "
        'optimizer="paged_adamw_8bit", or a larger GPU')


def check_run(run: RunSpec, resume: bool | str, overwrite: bool, config: dict[str, Any]) -> CheckedRun:
    """Device, output directory, model config, target layers, the plan and the data: no weights loaded, nothing
    written. The data is prepared here too, so that a bad row fails the run before the output dir is touched."""
    from accelerate import PartialState

    from . import _preflight
    from .precision import resolve_device

    t = run.train
    data_facts = facts(run.data, DataFacts)
    _preflight.check_specs(data_facts, t)
    kind = resolve_device(t.device)
    # one process, or a rank of accelerate launch / torchrun; collectives that wait longer raise (distributed.py)
    state = PartialState(cpu=kind.type == "cpu", **process_group_kwargs(t.collective_timeout_s))
    device = resolve_device(t.device, state.local_process_index)
    if data_facts.streaming and state.num_processes > 1:
        raise ConfigError(f"data.streaming=True runs on one process; this run has {state.num_processes}. Prepare "
                          "the data map-style (streaming=False: tokenized once into the cache) for several GPUs")
    check_report_to(t.report_to)  # accelerate would silently drop a tracker whose package is missing
    out = Path(t.output_dir)
    ckpt.check_output_dir(out, overwrite, resume, config)
    resume_from = ckpt.find_resume_checkpoint(out, resume) if resume else None
    if resume and resume_from is None:
        log.warning("resume=True: no complete checkpoint in %s, so the run starts from step 0", out)
    if resume_from is not None:
        ckpt.check_resume_step(resume_from, t.max_steps)
    info, targets = inspect_model(run, device)
    assert info.shape is not None
    plan = resolve_plan(run, info.shape, targets, device, processes=state.num_processes)  # precision, dtype, peak
    check_distributed(t, run.quant, plan.dtype, device.type)
    check_fits(plan)
    tokenizer, data = tokenize_data(run, info, plan, state.is_main_process)
    if not data.streaming:  # unpacked rows: a whole step and the fixed lengths fitted to what the data makes
        plan = whole_steps_of_the_data(run, info, targets, device, plan, data.train, state.num_processes)
        plan = fit_lengths_to_data(plan, data.train, t.sequences_per_step, t.seed)
    log.info(plan.describe())
    prints = ckpt.fingerprints(tokenizer, data)
    if resume_from is not None:
        ckpt.check_fingerprints(out, prints)
    return CheckedRun(plan, info, targets, tokenizer, data, out, resume_from, state, prints)


def whole_steps_of_the_data(run: RunSpec, info: ModelInfo, targets: list[str], device: torch.device, plan: RunPlan,
                            train: Any, processes: int) -> RunPlan:
    """``auto``'s plan once the data is known: a whole-step micro-batch sized to the data's longest step
    (plan_search.whole_step_tokens) predicts less memory than one sized to what a step could hold, so it may now
    fit this card, or fit it with less padding; and the steps' tokens say what checkpointing by length costs.
    Chosen again among the same candidates; other plans stay as they are."""
    t = run.train
    if plan.optimize_for != "auto" or plan.mode != "speed" or t.micro_batch_tokens:
        return plan
    steps = step_lengths(train, t.sequences_per_step, t.seed)
    largest = max(steps or (), default=None)
    if largest is None or whole_step_tokens(run, largest) >= whole_step_tokens(run):
        return plan
    assert info.shape is not None
    log.info("data: a step holds at most %s tokens (first epoch), of the %s it could: whole-step micro-batches "
             "are sized to that", f"{largest:,}", f"{whole_step_tokens(run):,}")
    return resolve_plan(run, info.shape, targets, device, processes=processes, steps=steps)


def inspect_model(run: RunSpec, device: torch.device) -> tuple[ModelInfo, list[str]]:
    """The model's config (no weights): its layers for the adapter, its context for the data."""
    from . import _preflight
    from .adapters import check_init
    from .model import check_modules_to_save, preflight_model, resolve_target_modules

    info = preflight_model(run.model, run.trust_remote_code)
    _preflight.check_model_loads(info, run.attn_implementation, run.trust_remote_code)
    targets = resolve_target_modules(run.adapter, info.linear_layers)
    check_modules_to_save(run.adapter, info.module_names)
    check_init(run.adapter, run.quant, device.type)
    run.adapter.peft_config(targets)  # PEFT's own refusals, before any weights load
    max_pos = getattr(info.config, "max_position_embeddings", None)
    max_len = run.data.max_seq_length
    if max_pos and max_len > max_pos:
        raise ConfigError(f"data.max_seq_length={max_len} exceeds the model's context of {max_pos} "
                          f"tokens; use max_seq_length <= {max_pos}")
    return info, targets


def tokenize_data(run: RunSpec, info: ModelInfo, plan: RunPlan, main_process: bool) -> tuple[Any, PreparedData]:
    """Tokenizer and tokenized data; the data summary goes to the log (logs.py: who shows it)."""
    from accelerate.utils import set_seed

    from .batching import first_epoch_padding
    from .model import load_tokenizer

    t = run.train
    tokenizer = load_tokenizer(info.source, run.trust_remote_code)
    set_seed(t.seed)
    try:
        data = run.data.prepare(tokenizer, t.seed)  # the DataPipelineSpec protocol (plugins.py)
    except DataFormatError as exc:  # a row-level message ("column 'text' must hold text"): say whose row
        if "data." in str(exc):
            raise
        source = getattr(run.data, "source", None)
        where = repr(source) if isinstance(source, (str, Path)) else f"(a {type(source).__name__})"
        raise DataFormatError(f"data.source {where}: {exc}") from exc
    if t.eval_steps and data.eval is None:  # a plugin spec that does not declare has_eval (plugins.DataFacts)
        raise ConfigError(f"training.eval_steps={t.eval_steps} but {type(run.data).__name__}.prepare returned no eval "
                          "data; return eval examples (PreparedData.from_examples(train, eval)) or set "
                          "training.eval_steps=None to train without evaluation")
    if data.streaming:
        log.info("data: streaming format=%s train_on=%s (rows are read, tokenized and packed as training asks "
                 "for them)", data.summary.format, data.summary.train_on)
    elif t.progress_bar and main_process:
        padding = None if plan.padding_free else first_epoch_padding(data.train, t.batch_size, t.seed)
        log.info(data.summary.render(padding))
    summary = data.summary
    if main_process and summary.truncated > TRUNCATION_WARNING * summary.examples:
        log.warning("data: %d of %d examples (%.1f%%) are longer than data.max_seq_length=%d and were cut (a cut "
                    "answer is trained without its end); raise data.max_seq_length or shorten the examples",
                    summary.truncated, summary.examples, 100 * summary.truncated / max(1, summary.examples),
                    run.data.max_seq_length)
    return tokenizer, data


def claim_output_dir(run: RunSpec, checked: CheckedRun, config: dict[str, Any], overwrite: bool,
                     resume: bool | str) -> None:
    """Every rank has checked output_dir before the main one writes to it: the config and the plan."""
    out, state = checked.output_dir, checked.state
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite or (resume and checked.resume_from is None):  # nothing to resume: a killed run's logs start over
            ckpt.clear_run(out)  # only what the manifest lists: phi3tune's own files
        ckpt.remove_partial(out)  # temp dirs of a save that a kill interrupted
        out.mkdir(parents=True, exist_ok=True)
        # runs/ is ours only if we create it: another tool's runs/ gets our tracker files but is never deleted
        tracker = tracker_names(run.train.report_to) and not (out / TRACKER_DIR).exists()
        ckpt.record(out, ckpt.CONFIG_NAME, PLAN_NAME, METRICS_NAME, *([TRACKER_DIR] if tracker else []),
                    fingerprints=checked.fingerprints)
        write_config(config, out / ckpt.CONFIG_NAME)
        (out / PLAN_NAME).write_text(json.dumps(checked.plan.to_dict(), indent=1))
    state.wait_for_everyone()


def build_model(run: RunSpec, checked: CheckedRun) -> Any:
    """Load the base as the plan says, attach the adapter, compile the decoder layers if the plan says so."""
    from accelerate.utils import set_seed

    from .adapters import apply_init
    from .dequantized import dequantize_base
    from .model import attach_adapter, load_base_model
    from .streamed_base import stream_base

    plan = checked.plan
    where = torch.device("cpu" if plan.shard_from_cpu else plan.device)  # FSDP moves each rank's shards there
    torch_checkpoints = plan.checkpointing and not plan.recompute_in_graph  # torch.utils.checkpoint's, not ours
    base = load_base_model(checked.info, run.quant, plan.dtype, where, run.trust_remote_code,
                           torch_checkpoints, plan.attn_implementation, upcast_frozen=plan.upcast_frozen)
    set_seed(run.train.seed)  # the adapter's initialisation does not depend on what loading drew
    model: Any = attach_adapter(base, run.adapter, checked.targets)
    apply_init(model, run.adapter, checked.info.source)
    if plan.dequantized_base:  # the frozen 4-bit weights dequantized once, where the card has room (dequantized.py)
        dequantize_base(model, plan.dtype)
    if plan.dequantized_layers:  # or the first layers' alone (a benchmark's knob)
        for layer in _decoder(model).layers[:plan.dequantized_layers]:
            dequantize_base(layer, plan.dtype)
    if plan.compile:  # graphs for the plan's micro-batch lengths (the loop builds them up front)
        # The first layer's input would otherwise be the only one without grad: a second graph per length, and
        # 2 x 4 graphs reach dynamo's recompile limit, after which layers silently run eager (measured: 3.7x slower)
        model.get_base_model().enable_input_require_grads()
        # hashed LoRA dropout masks: recomputed in backward, not saved (lora_dropout.py); the loop keys them
        make_recomputable(model, torch.device(plan.device))
        compile_layers(_decoder(model).layers, plan.compile_settings(), dynamic=plan.dynamic_lengths,  # 4-bit
                       recompute_in_graph=plan.recompute_in_graph)  # matmuls in the graph
        if plan.dynamic_lengths:  # each graph family compiled once, symbolic from the first length
            symbolic_from_the_first_length(_decoder(model))
    if plan.checkpointing:  # only as many (first) layers as the memory needs: in their own graphs, or by torch's
        for i, layer in enumerate(_decoder(model).layers):
            set_checkpointing(layer, i < plan.checkpoint_layers)
    if plan.streamed_base:  # last: it wraps each layer's call as compiled and checkpointed above
        stream_base(_decoder(model).layers, torch.device(plan.device), plan.resident_layers)
    return model


def _decoder(model: Any) -> Any:
    """The PEFT model's decoder (the transformers model's ``model``: its layers, embedding and rotary tables)."""
    return model.get_base_model().model


def write_adapter_meta(adapter_dir: Path, meta: dict[str, Any]) -> None:
    """phi3tune.json beside the adapter: the base and quantization it was trained with (load_finetuned reads it)."""
    (adapter_dir / META_NAME).write_text(json.dumps(meta, indent=1))


def save_final(run: RunSpec, model: Any, tokenizer: Any, adapter_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter + tokenizer + our metadata, written to a temp dir then renamed into place. ``state_dict``: the
    adapter gathered from every rank's shard (FSDP), else the model's own parameters."""
    with atomic_dir(adapter_dir, "the final adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        meta = {"base_model": model.peft_config["default"].base_model_name_or_path,
                "quant": spec_to_config(run.quant, QuantSpec) if run.quant is not None else None,
                "trust_remote_code": run.trust_remote_code}
        write_adapter_meta(tmp, meta)


def save_outputs(run: RunSpec, trainer: Trainer, checked: CheckedRun) -> Path:
    """The main process writes the final adapter and loss.png; every rank waits for them. Returns the adapter.
    Under FSDP every rank first gathers the adapter from the shards (a collective)."""
    from .plot import plot_history

    adapter_dir = checked.output_dir / FINAL_DIR
    gathered = trainer.full_adapter_state()
    if trainer.is_main_process:
        ckpt.record(checked.output_dir, FINAL_DIR, LOSS_PLOT_NAME)
        save_final(run, trainer.trained_model(), checked.tokenizer, adapter_dir, gathered)
        plot_history(trainer.history, checked.output_dir / LOSS_PLOT_NAME)
    trainer.wait_for_everyone()
    return adapter_dir

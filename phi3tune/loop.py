"""The training loop: our own, on accelerate. ``Trainer(...)`` sets everything up, ``fit()`` trains.

One optimizer step = up to ``grad_accum`` micro-batches. We count the trained tokens of the whole step first
(across micro-batches and ranks), then back-propagate each micro-batch's *summed* loss divided by that count:
the accumulated gradient is exactly the gradient of the mean loss over every trained token of the step, so
batch 4 x accum 1 and batch 1 x accum 4 train identically. We use ``accelerator.no_sync`` rather than
``accelerator.accumulate`` because the latter assumes every step has ``grad_accum`` micro-batches and scales
each by 1/grad_accum; an epoch's short last step would then be mis-weighted.

Which micro-batches make up a step is ``batching.optimizer_steps``; where the numbers go is ``metrics.Metrics``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.distributed.tensor import DTensor

from . import checkpoints as ckpt
from . import distributed, flat_steps, late_read, lora_dropout, optim, shards, tracking
from ._isolation import frozen_heap
from .batching import Batch, EpochSampler, MicroBatcher, Position, StepsAhead, count_steps, loaders, optimizer_steps
from .checkpoint_lengths import length_checkpointing
from .compiled_layers import graph_room, warm_up_positions
from .data import PreparedData
from .errors import CheckpointError, Say, TrainingInterrupted, hint
from .files import CONFIG_NAME
from .late_read import Pending
from .loss import TokenLoss, loss_inputs, mean_loss
from .metrics import Metrics, StepCallback, StepResult
from .offload import offloader_for
from .plan import RunPlan
from .specs import TrainSpec
from .stop import StopFlag

log = logging.getLogger("phi3tune")
_MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # RunPlan.precision -> accelerate's mixed_precision

__all__ = ["EpochSampler", "StepResult", "StopFlag", "Trainer"]


class Trainer:
    """Trains an already-built PEFT model on prepared data, as the plan says. Ready to ``fit()`` once built."""

    @distributed.collective_errors
    def __init__(self, model: Any, tokenizer: Any, data: PreparedData, spec: TrainSpec, plan: RunPlan,
                 callbacks: list[StepCallback] | None = None) -> None:
        from accelerate import Accelerator

        self.model, self.tokenizer, self.spec, self.plan = model, tokenizer, spec, plan
        self.pad_id = int(tokenizer.pad_token_id)
        self.output_dir = Path(spec.output_dir)
        self.pos = Position()
        self.saved: dict[int, Path | None] = {}  # step -> checkpoint written at it (None on other ranks)
        device = torch.device(plan.device)
        fsdp = self._fsdp_plugin()
        if fsdp is not None:  # before any forward: the gathered 4-bit weights must stay traceable
            distributed.keep_quant_state_on_gathered_weights(model)
        self.accelerator = acc = Accelerator(mixed_precision=_MIXED[plan.precision], cpu=device.type == "cpu",
                                             fsdp_plugin=fsdp, kwargs_handlers=distributed.ddp_kwargs(plan.ddp),
                                             **tracking.accelerator_kwargs(spec.report_to, self.output_dir))
        distributed.use_fsdp_on_cpu(acc, fsdp)
        self.metrics = Metrics(acc, self.output_dir, spec.model_dump(), spec.progress_bar, callbacks)

        self.stream = data.train if data.streaming else None  # StreamRows: positioned by _restore, never skipped
        loader, eval_loader = loaders(data.train, data.eval, plan, spec.batch_size, spec.seed, self.pad_id,
                                      streaming=data.streaming)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = spec.create_optimizer(model, self.params, device)  # TrainSpec's hook: optim.py
        # inductor's options, for the whole run
        self.compile_options = plan.compile_settings()["options"]
        graphs = plan.compile and bool(self.compile_options.get("triton.cudagraphs"))
        self.warm_up_rounds = 2 if graphs else 1  # CUDA graphs: a graph's first call runs, its second records
        longest = plan.position_cap if plan.varlen_bounds else None
        loss = TokenLoss(model, plan.ce_chunk, graphs, offloader_for(plan, model), longest_example=longest,
                         checkpoints=length_checkpointing(plan.checkpoint_lengths, plan.checkpoint_layers, model))
        self.loss_module, self.optimizer = acc.prepare(loss, optimizer)
        self.params = [p for p in self.loss_module.parameters() if p.requires_grad]  # FSDP: the sharded ones
        self.sharded = distributed.is_sharded(self.loss_module)
        if self.sharded:  # bitsandbytes cannot step DTensors: it steps this rank's local shards (shards.py)
            shards.step_local_shards(self.optimizer)
        # else bitsandbytes steps each group's parameters as one flat buffer (flat_steps.py); None where it can't
        self.flat = None if self.sharded else flat_steps.step_flat(self.optimizer, self.loss_module)
        self.dropout_key = lora_dropout.find_key(model)  # hashed LoRA dropout masks: keyed per micro-batch
        # Batches stay on the CPU until a step is laid out and its tokens counted there: reading a count off the
        # GPU would stall the launch queue once per micro-batch. _to_device moves them (pinned, non-blocking).
        self.loader = acc.prepare_data_loader(loader, device_placement=False)
        # per rank once prepared; a stream's length is unknown (preflight: streaming needs max_steps)
        self.loader_len = None if data.streaming else len(self.loader)
        self.steps_per_epoch, self.total_steps = count_steps(self.loader_len or 1, spec.grad_accum, spec.max_steps,
                                                             spec.num_epochs)
        self.scheduler = spec.create_scheduler(optimizer, math.ceil(spec.warmup_ratio * self.total_steps),
                                               self.total_steps)
        self.eval_loader = None if eval_loader is None else acc.prepare_data_loader(eval_loader,
                                                                                     device_placement=False)
        # FSDP: every rank runs as many micro-batches as the rank with the most (batching.equal_count)
        # a step's counts travel on the CPU (gloo): reading them off the GPU would wait for it once per step
        self.host_group = distributed.host_group(acc, spec.collective_timeout_s)
        self.batcher = MicroBatcher.of(plan, self.pad_id, distributed.largest_count(self.loss_module, self.host_group))

    def _fsdp_plugin(self) -> Any:
        """FSDP for bases that do not fit one GPU: every decoder layer its own unit (distributed.fsdp_plugin)."""
        if self.spec.distributed != "fsdp":
            return None
        return distributed.fsdp_plugin(self.model)

    # ---------------------------------------------------------------- what the run reads afterwards
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metrics.history

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def trained_model(self) -> Any:
        """The PEFT model without the distributed wrappers (what save_pretrained writes)."""
        return self.accelerator.unwrap_model(self.loss_module).model

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """FSDP: the whole adapter gathered from every rank's shard (a collective: call it on every rank)."""
        return distributed.full_adapter_state(self.accelerator, self.loss_module)

    # ---------------------------------------------------------------- fit
    @distributed.collective_errors
    def fit(self, resume_from: Path | None = None, stop: StopFlag | None = None) -> dict[str, Any]:
        """Train up to ``total_steps`` (from ``resume_from``'s position if given); the run's final numbers.
        ``stop``: the caller's StopFlag, when it keeps handling signals after fit (through the final save)."""
        try:
            with graph_room(self.plan, self.compile_options):  # warm-up, step-0 eval and training build graphs
                return self._fit(resume_from, stop)
        finally:  # a sweep of runs in one launched process would otherwise keep one gloo group per run
            distributed.release_host_group(self.host_group)

    def _fit(self, resume_from: Path | None, stop: StopFlag | None) -> dict[str, Any]:
        if resume_from is not None:
            self._restore(resume_from)
        s = self.spec
        self.loss_module.train()  # before compiling: graphs are specialised on train/eval mode
        self._compile_fixed_shapes()
        if self.pos.step == 0 and self.eval_loader is not None:  # the held-out loss before training: the curve's start
            rng = ckpt.rng_state()  # evaluating draws no dropout, but its loader may draw a seed
            self.evaluate()
            ckpt.set_rng_state(rng)
        self.metrics.start(self.pos.step, self.total_steps)
        # a resumed stream needs no skipping: ``StreamRows.resume`` put it at the checkpoint's row already
        skip = self.accelerator.skip_first_batches if self.stream is None else lambda loader, n: loader
        with nullcontext(stop) if stop is not None else StopFlag() as stop, frozen_heap():
            steps = StepsAhead(optimizer_steps(self.loader, self.pos, self.total_steps, s.grad_accum, self.batcher,
                                               skip))
            pending: Pending | None = None  # read late: the step before this one, its numbers not read yet
            for pos, micro in steps:
                self.pos = pos  # counts this step already: a checkpoint written while it is handled resumes after it
                if micro is None:  # between epochs, before the next epoch's loader starts
                    self._settle(pending)
                    pending = None
                    if s.save_strategy == "epoch":
                        self.save_checkpoint()
                    continue
                queued = self._train_step(micro, steps.fetch)
                self._settle(pending)
                pending = queued
                if self.plan.read_late and not self._due(pos.step, stop):
                    continue  # nothing of this step needs its numbers or its weights now: read them next step
                self._settle(pending)
                pending = None
                if self._eval_due(pos.step) and pos.step != self.total_steps:  # the last: the final eval instead
                    self.evaluate()
                if self._save_due(pos.step):
                    self.save_checkpoint()
                if stop.signal and pos.step < self.total_steps:  # after the last step: the final save instead
                    self._interrupted(stop.signal)
            self._settle(pending)
            self.metrics.close_bar()
            final = self.evaluate() if self.eval_loader is not None else {}
        return self.metrics.finish(self.pos.step, final)

    def _due(self, step: int, stop: StopFlag) -> bool:
        """Something at this step needs its numbers or its weights: an eval, a checkpoint, a stop, the run's end."""
        return step == self.total_steps or bool(stop.signal) or self._eval_due(step) or self._save_due(step)

    def _eval_due(self, step: int) -> bool:
        return bool(self.spec.eval_steps and step % self.spec.eval_steps == 0)

    def _save_due(self, step: int) -> bool:
        s = self.spec
        return bool(s.save_strategy == "steps" and s.save_steps and step % s.save_steps == 0)

    def _settle(self, pending: Pending | None) -> None:
        """Read a queued step's numbers (late_read.read: non-finite ones stop the run) and hand them on: the step's
        callbacks and, when due, its log line."""
        if pending is None:
            return
        result = replace(late_read.read(pending, self.output_dir, self.plan.precision), done_event=pending.done)
        pos, s = pending.pos, self.spec
        self.metrics.step_done(pos.step, result, pending.lr)
        if pos.step % s.logging_steps == 0 or pos.step == self.total_steps:
            epoch = pos.epoch + (pos.loader_batches / self.loader_len if self.loader_len else 0)
            self.metrics.log_train(pos.step, epoch, pending.lr, result.grad_norm)

    def _interrupted(self, signal_name: str) -> NoReturn:
        """Save (unless this step is saved already: decided the same way on every rank, save has barriers)."""
        step = self.pos.step
        path = self.saved[step] if step in self.saved else self.save_checkpoint()
        self.metrics.close_bar()
        config = self.output_dir / CONFIG_NAME
        how = Say(f".run(resume=True) on the same FineTuner, or FineTuner.from_config('{config}').run(resume=True)",
                  f"`phi3tune train {config} --resume`")
        raise TrainingInterrupted(f"{signal_name}: stopped after step {step} of {self.total_steps} and saved {path}",
                                  str(path), hint(". Resume with {how}", how=how))

    def interrupted_after_training(self, signal_name: str, adapter_dir: Path) -> TrainingInterrupted:
        """A signal came after the last step: training and the final save finished first; say so."""
        return TrainingInterrupted(
            f"{signal_name}: arrived after the last step ({self.pos.step} of {self.total_steps}); the run finished "
            f"first and its final adapter is saved in {adapter_dir}", str(adapter_dir))

    # ---------------------------------------------------------------- one optimizer step
    def _to_device(self, b: Batch) -> Batch:
        dev = self.accelerator.device
        return {k: v.to(dev, non_blocking=True) for k, v in b.items() if k != "num_real_tokens"}

    def _train_step(self, micro: list[Batch], prepare_next: Callable[[], None]) -> Pending:
        """One optimizer step over the micro-batches of ``micro`` (``self.pos`` is its position). Once its passes
        are queued, ``prepare_next`` lays out the next step's batches while the device runs them. Read at once, the
        step then waits for the device once, for the loss and the gradient norm together, and steps the optimizer
        if both are finite; read late (late_read.py), it steps the optimizer first and leaves the numbers pending."""
        acc, started = self.accelerator, time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        counts = torch.tensor([sum(int(b["trained_idx"].numel()) for b in micro),  # CPU tensors: no device sync
                               sum(int(b["num_real_tokens"]) for b in micro)])
        counts = distributed.sum_on_host(counts, self.host_group)  # trained and real tokens of the step, all ranks
        n_tokens, real = int(counts[0]), int(counts[1])
        scale = acc.num_processes / max(1, n_tokens)  # DDP averages over ranks; undo that, divide by all tokens
        loss_sum = torch.zeros((), device=acc.device)
        for i, cpu_batch in enumerate(micro):
            b = self._to_device(cpu_batch)
            if self.dropout_key is not None:  # the same masks after a resume: a function of the step
                self.dropout_key.fill_(lora_dropout.micro_batch_key(self.spec.seed, acc.process_index,
                                                                    self.pos.step, i))
            sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(self.loss_module)
            with sync:
                part = self.loss_module(*loss_inputs(b))
                acc.backward(part * scale)
            loss_sum += part.detach().float()
        if acc.num_processes > 1:
            loss_sum = acc.reduce(loss_sum, "sum")
        norm = acc.clip_grad_norm_(self.params, self.spec.max_grad_norm or float("inf"))
        if isinstance(norm, DTensor):  # FSDP's norm of sharded gradients: the same value on every rank
            norm = norm.full_tensor()
        late = self.plan.read_late
        if late:
            self._step_optimizer()
        numbers, copied = late_read.hold(torch.stack([loss_sum, norm.to(loss_sum)]), late)
        pending = Pending(self.pos, lr, numbers, copied, n_tokens, real,
                          sum(int(b["input_ids"].numel()) for b in micro), queue_s=time.perf_counter() - started)
        prepare_next()
        if not late:
            late_read.read(pending, self.output_dir, self.plan.precision)  # the step's one wait; raises if non-finite
            self._step_optimizer()
        pending.done = late_read.step_done_event(acc.device)
        return pending

    def _step_optimizer(self) -> None:
        """The update, the schedule and zeroed gradients. Read late, the flat step's update never waits for the
        device (FlatSteps.step); bitsandbytes' own step waits after each tensor."""
        if self.plan.read_late and self.flat is not None:
            self.flat.step()
        else:
            self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self._zero_grad()

    def _zero_grad(self) -> None:
        """The optimizer's gradients and the model's: under FSDP a bitsandbytes optimizer holds views of the
        shards (shards.py), so the DTensor gradients FSDP accumulates into are the model's to drop."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.flat is not None:  # the model's gradients are views of the flat ones: zeroed in place
            self.flat.zero_grads()
        if self.sharded:  # elsewhere the optimizer holds every parameter that has a gradient: nothing more to drop
            self.loss_module.zero_grad(set_to_none=True)

    def _compile_fixed_shapes(self) -> None:
        """Compiled layers build their graphs as they meet micro-batch lengths: show them every length now (one
        forward + backward of pad tokens per length and round, nothing trained, gradients dropped, RNG restored),
        so no step after the first waits for the compiler and a timed run measures training, not compilation."""
        p, acc = self.plan, self.accelerator
        if not (p.compile and p.padding_free and p.token_buckets):
            return
        started, rng = time.perf_counter(), ckpt.rng_state()  # said first: a cold compile takes ~40 s on a GPU
        log.info("compiling layers for micro-batches of %s tokens (cached for later runs)", p.length_words())
        if self.sharded:
            ids = torch.full((1, p.token_buckets[0]), self.pad_id, dtype=torch.long, device=self.accelerator.device)
            distributed.hand_quant_state_eagerly(self.loss_module, ids)
        for n, pos in warm_up_positions(p.token_buckets, p.position_cap) * self.warm_up_rounds:
            ids = torch.full((1, n), self.pad_id, dtype=torch.long)
            # every position trained, so the whole backward is built
            b = self._to_device(self.batcher.annotated({"input_ids": ids, "labels": ids, "position_ids": pos[None]}))
            with acc.no_sync(self.loss_module):
                acc.backward(self.loss_module(*loss_inputs(b)) * 0.0)
        self._zero_grad()
        ckpt.set_rng_state(rng)
        log.info("compiled layers for micro-batches of %s tokens in %.1f s", p.length_words(),
                 time.perf_counter() - started)

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """Mean loss per trained token over the eval data, all ranks; logged like a train line."""
        assert self.eval_loader is not None
        acc = self.accelerator
        self.loss_module.eval()
        batches = (b for batch in self.eval_loader for b in self.batcher([batch]))
        loss = mean_loss(self.loss_module, batches, acc.device, self._to_device, lambda t: acc.reduce(t, "sum"))
        self.loss_module.train()
        return self.metrics.log_eval(self.pos.step, loss)

    # ---------------------------------------------------------------- save / restore
    def save_checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        acc, pos = self.accelerator, self.pos
        acc.wait_for_everyone()
        path = None
        # every rank's RNG (its LoRA dropout stream), so a resumed multi-GPU run draws the same masks everywhere
        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
        adapter = self.full_adapter_state()  # FSDP: gathered whole (a collective), for adapter_model.safetensors
        if acc.is_main_process:
            tensors: dict[str, Any] = {"scheduler": self.scheduler.state_dict(), "rng": rngs[0],
                                       "rng_per_rank": rngs}
            if not self.sharded:  # FSDP: each rank's optimizer state is in its shard file (shards.py)
                tensors["optimizer"] = (self.flat or self.optimizer).state_dict()  # per parameter
            if acc.scaler is not None:
                tensors["scaler"] = acc.scaler.state_dict()
            state = {"step": pos.step, "epoch": pos.epoch, "micro_in_epoch": pos.loader_batches,
                     "total_steps": self.total_steps, **self.metrics.state()}
            if self.stream is not None:  # the stream's position after the loader batches consumed so far
                state["stream"] = self.stream.state_at(pos.epoch, pos.loader_batches * self.spec.batch_size)
            path = ckpt.save_checkpoint(self.output_dir, pos.step, self.trained_model(), self.tokenizer, state,
                                        tensors, self.spec.save_total_limit, adapter,
                                        self._write_shard if self.sharded else None)
        elif self.sharded:
            self._write_shard(None)
        self.saved[pos.step] = path
        acc.wait_for_everyone()
        return path

    def _write_shard(self, tmp: Path | None) -> None:
        """FSDP: every rank writes its adapter shard and optimizer state into the main process's temp dir."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        where = broadcast_object_list([str(tmp) if tmp is not None else None], from_process=0)[0]
        shards.save_shard(Path(where), acc.process_index, acc.num_processes, self._trainable(), self.optimizer)
        acc.wait_for_everyone()

    def _trainable(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.loss_module.named_parameters() if p.requires_grad]

    def _restore(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        acc = self.accelerator
        state, tensors = ckpt.load_checkpoint(path)
        if self.sharded:
            shards.load_shard(path, acc.process_index, acc.num_processes, self._trainable(), self.optimizer)
        elif "optimizer" not in tensors:
            raise CheckpointError(f"checkpoint {str(path)!r} was written by a sharded run (training.distributed="
                                  '"fsdp"); resume it with distributed="fsdp" on as many processes as wrote it')
        else:
            set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
            (self.flat or self.optimizer).load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        if "scaler" in tensors and acc.scaler is not None:
            acc.scaler.load_state_dict(tensors["scaler"])
        per_rank = tensors.get("rng_per_rank", [])
        ckpt.set_rng_state(per_rank[acc.process_index] if len(per_rank) == acc.num_processes else tensors["rng"])
        self.pos = Position(state["step"], state["epoch"], state["micro_in_epoch"])
        if self.stream is not None and "stream" in state:
            self.stream.resume(state["stream"])
        optim.follow_new_total(self.scheduler, self.optimizer, state.get("total_steps"), self.total_steps,
                               self.pos.step + 1)
        self.metrics.restore(state)
        log.info("resumed from %s at step %d (epoch %d, loader batch %d)", path, self.pos.step, self.pos.epoch,
                 self.pos.loader_batches)

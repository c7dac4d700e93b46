"""The training loop: our own, on accelerate. setup -> train -> save.

One optimizer step = up to ``grad_accum`` micro-batches. We count the trained tokens of the whole step first
(across micro-batches and ranks), then back-propagate each micro-batch's *summed* loss divided by that count:
the accumulated gradient is exactly the gradient of the mean loss over every trained token of the step, so
batch 4 x accum 1 and batch 1 x accum 4 train identically. We use ``accelerator.no_sync`` rather than
``accelerator.accumulate`` because the latter assumes every step has ``grad_accum`` micro-batches and scales
each by 1/grad_accum; an epoch's short last step would then be mis-weighted.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoints as ckpt
from . import distributed, tracking
from .data import Collator, PreparedData
from .data.packing import pad_to_bucket, resplit_flat
from .errors import TrainingError, TrainingInterrupted
from .loss import TokenLoss, trained_positions
from .plan import RunPlan
from .specs import TrainSpec

log = logging.getLogger("phi3tune")
_MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class EpochSampler(Sampler[int]):
    """A fresh, seeded permutation each epoch, so a resumed run sees the same order as an unbroken one."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> Any:
    """The optimizer ``name`` (any torch / bitsandbytes class, optim.py); paged ones are unpaged on the CPU."""
    from .optim import build_optimizer as build

    return build(name, params, lr, weight_decay, device)


class _StopFlag:
    """SIGINT/SIGTERM set a flag so the current step finishes and a checkpoint is saved; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> _StopFlag:
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    """Runs the loop for an already-built PEFT model and prepared data."""

    def __init__(self, model: Any, tokenizer: Any, data: PreparedData, spec: TrainSpec, plan: RunPlan,
                 callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.model, self.tokenizer, self.data, self.spec, self.plan = model, tokenizer, data, spec, plan
        self.precision, self.device = plan.precision, torch.device(plan.device)
        self.output_dir = Path(spec.output_dir)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.log_window: dict[str, float] = {}  # loss sum / trained tokens since the last log line
        self._saved: tuple[int, Path | None] | None = None  # (step, path) of the last checkpoint written
        self.padding_free = plan.padding_free
        self.callbacks = list(callbacks or [])  # called after every optimizer step with that step's numbers

    # ---------------------------------------------------------------- setup
    @distributed.collective_errors
    def setup(self) -> None:
        from accelerate import Accelerator
        fsdp = self._fsdp_plugin()
        self.accelerator = acc = Accelerator(mixed_precision=_MIXED[self.precision], cpu=self.device.type == "cpu",
                                             fsdp_plugin=fsdp,
                                             **tracking.accelerator_kwargs(self.spec.report_to, self.output_dir))
        distributed.use_fsdp_on_cpu(acc, fsdp)
        tracking.start(acc, self.output_dir, {"training": self.spec.model_dump()})
        s = self.spec
        self.sampler = EpochSampler(len(self.data.train), s.seed)
        collate = Collator(self.tokenizer.pad_token_id, padding_free=self.padding_free)
        # Its own generator: iterating must not draw from the global RNG that LoRA dropout uses, or a resumed
        # run (which starts a fresh iterator mid-epoch) would see different dropout masks.
        loader = DataLoader(self.data.train, batch_size=s.batch_size, sampler=self.sampler, collate_fn=collate,
                            generator=torch.Generator().manual_seed(s.seed), pin_memory=self.device.type == "cuda")
        self.eval_loader = None
        if self.data.eval is not None:
            self.eval_loader = DataLoader(self.data.eval, batch_size=s.batch_size, collate_fn=collate)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = s.create_optimizer(self.model, self.params, self.device)  # TrainSpec's hook: optim.py
        loss_module = TokenLoss(self.model, self.plan.ce_chunk)
        self.loss_module, self.optimizer = acc.prepare(loss_module, optimizer)
        self.params = [p for p in self.loss_module.parameters() if p.requires_grad]  # FSDP: the sharded ones
        # Batches stay on the CPU until a step is laid out and its tokens counted there: reading a count off the
        # GPU would stall the launch queue once per micro-batch. _to_device moves them (pinned, non-blocking).
        self.loader = acc.prepare_data_loader(loader, device_placement=False)
        self.steps_per_epoch = max(1, math.ceil(len(self.loader) / s.grad_accum))  # per rank once prepared
        self.total_steps = s.max_steps or max(1, math.ceil(s.num_epochs * self.steps_per_epoch))
        self.scheduler = s.create_scheduler(optimizer, math.ceil(s.warmup_ratio * self.total_steps), self.total_steps)
        if self.eval_loader is not None:
            self.eval_loader = acc.prepare_data_loader(self.eval_loader, device_placement=False)

    def _fsdp_plugin(self) -> Any:
        """FSDP for bases that do not fit one GPU: shard per decoder layer (PEFT's wrap policy)."""
        if self.spec.distributed != "fsdp":
            return None
        return distributed.fsdp_plugin(self.model)

    def _layout(self, micro: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Padding-free plans: re-cut the step's examples into micro-batches within the token budget, each padded
        to one of the plan's fixed lengths. Same examples, same trained tokens; only the shapes change."""
        p = self.plan
        if p.padding_free and p.micro_batch_tokens:
            micro = [pad_to_bucket(b, p.token_buckets, self.tokenizer.pad_token_id, p.position_cap)
                     for b in resplit_flat(micro, p.micro_batch_tokens)]
        return [{**b, "trained_idx": trained_positions(b["labels"])} for b in micro]

    def _to_device(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.accelerator.device
        return {k: v.to(dev, non_blocking=True) for k, v in b.items() if k != "num_real_tokens"}

    def _compile_fixed_shapes(self) -> None:
        """Compiled layers build one graph per micro-batch length: build them all now (one forward + backward of
        pad tokens per length, nothing trained, gradients dropped, RNG restored), so no step after the first
        waits for the compiler and a timed run measures training, not compilation."""
        p, acc = self.plan, self.accelerator
        if not (p.compile and p.padding_free and p.token_buckets):
            return
        from .checkpoints import rng_state, set_rng_state

        started, rng = time.perf_counter(), rng_state()
        pad = int(self.tokenizer.pad_token_id)
        for n in p.token_buckets:
            ids = torch.full((1, n), pad, dtype=torch.long)
            pos = (torch.arange(n) % max(1, p.position_cap))[None]
            b = self._to_device({"input_ids": ids, "labels": ids, "position_ids": pos,  # every position trained,
                                 "trained_idx": trained_positions(ids)})  # so the whole backward graph is built
            with acc.no_sync(self.loss_module):
                acc.backward(self.loss_module(b["input_ids"], b["labels"], b["position_ids"], b["trained_idx"]) * 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
        log.info("compiled layers for micro-batches of %s tokens in %.1f s",
                 "/".join(map(str, p.token_buckets)), time.perf_counter() - started)

    # ---------------------------------------------------------------- one optimizer step
    def _optimizer_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float, int, int]:
        """One optimizer step; returns (loss, grad norm before clipping, real tokens, trained tokens), all ranks."""
        acc = self.accelerator
        micro = distributed.even_micro_batches(acc, self.loss_module, micro)  # FSDP: as many forwards on each rank
        counts = torch.tensor([sum(int(b["trained_idx"].numel()) for b in micro),  # CPU tensors: no device sync
                               sum(int(b["num_real_tokens"]) for b in micro)])
        if acc.num_processes > 1:  # trained and real tokens of the whole step, all ranks
            counts = acc.reduce(counts.to(acc.device), "sum").cpu()
        n_tokens, real = int(counts[0]), int(counts[1])
        scale = acc.num_processes / max(1, n_tokens)  # DDP averages over ranks; undo that, divide by all tokens
        loss_sum = torch.zeros((), device=acc.device)
        for i, cpu_batch in enumerate(micro):
            b = self._to_device(cpu_batch)
            sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(self.loss_module)
            with sync:
                part = self.loss_module(b["input_ids"], b["labels"], b["position_ids"], b["trained_idx"])
                acc.backward(part * scale)
            loss_sum += part.detach().float()
        if acc.num_processes > 1:
            loss_sum = acc.reduce(loss_sum, "sum")
        loss = float(loss_sum) / max(1, n_tokens)
        max_norm = self.spec.max_grad_norm or float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(loss) or (not math.isfinite(grad_norm) and self.precision != "fp16"):
            last = ckpt.list_checkpoints(self.output_dir)
            raise TrainingError(
                f"step {self.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                f"(loss={loss}, grad_norm={grad_norm}); last good checkpoint: "
                f"{str(last[-1]) if last else 'none'}. Lower training.learning_rate or use precision=\"bf16\""
            )
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, real, n_tokens

    # ---------------------------------------------------------------- train
    @distributed.collective_errors
    def train(self, resume_from: Path | None = None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        acc, s = self.accelerator, self.spec
        if resume_from is not None:
            self._restore(resume_from)
        self.loss_module.train()  # before compiling: graphs are specialised on train/eval mode
        self._compile_fixed_shapes()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", dynamic_ncols=True,
                   disable=not (s.progress_bar and acc.is_main_process))
        # a resumed run carries on the log window of the checkpoint, so its next log line averages the same steps
        window = self.log_window = {"loss_sum": 0.0, "tokens": 0, **self.log_window, "real": 0,
                                    "t0": time.perf_counter()}
        started, start_step, real_total = time.perf_counter(), self.step, 0
        self.loss_module.train()
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                self.loader.set_epoch(self.epoch)  # accelerate re-sets the sampler's epoch from this on iter()
                loader = (acc.skip_first_batches(self.loader, self.micro_in_epoch)
                          if self.micro_in_epoch else self.loader)
                batches = iter(loader)
                while self.step < self.total_steps:
                    micro = list(islice(batches, s.grad_accum))
                    if not micro:
                        break
                    consumed = len(micro)  # loader batches, which a resume skips (before any re-split)
                    micro = self._layout(micro)
                    lr = self.scheduler.get_last_lr()[0]
                    loss, grad_norm, real, n_tok = self._optimizer_step(micro)
                    self.step += 1
                    self.micro_in_epoch += consumed
                    window["loss_sum"] += loss * n_tok
                    window["tokens"] += n_tok
                    window["real"] += real
                    real_total += real
                    bar.update(1)
                    if self.callbacks:
                        event = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                 "real_tokens": real, "trained_tokens": n_tok,
                                 "batch_tokens": sum(int(b["input_ids"].numel()) for b in micro)}
                        for fn in self.callbacks:
                            fn(event)
                    if self.step % s.logging_steps == 0 or self.step == self.total_steps:
                        self._log_train(window, lr, grad_norm, bar)
                    if s.eval_steps and self.step % s.eval_steps == 0 and self.step != self.total_steps:
                        self.evaluate()
                    if s.save_strategy == "steps" and s.save_steps and self.step % s.save_steps == 0:
                        self.save_checkpoint()
                    if stop.signal:
                        # saved at this step already? (decided the same way on every rank: save has barriers)
                        saved_now = self._saved is not None and self._saved[0] == self.step
                        path = self._saved[1] if saved_now and self._saved else self.save_checkpoint()
                        bar.close()
                        raise TrainingInterrupted(
                            f"{stop.signal}: stopped after step {self.step} of {self.total_steps} and saved "
                            f"{path}. Resume with .run(resume=True) on the same FineTuner, or "
                            f"FineTuner.from_config('{self.output_dir / ckpt.CONFIG_NAME}').run(resume=True)",
                            str(path))
                else:  # the inner loop ran out of steps, not of data: training is done
                    break
                self.epoch += 1
                self.micro_in_epoch = 0
                if s.save_strategy == "epoch" and self.step < self.total_steps:
                    self.save_checkpoint()
        bar.close()
        final: dict[str, Any] = {}
        if self.eval_loader is not None:
            final.update(self.evaluate())
        tracking.finish(acc)
        elapsed = time.perf_counter() - started
        train_losses = [h["loss"] for h in self.history if "loss" in h]
        final.update(steps=self.step, runtime_s=round(elapsed, 3),
                     train_loss=train_losses[-1] if train_losses else None,
                     tokens_per_s=real_total / elapsed if elapsed and self.step > start_step else None)
        return final

    def _log_train(self, window: dict[str, float], lr: float, grad_norm: float, bar: Any) -> None:
        now = time.perf_counter()
        entry = {"step": self.step, "epoch": round(self.epoch + self.micro_in_epoch / max(1, len(self.loader)), 4),
                 "loss": window["loss_sum"] / max(1, window["tokens"]), "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": window["real"] / max(1e-9, now - window["t0"]), "trained_tokens": window["tokens"]}
        self._record(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}")
        window.update(loss_sum=0.0, tokens=0, real=0, t0=now)

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        tracking.log_entry(self.accelerator, entry)

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        assert self.eval_loader is not None
        acc = self.accelerator
        self.loss_module.eval()
        total = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device)
        for batch in self.eval_loader:
            for cpu_batch in distributed.even_micro_batches(acc, self.loss_module, self._layout([batch])):
                b = self._to_device(cpu_batch)
                total += self.loss_module(b["input_ids"], b["labels"], b["position_ids"], b["trained_idx"]).float()
                count += int(cpu_batch["trained_idx"].numel())
        total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
        self.loss_module.train()
        loss = float(total) / max(1.0, float(count))
        entry = {"step": self.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        self._record(entry)
        return {"eval_loss": loss, "eval_perplexity": entry["eval_perplexity"]}

    # ---------------------------------------------------------------- save / restore
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "total_steps": self.total_steps, "history": self.history,
                "log_window": {k: self.log_window.get(k, 0) for k in ("loss_sum", "tokens")}}

    def save_checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        # every rank's RNG (its LoRA dropout stream), so a resumed multi-GPU run draws the same masks everywhere
        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
        if acc.is_main_process:
            tensors: dict[str, Any] = {"optimizer": self.optimizer.state_dict(),
                                       "scheduler": self.scheduler.state_dict(), "rng": rngs[0],
                                       "rng_per_rank": rngs}
            if acc.scaler is not None:
                tensors["scaler"] = acc.scaler.state_dict()
            path = ckpt.save_checkpoint(self.output_dir, self.step, acc.unwrap_model(self.loss_module).model,
                                        self.tokenizer, self._state(), tensors, self.spec.save_total_limit)
        self._saved = (self.step, path)
        acc.wait_for_everyone()
        return path

    def _restore(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state, tensors = ckpt.load_checkpoint(path)
        set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        if "scaler" in tensors and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(tensors["scaler"])
        per_rank = tensors.get("rng_per_rank", [])
        rank = self.accelerator.process_index
        ckpt.set_rng_state(per_rank[rank] if len(per_rank) == self.accelerator.num_processes else tensors["rng"])
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        self.history = list(state["history"])
        self.log_window = dict(state.get("log_window", {}))
        if self.accelerator.is_main_process:  # metrics.jsonl = history up to the checkpoint, no duplicates
            with open(self.output_dir / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", path, self.step, self.epoch,
                 self.micro_in_epoch)

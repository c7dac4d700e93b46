"""The training objective: summed next-token cross-entropy over trained tokens only.

The loop divides this sum by the number of trained tokens in the whole optimizer step (all micro-batches,
all ranks), so every trained token weighs the same however the step is split — unlike averaging per-batch
means, which over-weights short batches.

Only positions with a label go through the output head, in chunks that are recomputed in backward, so the
full (tokens x 32k vocab) fp32 logits tensor never exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE
from .offload import Offloader
from .varlen_attention import document_bounds

# tokens per output-head chunk. PHI3TUNE_CE_CHUNK is for benchmarks only (examples/benchmarks/h200.sh, cards.sh ceN):
# a value above the tokens of a micro-batch turns chunking off, i.e. the full logits tensor, to measure what chunking
# saves. A chunk's logits in bf16 plus fp32 for the loss and its gradient are 10 bytes a vocabulary entry: for Phi-3
# 0.61 GiB at 2,048 tokens, 0.31 at TIGHT_CE_CHUNK, which a speed plan takes where 2,048's would not fit, before
# anything slower (plan._candidate): it lets a 12 GiB card hold the middle activation budget (session 15). The same
# matmuls, more of them: on a 16 GiB card 2.8% slower a step over 10 steps, one machine (within the steps' noise)
_ASKED_CE_CHUNK = int(os.environ.get("PHI3TUNE_CE_CHUNK") or 0)
CE_CHUNK = _ASKED_CE_CHUNK or 2048
TIGHT_CE_CHUNK = _ASKED_CE_CHUNK or 1024


def count_trained(labels: torch.Tensor) -> int:
    """Trained (shifted) label positions in a batch."""
    return int((labels[:, 1:] != IGNORE).sum())


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``labels[:, 1:]``) of the trained positions. Computed on the CPU before the batch moves,
    so the loss never asks the GPU which positions are trained (a boolean mask would stall every micro-batch)."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().flatten()


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


class TokenLoss(nn.Module):
    """Wraps the (PEFT) causal LM so that forward returns the summed loss.

    Distributed wrappers (DDP/FSDP) see this module's forward, so gradient sync still works although
    we call the decoder and the output head separately.
    """

    def __init__(self, model: nn.Module, chunk: int = CE_CHUNK, cuda_graphs: bool = False,
                 offloader: Offloader | None = None, longest_example: int | None = None,
                 checkpoints: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk
        # varlen attention (varlen_attention.py): no example is longer than this (plan.position_cap); None: another
        self.longest_example = longest_example
        # saved activations held in host memory until backward (offload.py: plan.offload_checkpoints, offload_layers)
        self.offloader = offloader
        # checkpointing by micro-batch length (checkpoint_lengths.py): told each pass's length before it runs
        self.checkpoints = checkpoints
        # compiled layers replayed as CUDA graphs (a benchmark knob, knobs.compile_settings): each micro-batch is a
        # new step of inductor's graph trees, whose outputs the last one's backward no longer needs
        self.cuda_graphs = cuda_graphs

    def _causal_lm(self) -> Any:  # the transformers model under PEFT
        m: Any = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                trained_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        lm = self._causal_lm()
        if self.checkpoints is not None:
            self.checkpoints(input_ids.shape[-1])
        with self.offloader.hooks(input_ids.numel()) if self.offloader is not None else nullcontext():
            hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                              **self._bounds(input_ids, position_ids, cu_seqlens)).last_hidden_state
        if trained_idx is None:
            trained_idx = trained_positions(labels)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, trained_idx)
        y = labels[:, 1:].reshape(-1).index_select(0, trained_idx)
        head = lm.get_output_embeddings()
        if h.shape[0] <= self.chunk or not torch.is_grad_enabled():
            return _chunk_ce(head, h, y)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], self.chunk):
            total = total + checkpoint(_chunk_ce, head, h[i:i + self.chunk], y[i:i + self.chunk],
                                       use_reentrant=False)
        return total

    def _bounds(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None) -> dict[str, Any]:
        """varlen attention's keywords: the examples' cumulative lengths (from the batch; else read off
        ``position_ids``, a device sync) and the longest an example may be, which the compiled layers see as a
        constant. The number of examples varies: one graph serves them all (a dynamic dimension)."""
        if self.longest_example is None:
            return {}
        if cu_seqlens is None:
            ids = position_ids if position_ids is not None else torch.arange(input_ids.shape[-1]).expand(
                input_ids.shape[0], -1)
            cu_seqlens = document_bounds(ids.cpu()).to(input_ids.device)
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                "max_length_q": self.longest_example, "max_length_k": self.longest_example}


def loss_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """A (device) micro-batch as ``TokenLoss.forward``'s arguments."""
    return batch["input_ids"], batch["labels"], batch["position_ids"], batch["trained_idx"], batch.get("cu_seqlens")


@torch.no_grad()
def mean_loss(loss_fn: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
              to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The mean loss per trained token over ``batches`` (CPU batches; ``to_device`` moves each one): the loop's
    eval loss and the demo's held-out loss. ``reduce`` sums the totals across ranks."""
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for cpu_batch in batches:
        if "trained_idx" not in cpu_batch:
            cpu_batch = {**cpu_batch, "trained_idx": trained_positions(cpu_batch["labels"])}
        b = to_device(cpu_batch) if to_device else {k: v.to(device) for k, v in cpu_batch.items()}
        total += loss_fn(*loss_inputs(b)).float()
        count += int(cpu_batch["trained_idx"].numel())
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return float(total) / max(1.0, float(count))

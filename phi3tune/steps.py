"""Which examples make up each optimizer step: epochs, the resume skip, accumulation groups, re-cutting.

``optimizer_steps`` is the whole data side of the loop in one generator: the loop only trains what it yields.
A resumed run must see exactly the micro-batches an unbroken run would have seen, so:

* each epoch is a fresh seeded permutation (``EpochSampler``), set on the loader before it is iterated;
* a run resumed mid-epoch skips the loader batches the checkpoint had consumed (``Position.micro_in_epoch``),
  counted in *loader* batches, before any re-cutting, so the skip does not depend on the token layout;
* a step is up to ``grad_accum`` loader batches; an epoch's last step may be shorter;
* padding-free plans re-cut a step's examples into micro-batches within the token budget (``layout``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch.utils.data import Sampler

from .data.packing import pad_to_bucket, resplit_flat
from .loss import trained_positions
from .plan import RunPlan

Batch = dict[str, torch.Tensor]


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


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, loader batches consumed in it (checkpointed)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0


def layout(micro: list[Batch], plan: RunPlan, pad_id: int) -> list[Batch]:
    """A step's loader batches as the model gets them. Padding-free plans: re-cut the step's examples into
    micro-batches within the token budget, each padded to one of the plan's fixed lengths (same examples, same
    trained tokens; only the shapes change). Every batch gets ``trained_idx``, computed here on the CPU."""
    if plan.padding_free and plan.micro_batch_tokens:
        micro = [pad_to_bucket(b, plan.token_buckets, pad_id, plan.position_cap)
                 for b in resplit_flat(micro, plan.micro_batch_tokens)]
    return [{**b, "trained_idx": trained_positions(b["labels"])} for b in micro]


def optimizer_steps(loader: Any, pos: Position, total_steps: int, grad_accum: int, plan: RunPlan, pad_id: int,
                    skip_first_batches: Callable[[Any, int], Iterable[Batch]],
                    on_epoch_end: Callable[[], None]) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step from ``pos`` up to ``total_steps``, laid out (CPU tensors).

    ``pos`` advances as each step is yielded: while the caller trains, logs and saves that step, ``pos`` already
    counts it (``pos.step`` is its number), so a checkpoint written then resumes after it. ``on_epoch_end`` runs
    between epochs (after ``pos`` moved to the next one, before its loader starts), never after the last step.
    """
    while pos.step < total_steps:
        loader.set_epoch(pos.epoch)  # accelerate re-sets the sampler's epoch from this on iter()
        batches = iter(skip_first_batches(loader, pos.micro_in_epoch) if pos.micro_in_epoch else loader)
        while pos.step < total_steps:
            micro = list(islice(batches, grad_accum))
            if not micro:
                break
            pos.step += 1
            pos.micro_in_epoch += len(micro)  # loader batches, which a resume skips (before any re-cutting)
            yield layout(micro, plan, pad_id)
        else:  # the steps ran out, not the data: training is done
            return
        pos.epoch += 1
        pos.micro_in_epoch = 0
        on_epoch_end()

"""How examples become micro-batches and optimizer steps: the whole data side of the loop, in one place.

The plan picks the layout once (``RunPlan.layout``); this module carries it out:

* ``padded``: rows right-padded to the longest of each loader batch (no attention mask: under a causal mask a
  real token only sees earlier, real positions, so trailing pads change no trained logit);
* ``packed``: the same, over rows that dataset-time packing filled with several examples (data/packing.py);
  their ``position_ids`` restart at each example, which transformers reads as document boundaries;
* ``padding_free``: a loader batch is one row of its examples end to end, fenced by restarting positions; a
  step's examples are re-cut into micro-batches within the plan's token budget, each padded to one of the plan's
  few fixed lengths (the compiled shapes).

No layout changes which tokens are trained (an example laid after another never predicts its first token from
the previous one: ``formats.fence``) or how the loss is weighted (tests/test_modes.py).

``optimizer_steps`` yields each step's micro-batches with the position after it. A resumed run must see exactly
the micro-batches an unbroken one would have seen, so each epoch is a fresh seeded permutation
(``EpochSampler``), and a resume skips the *loader* batches the checkpoint had consumed, before any re-cutting.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Sampler

from . import knobs, varlen_attention
from .data.formats import IGNORE, fence
from .data.prepared import row_lengths
from .loss import trained_positions
from .plan import RunPlan

Batch = dict[str, torch.Tensor]
Layout = Literal["padded", "packed", "padding_free"]


# ---------------------------------------------------------------------------------------------- rows -> batches
class Collator:
    """Rows into one loader batch. Padded: right-padded tensors; pads get IGNORE labels and positions that
    continue the row's last example (one document no real token attends to). ``padding_free=True``: the rows end
    to end in one row, positions restarting at each, the first label of each dropped: the same examples and
    trained tokens as the padded batch, with zero padding."""

    def __init__(self, pad_token_id: int, padding_free: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        return self._flat(rows) if self.padding_free else self._padded(rows)

    def _padded(self, rows: list[dict[str, Any]]) -> Batch:
        width, n = max(len(r["input_ids"]) for r in rows), len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        position_ids = torch.arange(width, dtype=torch.long).repeat(n, 1)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            if "position_ids" in r:
                position_ids[i, :k] = torch.tensor(r["position_ids"])
                position_ids[i, k:] = torch.arange(width - k) + (int(r["position_ids"][-1]) + 1 if k else 0)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "num_real_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}

    @staticmethod
    def _flat(rows: list[dict[str, Any]]) -> Batch:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for r in rows:
            ids += r["input_ids"]
            labels += fence(r["labels"])  # no target across the row boundary (none existed padded)
            pos += list(r["position_ids"]) if "position_ids" in r else list(range(len(r["input_ids"])))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]), "num_real_tokens": torch.tensor(len(ids))}


class EpochSampler(Sampler[int]):
    """A fresh, seeded permutation each epoch, so a resumed run sees the same order as an unbroken one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def loaders(train: Any, eval: Any | None, plan: RunPlan, batch_size: int, seed: int, pad_id: int,
            streaming: bool = False) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
    """The train and eval loaders of the plan's layout (CPU batches; the loop moves them). The train loader has
    its own generator: iterating must not draw from the global RNG that LoRA dropout uses, or a resumed run
    (which starts a fresh iterator mid-epoch) would see different dropout masks. ``streaming``: ``train`` is a
    ``data.stream.StreamRows``, read in its own order (no sampler)."""
    collate = Collator(pad_id, padding_free=plan.layout == "padding_free")
    sampler = None if streaming else EpochSampler(len(train), seed)
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed), pin_memory=plan.device.startswith("cuda"))
    return loader, None if eval is None else DataLoader(eval, batch_size=batch_size, collate_fn=collate)


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of batch positions that are padding when rows are batched in ``order`` (right-padded to the longest)."""
    padded = real = 0
    for i in range(0, len(order), batch_size):
        chunk = [lengths[j] for j in order[i:i + batch_size]]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / max(1, padded)


def first_epoch_padding(train: Any, batch_size: int, seed: int) -> float:
    """``padding_fraction`` of the first epoch's padded loader batches (the data summary's estimate)."""
    return padding_fraction(row_lengths(train).tolist(), list(EpochSampler(len(train), seed)), batch_size)


def micro_batch_lengths(lengths: Sequence[int], order: Sequence[int], per_step: int, budget: int) -> list[int]:
    """The lengths of the micro-batches ``resplit_flat`` makes of one-document rows taken ``per_step`` at a time
    in ``order``: examples end to end, cut before the one that would take a micro-batch past ``budget``."""
    out: list[int] = []
    for first in range(0, len(order), per_step):
        run = 0
        for i in order[first:first + per_step]:
            if run and run + lengths[i] > budget:
                out.append(run)
                run = 0
            run += int(lengths[i])
        if run:
            out.append(run)
    return out


def fitted_buckets(lengths: Sequence[int], top: int, count: int) -> tuple[int, ...]:
    """At most ``count`` fixed lengths, the longest ``top``, that pad ``lengths`` (micro-batch lengths) the least:
    each micro-batch goes to the shortest length that holds it. Exact (dynamic programming over lengths rounded
    up to multiples of a quantum, 128 tokens for a 4,096 budget). Lengths above ``top`` keep their own width
    (``pad_to_bucket``) and do not count."""
    quantum = max(8, min(128, top // (4 * count)) // 8 * 8)  # a multiple of 8, whatever the count
    held = [n for n in lengths if n <= top]

    def rounded(n: int) -> int:  # the shortest candidate length that holds n
        return min(top, -(-n // quantum) * quantum)

    cands = sorted({rounded(n) for n in held} | {top})
    num = [0] * len(cands)  # micro-batches whose rounded length is cands[j], and their summed lengths
    tot = [0] * len(cands)
    where = {c: j for j, c in enumerate(cands)}
    for n in held:
        j = where[rounded(n)]
        num[j] += 1
        tot[j] += n
    cum_n, cum_t = [0, *itertools.accumulate(num)], [0, *itertools.accumulate(tot)]

    def pad(i: int, j: int) -> int:  # micro-batches of candidates i..j, all padded to cands[j]
        return (cum_n[j + 1] - cum_n[i]) * cands[j] - (cum_t[j + 1] - cum_t[i])

    k_max, inf = min(count, len(cands)), float("inf")
    best = [[inf] * len(cands) for _ in range(k_max + 1)]  # best[k][j]: k lengths, the longest cands[j]
    back = [[-1] * len(cands) for _ in range(k_max + 1)]
    for j in range(len(cands)):
        best[1][j] = pad(0, j)
    for k in range(2, k_max + 1):
        for j in range(len(cands)):
            for i in range(j):
                cost = best[k - 1][i] + pad(i + 1, j)
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    last = len(cands) - 1
    k = min(range(1, k_max + 1), key=lambda k: (best[k][last], k))
    chosen, j = [], last
    while k >= 1 and j >= 0:
        chosen.append(cands[j])
        j, k = back[k][j], k - 1
    return tuple(sorted(chosen))


def _one_document_rows(train: Any) -> bool:
    """Unpacked rows (packed ones carry position_ids); a plugin's own dataset type is not looked into."""
    columns = getattr(train, "column_names", None)
    return columns is not None and "position_ids" not in columns


def step_lengths(train: Any, per_step: int, seed: int) -> list[int] | None:
    """The tokens of each optimizer step of one-document rows in the first epoch (None: other rows)."""
    if not _one_document_rows(train):
        return None
    order = list(EpochSampler(len(train), seed))
    return micro_batch_lengths(row_lengths(train).tolist(), order, per_step, sys.maxsize)


def fit_lengths_to_data(plan: RunPlan, train: Any, per_step: int, seed: int) -> RunPlan:
    """``plan`` with fixed lengths fitted to the first epoch's micro-batches of one-document rows (unpacked data
    under a padding-free plan): the README quickstart's first epoch holds 14.5% pads at the evenly spaced lengths,
    10.0% at fitted ones. The longest length, which the memory prediction is made for, stays. Other plans
    (symbolic-length ones too) and packed rows are returned as they are."""
    if (plan.layout != "padding_free" or not plan.micro_batch_tokens or not _one_document_rows(train)
            or plan.dynamic_lengths):  # symbolic-length graphs: every multiple of a granule already
        return plan
    top = plan.token_buckets[-1]
    micro = micro_batch_lengths(row_lengths(train).tolist(), list(EpochSampler(len(train), seed)), per_step,
                                plan.micro_batch_tokens)
    return replace(plan, token_buckets=fitted_buckets(micro, top, len(plan.token_buckets)))


# ------------------------------------------------------------------------------------- batches -> micro-batches
def resplit_flat(batches: list[Batch], budget: int) -> list[Batch]:
    """Merge padding-free (one-row) micro-batches and cut them again at example starts into rows of at most
    ``budget`` tokens (an example longer than the budget gets a row of its own). The step's examples and
    trained tokens are unchanged, and the loss is token-weighted over the whole step, so only speed and
    memory change."""
    ids = torch.cat([b["input_ids"][0] for b in batches])
    labels = torch.cat([b["labels"][0] for b in batches])
    pos = torch.cat([b["position_ids"][0] for b in batches])
    starts = [*(pos == 0).nonzero().flatten().tolist(), len(ids)]
    cuts, begin = [0], 0
    for a, b in itertools.pairwise(starts):
        if b - begin > budget and a > begin:
            cuts.append(a)
            begin = a
    cuts.append(len(ids))
    return [{"input_ids": ids[a:b][None], "labels": labels[a:b][None], "position_ids": pos[a:b][None],
             "num_real_tokens": torch.tensor(b - a)} for a, b in itertools.pairwise(cuts) if b > a]


def pad_to_bucket(batch: Batch, buckets: tuple[int, ...], pad_token_id: int, position_cap: int) -> Batch:
    """Pad a one-row padding-free micro-batch at its end to the shortest of a few fixed lengths that holds it,
    so compiled layers see only those shapes. Pads are never trained (IGNORE labels), never counted as real
    tokens, and form documents of their own (positions restart at 0, staying below ``position_cap`` so RoPE
    scaling that depends on the largest position never changes): no real token attends to a pad. A single
    document that fills a length exactly goes to the next one: a micro-batch without a document boundary takes
    another attention-mask path (FlexAttention: another mask function), so another compiled graph, and the
    warm-up builds it only for the longest length (``compiled_layers.warm_up_positions``)."""
    n = int(batch["input_ids"].shape[1])
    longer = [b for b in buckets if b >= n]
    if longer and longer[0] == n and len(longer) > 1 and int((batch["position_ids"][0] == 0).sum()) == 1:
        longer = longer[1:]  # one document filling a length exactly: no pad, no document boundary, another graph
    width = longer[0] if longer else n
    k = width - n
    if k == 0:
        return batch
    dev = batch["input_ids"].device
    pad_pos = torch.arange(k, dtype=torch.long, device=dev) % max(1, position_cap)
    return {"input_ids": torch.cat([batch["input_ids"], torch.full((1, k), pad_token_id, device=dev)], 1),
            "labels": torch.cat([batch["labels"], torch.full((1, k), IGNORE, device=dev)], 1),
            "position_ids": torch.cat([batch["position_ids"], pad_pos[None]], 1),
            "num_real_tokens": batch["num_real_tokens"]}


def equal_count(micro: list[Batch], n: int) -> list[Batch]:
    """``micro`` grown to ``n`` micro-batches with copies of its last one in which nothing is trained (no trained
    positions, no real tokens): FSDP runs every forward and backward as a collective, so each rank must run as
    many as the rank with the most. A copy adds no loss, no gradient and no token to any count."""
    last = micro[-1]
    empty = {**last, "trained_idx": last["trained_idx"][:0], "num_real_tokens": torch.tensor(0)}
    return micro + [empty] * (n - len(micro))


def _own_count(n: int) -> int:
    return n


@dataclass(frozen=True)
class MicroBatcher:
    """Loader batches into the micro-batches the model gets, as the plan says. ``largest_count(n)`` is the most
    micro-batches any rank has this step (a collective under FSDP, ``distributed.largest_count``; else ``n``)."""

    layout: Layout
    budget: int | None  # padding-free: tokens per micro-batch
    buckets: tuple[int, ...]  # padding-free: the fixed lengths micro-batches are padded to
    position_cap: int
    pad_id: int
    largest_count: Callable[[int], int] = _own_count
    bounds: bool = False  # each micro-batch's examples' cumulative lengths too (varlen_attention.py)
    # CUDA: the micro-batches' tensors in pinned host memory. The loader pins its batches, but the layout here makes
    # new tensors, and a non-blocking copy from pageable memory is not asynchronous (CUDA stages it through pinned
    # memory and may synchronize with the stream first). Measured (session 29): no change in speed, 21,245 against
    # 21,307 tokens/s on the 16 GiB quickstart and 0.5172 against 0.5174 s a step on the 8 GiB memory plan, so the
    # host's never getting a step ahead (wait_s 0) has another cause; kept because the copies then are asynchronous
    pin: bool = False

    @classmethod
    def of(cls, plan: RunPlan, pad_id: int, largest_count: Callable[[int], int] = _own_count) -> MicroBatcher:
        return cls(plan.layout, plan.micro_batch_tokens, plan.token_buckets, plan.position_cap, pad_id,  # type: ignore[arg-type]
                   largest_count, plan.varlen_bounds, pin=plan.device.startswith("cuda") and knobs.pin_batches_wanted())

    def __call__(self, loader_batches: list[Batch]) -> list[Batch]:
        """One step's (or one eval batch's) micro-batches; each gets ``trained_idx``, computed here on the CPU."""
        micro = loader_batches
        if self.layout == "padding_free" and self.budget:
            micro = [pad_to_bucket(b, self.buckets, self.pad_id, self.position_cap)
                     for b in resplit_flat(micro, self.budget)]
        laid = [self.annotated(b) for b in micro]
        if self.pin:  # the host count stays a host tensor (never copied)
            laid = [{k: v if k == "num_real_tokens" else v.pin_memory() for k, v in b.items()} for b in laid]
        return equal_count(laid, self.largest_count(len(micro)))

    def annotated(self, batch: Batch) -> Batch:
        """``batch`` with what the loss reads off it, computed on the CPU: the trained positions and, under varlen
        attention, the examples' bounds. Also for the compile warm-up's micro-batches, so they match training's."""
        extra = {"cu_seqlens": self._bounds(batch["position_ids"])} if self.bounds else {}
        return {**batch, "trained_idx": trained_positions(batch["labels"]), **extra}

    def _bounds(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The examples' cumulative lengths; the kernel is told none is longer than ``position_cap``: checked."""
        bounds = varlen_attention.document_bounds(position_ids)
        longest = int(bounds.diff().max())
        if longest > self.position_cap:
            raise AssertionError(f"a {longest}-token example in a micro-batch of max_seq_length "
                                 f"{self.position_cap}: the batch layout broke its own bound")
        return bounds


# --------------------------------------------------------------------------------------- micro-batches -> steps
@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, the epoch, loader batches consumed in it (checkpointed)."""

    step: int = 0
    epoch: int = 0
    loader_batches: int = 0  # in this epoch, before any re-cutting (the checkpoint's "micro_in_epoch")


def count_steps(loader_batches: int, grad_accum: int, max_steps: int | None, num_epochs: float) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run): an epoch's last step may hold fewer loader batches."""
    per_epoch = max(1, math.ceil(loader_batches / grad_accum))
    return per_epoch, max_steps or max(1, math.ceil(num_epochs * per_epoch))


def optimizer_steps(loader: Any, start: Position, total_steps: int, grad_accum: int, batcher: MicroBatcher,
                    skip_first_batches: Callable[[Any, int], Iterable[Batch]]
                    ) -> Iterator[tuple[Position, list[Batch] | None]]:
    """``(position after it, its micro-batches)`` for each optimizer step from ``start`` up to ``total_steps``.

    A step is up to ``grad_accum`` loader batches; an epoch's last step may be shorter. Between epochs it yields
    ``(the next epoch's start, None)`` before that epoch's loader starts (where an epoch checkpoint belongs),
    never after the last step. The caller keeps the positions; nothing it holds is changed here.
    """
    pos = start
    while pos.step < total_steps:
        loader.set_epoch(pos.epoch)  # accelerate re-sets the sampler's epoch from this on iter()
        batches = iter(skip_first_batches(loader, pos.loader_batches) if pos.loader_batches else loader)
        while pos.step < total_steps:
            group = list(itertools.islice(batches, grad_accum))
            if not group:
                break
            pos = replace(pos, step=pos.step + 1, loader_batches=pos.loader_batches + len(group))
            yield pos, batcher(group)
        else:  # the steps ran out, not the data: training is done
            return
        pos = Position(pos.step, pos.epoch + 1, 0)
        yield pos, None


class StepsAhead:
    """``optimizer_steps`` that can be read one step ahead: ``fetch()`` lays out the next step's micro-batches
    now. The loop calls it once a step's passes are queued on the device, so the host prepares the next step
    while the device computes this one, not after the step's wait for it. Items come out in the same order."""

    _END = object()

    def __init__(self, steps: Iterator[tuple[Position, list[Batch] | None]]) -> None:
        self.steps = steps
        self.ahead: list[Any] = []

    def fetch(self) -> None:
        if not self.ahead:
            self.ahead.append(next(self.steps, self._END))

    def __iter__(self) -> StepsAhead:
        return self

    def __next__(self) -> tuple[Position, list[Batch] | None]:
        self.fetch()
        item = self.ahead.pop()
        if item is self._END:
            raise StopIteration
        return item  # type: ignore[no-any-return]

"""Pack tokenized examples into rows and collate rows into batches.

A packed row carries ``position_ids`` that restart at 0 at every example. With no attention mask, transformers
reads those restarts as document boundaries and builds a block-diagonal causal mask (SDPA on CPU/GPU, a
FlexAttention document mask when attn_implementation="flex_attention"), so no token attends across examples.
The label of each example's first token is IGNORE: predicting it from the previous example is the
"straddling pair" that must not be trained (unpacked, that token has no predecessor either).

Batches are right-padded without an attention mask: under a causal mask a real token only ever sees earlier
(real) positions, so padding at the end cannot change any trained logit, and SDPA keeps its fast causal path.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from typing import Any

import numpy as np
import torch

from .formats import IGNORE


def best_fit_rows(lengths: Any, capacity: int) -> np.ndarray:
    """Best-fit decreasing bin packing: the row of each example, each row's total length <= capacity.

    Examples are placed longest first (ties: lower index first), each into the row with the least free space
    that holds it (ties: the older row), else into a new row. Free spaces are kept as a sorted list of distinct
    values, each with a heap of the rows that have it, so a million examples pack in seconds."""
    length = np.asarray(lengths, dtype=np.int64).reshape(-1)
    need_of = np.minimum(length, capacity)
    order = np.lexsort((np.arange(len(length)), -length))
    row_of = [0] * len(need_of)
    spaces: list[int] = []  # sorted distinct free space values that some row has
    rows_with: dict[int, list[int]] = {}  # free space -> heap of rows with exactly that space
    n_rows = 0
    for i, need in zip(order.tolist(), need_of[order].tolist(), strict=True):
        k = bisect.bisect_left(spaces, need)
        if k < len(spaces):
            space = spaces[k]
            heap = rows_with[space]
            row = heapq.heappop(heap)
            if not heap:
                del spaces[k], rows_with[space]
        else:
            space, row = capacity, n_rows
            n_rows += 1
        row_of[i] = row
        rest = space - need
        if rest > 0:
            if rest in rows_with:
                heapq.heappush(rows_with[rest], row)
            else:
                rows_with[rest] = [row]
                bisect.insort(spaces, rest)
    return np.asarray(row_of, dtype=np.int64)


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per row (in placement order), as ``best_fit_rows`` assigns them."""
    row_of = best_fit_rows(lengths, capacity)
    rows: list[list[int]] = [[] for _ in range(int(row_of.max()) + 1 if len(row_of) else 0)]
    length = np.asarray(lengths, dtype=np.int64)
    for i in np.lexsort((np.arange(len(length)), -length)).tolist():
        rows[int(row_of[i])].append(i)
    return rows


def pack_examples(examples: list[dict[str, list[int]]], capacity: int) -> list[dict[str, Any]]:
    """Concatenate examples into rows; position_ids restart and the boundary label is dropped."""
    rows = []
    for members in pack_best_fit([len(e["input_ids"]) for e in examples], capacity):
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in sorted(members):
            ex_ids, ex_labels = examples[i]["input_ids"][:capacity], examples[i]["labels"][:capacity]
            ids += ex_ids
            labels += [IGNORE, *list(ex_labels[1:])]
            pos += list(range(len(ex_ids)))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "num_examples": len(members)})
    return rows


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of batch positions that are padding when rows are batched in ``order`` (right-padded to the longest)."""
    padded = real = 0
    for i in range(0, len(order), batch_size):
        chunk = [lengths[j] for j in order[i:i + batch_size]]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / max(1, padded)


def resplit_flat(batches: list[dict[str, torch.Tensor]], budget: int) -> list[dict[str, torch.Tensor]]:
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


def pad_to_bucket(batch: dict[str, torch.Tensor], buckets: tuple[int, ...], pad_token_id: int,
                  position_cap: int) -> dict[str, torch.Tensor]:
    """Pad a one-row padding-free micro-batch at its end to the shortest of a few fixed lengths that holds it,
    so compiled layers see only those shapes. Pads are never trained (IGNORE labels), never counted as real
    tokens, and form documents of their own (positions restart at 0, staying below ``position_cap`` so RoPE
    scaling that depends on the largest position never changes): no real token attends to a pad."""
    n = int(batch["input_ids"].shape[1])
    width = next((b for b in buckets if b >= n), n)
    k = width - n
    if k == 0:
        return batch
    dev = batch["input_ids"].device
    pad_pos = torch.arange(k, dtype=torch.long, device=dev) % max(1, position_cap)
    return {"input_ids": torch.cat([batch["input_ids"], torch.full((1, k), pad_token_id, device=dev)], 1),
            "labels": torch.cat([batch["labels"], torch.full((1, k), IGNORE, device=dev)], 1),
            "position_ids": torch.cat([batch["position_ids"], pad_pos[None]], 1),
            "num_real_tokens": batch["num_real_tokens"]}


class Collator:
    """Right-pad a list of rows into tensors; pads get IGNORE labels and continuing positions.

    ``padding_free=True`` instead concatenates the rows into one row with restarting position_ids and the
    first label of every row dropped: the same examples and trained tokens as the padded batch (so the same
    loss), with zero padding. The attention is block-diagonal exactly as for packed rows.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, padding_free: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self._flat(rows)
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple) * self.multiple
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        position_ids = torch.arange(width, dtype=torch.long).repeat(n, 1)
        real = 0
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            real += k
            input_ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            if "position_ids" in r:
                position_ids[i, :k] = torch.tensor(r["position_ids"])
                # Pads continue the last example's positions: one document, never attended by real tokens.
                position_ids[i, k:] = torch.arange(width - k) + (int(r["position_ids"][-1]) + 1 if k else 0)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "num_real_tokens": torch.tensor(real)}

    @staticmethod
    def _flat(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for r in rows:
            k = len(r["input_ids"])
            ids += r["input_ids"]
            labels += [IGNORE, *r["labels"][1:]]  # no target across the row boundary (none existed padded)
            pos += list(r["position_ids"]) if "position_ids" in r else list(range(k))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]), "num_real_tokens": torch.tensor(len(ids))}

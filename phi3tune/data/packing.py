"""Pack tokenized examples into rows at dataset time (loop-time batching is phi3tune/batching.py).

A packed row carries ``position_ids`` that restart at 0 at every example. With no attention mask, transformers
reads those restarts as document boundaries and builds a block-diagonal causal mask (SDPA on CPU/GPU, a
FlexAttention document mask when attn_implementation="flex_attention"), so no token attends across examples.
The label of each example's first token is IGNORE (``formats.fence``).
"""

from __future__ import annotations

import bisect
from typing import Any

from .formats import fence


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: example indices per row, each row's total length <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index)
    for i in order:
        need = min(lengths[i], capacity)
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
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
            labels += fence(list(ex_labels))
            pos += list(range(len(ex_ids)))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows

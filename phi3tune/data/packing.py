"""Pack tokenized examples into rows at dataset time (loop-time batching is phi3tune/batching.py).

A packed row carries ``position_ids`` that restart at 0 at every example. With no attention mask, transformers
reads those restarts as document boundaries and builds a block-diagonal causal mask (SDPA on CPU/GPU, a
FlexAttention document mask when attn_implementation="flex_attention"), so no token attends across examples.
The label of each example's first token is IGNORE (``formats.fence``).
"""

from __future__ import annotations

import bisect
import heapq
from typing import Any

import numpy as np

from .formats import fence


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
            labels += fence(list(ex_labels))
            pos += list(range(len(ex_ids)))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows

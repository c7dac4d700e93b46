"""``DataSpec(streaming=True)``: rows read, tokenized and packed while training, for sources larger than RAM.

The same formats, masking and packing as the map-style path, a window of examples at a time: ``WINDOW`` raw
examples are read, tokenized in one batch and (with packing) best-fit packed among themselves. Rows come in the
stream's order (shuffle the source beforehand; a shuffle buffer could not resume exactly).

Exact resume: the loop knows how many rows it consumed this epoch (loader batches x batch_size); ``state_at``
turns that into the datasets stream position at the start of the window holding the next row, plus how many of
that window's rows were consumed. A resumed run reloads the position, re-reads and re-packs that one window
(deterministic) and skips the consumed rows, so it sees exactly the rows an unbroken run would have seen.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch

from ..errors import DataFormatError
from .fingerprint import LAYOUT_VERSION, digest, source_fingerprint
from .formats import check_columns, detect_format, resolve_train_on
from .packing import pack_examples
from .prepared import DataSummary, PreparedData
from .registry import resolve_format
from .sources import load_stream
from .tokenize import make_encoder

WINDOW = 1000  # examples tokenized (and packed) together
_KEEP = 64  # windows whose start positions are remembered: the loop reads at most one optimizer step ahead


class StreamRows(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The rows of a streamed source, one epoch per iteration; ``set_epoch`` / ``state_at`` / ``resume``."""

    def __init__(self, raw: Any, encoder: Any, packing: bool, capacity: int, start: dict[str, Any] | None = None,
                 window: int | None = None) -> None:
        self.raw, self.encoder, self.packing, self.capacity = raw, encoder, packing, capacity
        self.window = window or WINDOW
        self.epoch = 0
        self._start = copy.deepcopy(start or raw.state_dict())  # an epoch's first example (before any read)
        self._resume: dict[str, Any] | None = None
        self._windows: deque[tuple[int, dict[str, Any]]] = deque(maxlen=_KEEP)  # (first row, stream position)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_at(self, epoch: int, rows_consumed: int) -> dict[str, Any]:
        """What a checkpoint stores: where the epoch's next row comes from (JSON-able)."""
        if epoch != self.epoch or rows_consumed == 0 or not self._windows:
            return {"epoch": epoch, "position": None, "first_row": 0, "skip": rows_consumed}
        first, position = max((w for w in self._windows if w[0] <= rows_consumed), key=lambda w: w[0])
        return {"epoch": epoch, "position": position, "first_row": first, "skip": rows_consumed - first}

    def resume(self, state: dict[str, Any]) -> None:
        """The next iteration of ``state["epoch"]`` continues where the checkpointed run stopped."""
        self._resume = state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resume, self._resume = (self._resume if self._resume and self._resume["epoch"] == self.epoch else None,
                                None)
        self.raw.load_state_dict(copy.deepcopy(resume["position"] if resume and resume["position"] else self._start))
        row, skip = (resume["first_row"], resume["skip"]) if resume else (0, 0)
        self._windows.clear()
        examples = iter(self.raw)
        while True:
            position = self.raw.state_dict()  # before this window's first example
            chunk = list(islice(examples, self.window))
            if not chunk:
                return
            self._windows.append((row, position))
            rows = self._rows(chunk)
            row += len(rows)
            yield from rows[skip:]
            skip = max(0, skip - len(rows))

    def _rows(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = list(dict.fromkeys(k for ex in chunk for k in ex))
        out = self.encoder({k: [ex.get(k) for ex in chunk] for k in keys})
        examples = [{"input_ids": np.asarray(i).tolist(), "labels": np.asarray(la).tolist()}
                    for i, la in zip(out["input_ids"], out["labels"], strict=True)]
        if self.packing:
            return pack_examples(examples, self.capacity)
        return examples


def prepare_stream(spec: Any, tokenizer: Any) -> PreparedData:
    """The streamed train (and eval) rows; the format is chosen from the first example's columns."""
    raw = load_stream(spec.source, spec.split, "data.source")
    start = raw.state_dict()  # before any read: what each epoch starts from
    first = next(iter(raw), None)
    if first is None:
        raise DataFormatError(f"data.source: the stream {spec.source!r} has no rows; give at least one example")
    fmt: str = resolve_format(spec.format)
    if fmt == "auto":
        fmt = detect_format(list(first), spec.text_field)
    check_columns(fmt, list(first), spec.text_field)
    train_on = resolve_train_on(fmt, spec.train_on)
    encoder = make_encoder(tokenizer, fmt, train_on, spec.text_field, spec.max_seq_length, spec.system_prompt)
    encoder({k: [v] for k, v in first.items()})  # a bad first row fails now, before any weights load
    train = StreamRows(raw, encoder, spec.packing, spec.max_seq_length, start)
    evals = None
    if spec.eval_source is not None:
        evals = StreamRows(load_stream(spec.eval_source, spec.split, "data.eval_source"), encoder, spec.packing,
                           spec.max_seq_length)
    options = [spec.format, spec.text_field, spec.system_prompt, spec.train_on, spec.max_seq_length, spec.packing]
    sources = [source_fingerprint(s, spec.split, field) or str(s)
               for s, field in ((spec.source, "data.source"), (spec.eval_source, "data.eval_source"))]
    return PreparedData(train, evals, DataSummary(fmt, train_on, 0, 0, 0, 0, 0), streaming=True,
                        fingerprint=digest("stream", LAYOUT_VERSION, sources, options))

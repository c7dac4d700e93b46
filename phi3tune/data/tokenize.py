"""Tokenize a batch of raw rows at once: one call into the fast (Rust) tokenizer per batch, labels by NumPy.

``encode`` (formats.py) is the one-row reference; ``encode_batch`` gives the same tokens and labels for every
row, plus each example's length and trained-token count, so that the totals are summed from those small columns
and the token columns are never pulled into Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .formats import IGNORE, _str, assistant_spans, to_messages

Batch = dict[str, list[Any]]
TOKEN_COLUMNS = ("input_ids", "labels", "length", "trained", "truncated")


def token_features() -> Any:
    """The Arrow schema of tokenized examples: int32 tokens (half of int64 on disk and in the page cache)."""
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "trained": Value("int32"), "truncated": Value("bool")})


def make_encoder(tokenizer: Any, fmt: str, train_on: str, text_field: str, max_len: int,
                 system_prompt: str | None) -> Callable[[Batch], Batch]:
    """The batched function ``Dataset.map`` runs (in each worker process)."""

    def encode_batch(batch: Batch) -> Batch:
        n = len(next(iter(batch.values()))) if batch else 0
        if fmt == "text":
            return _text(batch[text_field], text_field, tokenizer, max_len)
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        rendered = [assistant_spans(tokenizer, to_messages(r, fmt, text_field, system_prompt)) for r in rows]
        return _chat(rendered, tokenizer, train_on, max_len)

    return encode_batch


def _text(texts: list[Any], text_field: str, tokenizer: Any, max_len: int) -> Batch:
    checked = [t if isinstance(t, str) else _str({text_field: t}, text_field) for t in texts]
    out: Batch = {k: [] for k in TOKEN_COLUMNS}
    for ids in tokenizer(checked, add_special_tokens=True)["input_ids"]:
        truncated = len(ids) + 1 > max_len
        # A cut example gets no eos: it would teach the model to stop mid-sentence.
        ids = ids[:max_len] if truncated else [*ids, tokenizer.eos_token_id]
        _append(out, ids, ids, max(0, len(ids) - 1), truncated)
    return out


def _chat(rendered: list[tuple[str, list[tuple[int, int]]]], tokenizer: Any, train_on: str, max_len: int) -> Batch:
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                    return_offsets_mapping=train_on != "all")
    out: Batch = {k: [] for k in TOKEN_COLUMNS}
    for i, (_, spans) in enumerate(rendered):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int32)
        if train_on == "all":
            labels = ids
        else:
            offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
            inside = np.zeros(len(ids), dtype=bool)
            for s, e in spans:  # a token is trained if it overlaps a reply (or its end marker) at all
                inside |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
            labels = np.where(inside, ids, np.int32(IGNORE)).astype(np.int32)
        truncated = len(ids) > max_len
        ids, labels = ids[:max_len], labels[:max_len]
        _append(out, ids, labels, int(np.count_nonzero(labels[1:] != IGNORE)), truncated)
    return out


def _append(out: Batch, ids: Any, labels: Any, trained: int, truncated: bool) -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["length"].append(len(ids))
    out["trained"].append(trained)
    out["truncated"].append(truncated)

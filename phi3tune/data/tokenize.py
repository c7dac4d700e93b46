"""Tokenize a batch of raw rows at once: one call into the fast (Rust) tokenizer per batch, labels by NumPy.

``encode`` (formats.py) is the one-row reference; ``encode_batch`` gives the same tokens and labels for every
row, plus each example's length and trained-token count, so that the totals are summed from those small columns
and the token columns are never pulled into Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .cached_bpe import CachedBPE
from .formats import IGNORE, _str, assistant_spans, require_chat_template, to_messages

Batch = dict[str, list[Any]]
TOKEN_COLUMNS = ("input_ids", "labels", "length", "trained", "truncated")


def token_features() -> Any:
    """The Arrow schema of tokenized examples: int32 tokens (half of int64 on disk and in the page cache)."""
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "trained": Value("int32"), "truncated": Value("bool")})


def make_encoder(tokenizer: Any, fmt: str, train_on: str, text_field: str, max_len: int,
                 system_prompt: str | None, as_arrow: bool = False) -> Callable[[Batch], Any]:
    """The batched function ``Dataset.map`` runs (in each worker process); ``as_arrow``: it returns an Arrow
    table of ``token_features()`` instead of lists."""
    if fmt != "text":
        require_chat_template(tokenizer, fmt)

    cached = CachedBPE.for_tokenizer(tokenizer) if fmt == "text" else None

    def encode_batch(batch: Batch) -> Any:
        n = len(next(iter(batch.values()))) if batch else 0
        if fmt == "text":
            out = _text(batch[text_field], text_field, tokenizer, max_len, cached)
        else:
            rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
            rendered = [assistant_spans(tokenizer, to_messages(r, fmt, text_field, system_prompt)) for r in rows]
            out = _chat(rendered, tokenizer, train_on, max_len)
        return to_arrow(out) if as_arrow else out

    return encode_batch


def _text(texts: list[Any], text_field: str, tokenizer: Any, max_len: int, cached: CachedBPE | None) -> Batch:
    checked = [t if isinstance(t, str) else _str({text_field: t}, text_field) for t in texts]
    out: Batch = {k: [] for k in TOKEN_COLUMNS}
    eos = tokenizer.eos_token_id
    for ids in cached.encode(checked) if cached is not None else _token_ids(tokenizer, checked):
        truncated = len(ids) + 1 > max_len
        # A cut example gets no eos: it would teach the model to stop mid-sentence.
        ids = ids[:max_len] if truncated else [*ids, eos]
        _append(out, ids, ids, max(0, len(ids) - 1), truncated)
    return out


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The ids the tokenizer gives each text (with its special tokens): straight from the Rust tokenizer where
    that is the same thing (no truncation or padding set on it), which skips transformers' per-row conversion."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    return list(tokenizer(texts, add_special_tokens=True)["input_ids"])


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


def to_arrow(out: Batch) -> Any:
    """The batch as an Arrow table built from flat NumPy arrays: datasets would otherwise encode every token
    through Python to apply the int32 features."""
    import itertools

    import pyarrow as pa

    lengths = np.asarray(out["length"], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    total = int(lengths.sum())

    def flat(column: list[Any]) -> Any:
        return pa.array(np.fromiter(itertools.chain.from_iterable(column), dtype=np.int32, count=total))

    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, flat(out["input_ids"])),
                     "labels": pa.ListArray.from_arrays(offsets, flat(out["labels"])),
                     "length": pa.array(lengths.astype(np.int32)),
                     "trained": pa.array(np.asarray(out["trained"], dtype=np.int32)),
                     "truncated": pa.array(np.asarray(out["truncated"], dtype=bool))})


def _append(out: Batch, ids: Any, labels: Any, trained: int, truncated: bool) -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["length"].append(len(ids))
    out["trained"].append(trained)
    out["truncated"].append(truncated)

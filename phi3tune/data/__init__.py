"""Data: load examples, render them in their format, tokenize, mask, pack.

``prepare_dataset`` is public so a user can see exactly the tokens and labels the loop will train on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import DataFormatError
from .build import build_entry, cache_root, default_num_proc, entry_key, load_entry
from .fingerprint import dataset_fingerprint, digest, function_fingerprint, source_fingerprint, tokenizer_fingerprint
from .formats import IGNORE, check_columns, detect_format, resolve_train_on
from .prepared import DataSummary, PreparedData, row_lengths
from .registry import register_format, registered_formats, resolve_format
from .sources import load_source
from .tokenize import make_encoder

log = logging.getLogger("phi3tune")
# specs.DataSpec, by its fields; not imported: DataSpec.prepare calls this package, and imports go one way
DataSpec = Any

__all__ = ["IGNORE", "DataSummary", "PreparedData", "load_source", "prepare_data", "prepare_dataset",
           "register_format", "registered_formats", "row_lengths"]


def _resolve_format(spec: DataSpec, columns: list[str]) -> str:
    fmt: str = resolve_format(spec.format)  # built-in, registered, or "module:function"
    if fmt == "auto":
        fmt = detect_format(columns, spec.text_field)
        log.info("data.format=auto chose %r from columns %s", fmt, sorted(columns))
    check_columns(fmt, columns, spec.text_field)
    return fmt


def _format_key(fmt: str) -> Any:
    """The format as the cache key sees it: a user format function by its code too, so editing it re-tokenizes."""
    from .registry import _REGISTRY

    return [fmt, function_fingerprint(_REGISTRY[fmt].fn)] if fmt in _REGISTRY else fmt


class _Parts:
    """Finds or builds the cache entry of each part of the data (train, eval) for one spec and tokenizer."""

    def __init__(self, spec: DataSpec, tokenizer: Any, seed: int) -> None:
        self.spec, self.tokenizer, self.seed = spec, tokenizer, seed
        self.root = cache_root(spec.cache_dir)
        self.tokens = {"format": _format_key(resolve_format(spec.format)), "text_field": spec.text_field,
                       "system_prompt": spec.system_prompt, "train_on": spec.train_on,
                       "max_seq_length": spec.max_seq_length, "packing": spec.packing}
        self.tokenizer_fp = tokenizer_fingerprint(tokenizer)

    def entry(self, source_fp: str | None, part: Any) -> Path | None:
        return None if source_fp is None else self.root / entry_key(source_fp, part, self.tokens, self.tokenizer_fp)

    def build(self, raw: Any, entry: Path, fmt: str) -> tuple[Any, DataSummary]:
        spec = self.spec
        train_on = resolve_train_on(fmt, spec.train_on)
        encoder = make_encoder(self.tokenizer, fmt, train_on, spec.text_field, spec.max_seq_length,
                               spec.system_prompt, as_arrow=True)
        return build_entry(raw, entry, encoder, fmt, train_on, spec.max_seq_length, spec.packing,
                           default_num_proc(len(raw), spec.num_proc))


def _cached(entries: list[Path | None]) -> list[tuple[Any, DataSummary]] | None:
    found = [load_entry(e) if e is not None else None for e in entries]
    if any(f is None for f in found):
        return None
    return [f for f in found if f is not None]


def prepare_data(spec: DataSpec, tokenizer: Any, seed: int = 42) -> PreparedData:
    """Load, split, tokenize and (optionally) pack the train and eval sets: once, into the cache (build.py);
    a second run or a resume memory-maps what the first one wrote. ``streaming=True``: rows read as needed."""
    if spec.streaming:
        from .stream import prepare_stream

        return prepare_stream(spec, tokenizer)
    parts = _Parts(spec, tokenizer, seed)
    split = ("split", spec.eval_fraction, seed)
    train_part, eval_part = ((*split, "train"), (*split, "test")) if spec.eval_fraction else ("all", "all")
    source_fp = source_fingerprint(spec.source, spec.split)
    eval_fp = source_fingerprint(spec.eval_source, spec.split, "data.eval_source") \
        if spec.eval_source is not None else None
    wanted = [parts.entry(source_fp, train_part)]
    if spec.eval_fraction:
        wanted.append(parts.entry(source_fp, eval_part))
    elif spec.eval_source is not None:
        wanted.append(parts.entry(eval_fp, eval_part))
    hit = _cached(wanted)
    if hit is not None:
        log.info("data: reusing the prepared rows in %s (prepared by an earlier run)", wanted[0])
        return PreparedData(hit[0][0], hit[1][0] if len(hit) > 1 else None, hit[0][1],
                            fingerprint=digest([str(w) for w in wanted if w is not None]))

    raw = load_source(spec.source, spec.split, "data.source")
    fmt = _resolve_format(spec, list(raw.column_names))
    source_fp = source_fp or dataset_fingerprint(raw)
    eval_raw = None
    if spec.eval_source is not None:
        eval_raw = load_source(spec.eval_source, spec.split, "data.eval_source")
        check_columns(fmt, list(eval_raw.column_names), spec.text_field)
        eval_fp = eval_fp or dataset_fingerprint(eval_raw)
    elif spec.eval_fraction:
        if len(raw) < 2:
            raise DataFormatError("data.eval_fraction needs at least 2 examples to split off an eval set")
        split_parts = raw.train_test_split(test_size=spec.eval_fraction, seed=seed)
        raw, eval_raw, eval_fp = split_parts["train"], split_parts["test"], source_fp
    train_entry = parts.entry(source_fp, train_part)
    assert train_entry is not None
    train, summary = load_entry(train_entry) or parts.build(raw, train_entry, fmt)
    eval_rows, entries = None, [train_entry]
    if eval_raw is not None:
        eval_entry = parts.entry(eval_fp, eval_part)
        assert eval_entry is not None
        eval_rows = (load_entry(eval_entry) or parts.build(eval_raw, eval_entry, fmt))[0]
        entries.append(eval_entry)
    return PreparedData(train, eval_rows, summary, fingerprint=digest([str(e) for e in entries]))


def prepare_dataset(data_spec: DataSpec, tokenizer: Any, seed: int = 42) -> Any:
    """The training rows exactly as the loop sees them: input_ids, labels (-100 = not trained), and with
    packing, position_ids restarting at 0 at each example."""
    rows = prepare_data(data_spec, tokenizer, seed).train
    if data_spec.streaming:
        return rows
    return rows.remove_columns("length")  # the cache's bookkeeping column, not a row field

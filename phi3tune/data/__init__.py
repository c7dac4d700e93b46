"""Data: load examples, render them in their format, tokenize, mask, pack.

``prepare_dataset`` is public so a user can see exactly the tokens and labels the loop will train on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import DataFormatError
from .formats import IGNORE, check_columns, detect_format, encode, resolve_train_on
from .packing import pack_examples
from .registry import register_format, registered_formats, resolve_format
from .sources import load_source

log = logging.getLogger("phi3tune")
# specs.DataSpec, by its fields; not imported: DataSpec.prepare calls this package, and imports go one way
DataSpec = Any

__all__ = ["IGNORE", "DataSummary", "PreparedData", "load_source", "prepare_data", "prepare_dataset",
           "register_format", "registered_formats"]


@dataclass
class DataSummary:
    """The one-screen account of what the loop will see."""

    format: str
    train_on: str
    examples: int
    rows: int
    tokens: int
    truncated: int
    trained_tokens: int

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / max(1, self.tokens)

    def render(self, padding_fraction: float | None = None) -> str:
        lines = [
            f"data: format={self.format} train_on={self.train_on}",
            f"  examples {self.examples:,} -> rows {self.rows:,}; tokens {self.tokens:,}",
            f"  truncated examples {self.truncated:,} ({self.truncated / max(1, self.examples):.1%})",
            f"  trained tokens {self.trained_tokens:,} ({self.trained_fraction:.1%} of tokens)",
        ]
        if padding_fraction is not None:
            lines.append(f"  padding {padding_fraction:.1%} of batch tokens (estimated at batch_size)")
        return "\n".join(lines)


@dataclass
class PreparedData:
    """What the loop trains on: rows of input_ids / labels (IGNORE = not trained), optional position_ids."""

    train: Any
    eval: Any | None
    summary: DataSummary

    @classmethod
    def from_examples(cls, train: list[dict[str, list[int]]], eval: list[dict[str, list[int]]] | None = None,
                      format: str = "custom") -> PreparedData:
        """From your own tokenized examples (dicts with input_ids and labels): for a custom DataSpec.prepare."""
        from datasets import Dataset

        if not train or any(len(e["input_ids"]) != len(e["labels"]) for e in train):
            raise DataFormatError("PreparedData.from_examples: give examples with input_ids and labels of equal "
                                  "length")
        trained = sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in train)
        summary = DataSummary(format, "custom", len(train), len(train), sum(len(e["input_ids"]) for e in train), 0,
                              trained)
        keep = ("input_ids", "labels", "position_ids")
        rows = Dataset.from_list([{k: v for k, v in e.items() if k in keep} for e in train])
        evals = Dataset.from_list([{k: v for k, v in e.items() if k in keep} for e in eval]) if eval else None
        return cls(rows, evals, summary)


def _resolve_format(spec: DataSpec, columns: list[str]) -> str:
    fmt: str = resolve_format(spec.format)  # built-in, registered, or "module:function"
    if fmt == "auto":
        fmt = detect_format(columns, spec.text_field)
        log.info("data.format=auto chose %r from columns %s", fmt, sorted(columns))
    check_columns(fmt, columns, spec.text_field)
    return fmt


def _tokenize(ds: Any, spec: DataSpec, tokenizer: Any, fmt: str, train_on: str) -> Any:
    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        out = [encode(r, tokenizer, fmt, train_on, spec.text_field, spec.max_seq_length, spec.system_prompt)
               for r in rows]
        return {k: [o[k] for o in out] for k in ("input_ids", "labels", "truncated")}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                  desc="tokenizing")


def _to_rows(tok_ds: Any, spec: DataSpec) -> Any:
    from datasets import Dataset

    if not spec.packing:
        return tok_ds.remove_columns(["truncated"])
    rows = pack_examples([{"input_ids": i, "labels": la} for i, la in
                          zip(tok_ds["input_ids"], tok_ds["labels"])], spec.max_seq_length)
    return Dataset.from_list(rows)


def _tokens_and_summary(ds: Any, spec: DataSpec, tokenizer: Any, fmt: str) -> tuple[Any, DataSummary]:
    train_on = resolve_train_on(fmt, spec.train_on)
    tok_ds = _tokenize(ds, spec, tokenizer, fmt, train_on)
    lengths = [len(x) for x in tok_ds["input_ids"]]
    trained = sum(sum(1 for t in la[1:] if t != IGNORE) for la in tok_ds["labels"])
    if trained == 0:
        raise DataFormatError(
            f"data: no example has a trained token after masking (format={fmt}, train_on={train_on}); "
            "check the assistant/output columns or raise data.max_seq_length"
        )
    rows = _to_rows(tok_ds, spec)
    summary = DataSummary(fmt, train_on, len(tok_ds), len(rows), sum(lengths), sum(tok_ds["truncated"]), trained)
    return rows, summary


def prepare_data(spec: DataSpec, tokenizer: Any, seed: int = 42) -> PreparedData:
    """Load, split, tokenize and (optionally) pack the train and eval sets."""
    raw = load_source(spec.source, spec.split, "data.source")
    fmt = _resolve_format(spec, list(raw.column_names))
    eval_raw = None
    if spec.eval_source is not None:
        eval_raw = load_source(spec.eval_source, spec.split, "data.eval_source")
        check_columns(fmt, list(eval_raw.column_names), spec.text_field)
    elif spec.eval_fraction:
        if len(raw) < 2:
            raise DataFormatError("data.eval_fraction needs at least 2 examples to split off an eval set")
        parts = raw.train_test_split(test_size=spec.eval_fraction, seed=seed)
        raw, eval_raw = parts["train"], parts["test"]
    train, summary = _tokens_and_summary(raw, spec, tokenizer, fmt)
    eval_rows = _tokens_and_summary(eval_raw, spec, tokenizer, fmt)[0] if eval_raw is not None else None
    return PreparedData(train, eval_rows, summary)


def prepare_dataset(data_spec: DataSpec, tokenizer: Any, seed: int = 42) -> Any:
    """The training rows exactly as the loop sees them: input_ids, labels (-100 = not trained), and with
    packing, position_ids restarting at 0 at each example."""
    return prepare_data(data_spec, tokenizer, seed).train

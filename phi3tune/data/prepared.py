"""What preparation hands the loop: the rows, and a one-screen account of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataFormatError
from .formats import IGNORE


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
    """What the loop trains on: rows of input_ids / labels (IGNORE = not trained), optional position_ids.

    ``train`` is a map-style ``datasets.Dataset`` (memory-mapped from the cache), or with ``streaming`` a
    ``StreamRows`` that reads, tokenizes and packs the source as the loop asks for rows."""

    train: Any
    eval: Any | None
    summary: DataSummary
    streaming: bool = False
    fingerprint: str | None = None  # what the rows are made of (checkpoints compare it on resume); None: hash rows

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


def row_lengths(rows: Any) -> Any:
    """Each row's token count as a NumPy array: from the ``length`` column prepared data carries, else counted."""
    import numpy as np

    if "length" in rows.column_names:  # one Arrow slice: column access by name would iterate row by row
        return rows.with_format("arrow", columns=["length"])[:].column("length").to_numpy()
    return np.fromiter((len(x) for x in rows["input_ids"]), dtype=np.int64, count=len(rows))

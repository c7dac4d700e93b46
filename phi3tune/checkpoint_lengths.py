"""Checkpointing by micro-batch length: a plan sized for its longest micro-batch checkpoints the fewest (first)
decoder layers that keep *each* micro-batch within the same predicted peak, so a short one checkpoints fewer layers
or none.

Why: unpacked rows make micro-batches of very different lengths (the README quickstart's steps hold 1,853-4,686
tokens), and a card that holds a whole step only with some layers checkpointed used to checkpoint them on every
step. Per length, only the steps that need it pay the recomputation. Which layers run checkpointed changes only
where activations live, never the math: every plan trains the same tokens with the same loss
(tests/test_checkpoint_lengths.py).

The plan computes the table (``plan._candidate``, ``table``); the loss module asks ``LengthCheckpointing`` before
each pass; the compile warm-up passes every length through it, so each layer's graphs for both ways are built
before the first step (``compiled_layers.graph_room`` counts them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .recompute import set_checkpointing

Table = tuple[tuple[int, int], ...]  # ((up to this many tokens, checkpoint this many first layers), ...) ascending


def table(lengths: Sequence[int], peak_layers: int, peak: float, peak_of: Callable[[int, int], float]) -> Table:
    """For each micro-batch length of ``lengths`` (ascending; the last is the plan's longest, which checkpoints
    ``peak_layers``), the fewest first layers whose predicted peak ``peak_of(tokens, layers)`` stays within
    ``peak``; only the lengths where that count changes are kept. The count is searched upward from 0: one
    checkpointed layer can cost more than none (it is recomputed whole, where the others keep a budget's share),
    and from the last length's count: a longer micro-batch needs at least as many."""
    out: list[tuple[int, int]] = []
    for n in lengths[:-1]:
        first = out[-1][1] if out else 0
        k = next((j for j in range(first, peak_layers) if peak_of(n, j) <= peak), peak_layers)
        if out and out[-1][1] == k:
            out[-1] = (n, k)
        else:
            out.append((n, k))
    if out and out[-1][1] == peak_layers:
        out.pop()
    return (*out, (lengths[-1], peak_layers)) if lengths else ()


def layers_for(lengths: Table, tokens: int, default: int) -> int:
    """How many first layers a micro-batch of ``tokens`` checkpoints: the first entry that holds it; longer than
    every entry (an example longer than the plan's micro-batches), or no table: ``default``."""
    return next((k for upto, k in lengths if tokens <= upto), default)


def recomputed_share(lengths: Table, layers: int, steps: Sequence[int]) -> float | None:
    """The share of decoder layers recomputed, token-weighted over ``steps`` (each step's tokens, one micro-batch
    each: whole-step plans), for the cost model; None without a table or steps."""
    total = sum(steps)
    if not lengths or not total or not layers:
        return None
    return sum(n * layers_for(lengths, n, lengths[-1][1]) for n in steps) / (total * layers)


class LengthCheckpointing:
    """Checkpoints the first ``layers_for`` decoder layers for a pass of ``tokens`` and not the rest
    (``recompute.set_checkpointing``: inside their compiled graphs, or transformers' ``gradient_checkpointing``
    when the model loaded with it)."""

    def __init__(self, layers: Sequence[Any], lengths: Table, default: int) -> None:
        self.layers, self.lengths, self.default = list(layers), lengths, default
        self.current: int | None = None

    def __call__(self, tokens: int) -> None:
        k = layers_for(self.lengths, tokens, self.default)
        if k != self.current:
            for i, layer in enumerate(self.layers):
                set_checkpointing(layer, i < k)
            self.current = k


def length_checkpointing(lengths: Table, longest: int, model: Any) -> LengthCheckpointing | None:
    """The run's per-length switch for a plan's ``checkpoint_lengths`` (``longest``: its ``checkpoint_layers``),
    or None where every pass checkpoints the same (no table)."""
    if not lengths:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return LengthCheckpointing(base.model.layers, lengths, longest)

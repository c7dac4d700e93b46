"""Checkpointing a compiled decoder layer inside its own graphs: the layer's plain compiled call and a second one
compiled at activation budget 0, switched per pass (``compiled_layers.compile_layers`` builds both,
``checkpoint_lengths`` switches them). No phi3tune import: the plan's modules and the compiler's both use it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class RecomputeSwitch:
    """A compiled decoder layer's call, switchable between its plan's graphs and graphs that checkpoint it.

    At activation budget 0 the partitioner saves only the graph's inputs (functorch's ``choose_saved_values_set``)
    and recomputes everything else in the backward graph: what ``torch.utils.checkpoint`` does around a compiled
    layer, with the same kernels' math (the hashed LoRA dropout masks are a function of the step's key:
    lora_dropout.py), but without its second forward call per layer, whose host time bounds small cards' steps
    (session 23: +12.7% on an 8 GiB card). Both are compiled from the module's own call (``nn.Module.compile``
    keeps its compiled call in ``_compiled_call_impl``); dynamo keeps their graphs apart by backend. ``on``: this
    layer recomputes (``checkpoint_lengths`` sets it per pass); eval and other passes without gradients take the
    plan's graphs, which they share with training."""

    def __init__(self, plain: Callable[..., Any], recomputing: Callable[..., Any]) -> None:
        self.plain, self.recomputing, self.on = plain, recomputing, False

    @classmethod
    def install(cls, layer: torch.nn.Module, compiler: Callable[..., Any], dynamic: bool) -> None:
        plain = getattr(layer, "_compiled_call_impl", None)
        if plain is None:  # a torch whose Module.compile keeps its compiled call under another name
            raise RuntimeError("recompute: nn.Module.compile left no _compiled_call_impl in this torch; run with "
                               "PHI3TUNE_RECOMPUTE_IN_GRAPH=0 (torch.utils.checkpoint around the compiled layers)")
        recomputing = torch.compile(layer._call_impl, backend=compiler, dynamic=None if dynamic else False)
        layer._compiled_call_impl = cls(plain, recomputing)

    @staticmethod
    def of(layer: torch.nn.Module) -> RecomputeSwitch | None:
        switch = getattr(layer, "_compiled_call_impl", None)
        switch = getattr(switch, "inner", switch)  # a call wrapped around it (streamed_base.StreamedCall)
        return switch if isinstance(switch, RecomputeSwitch) else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.recomputing if self.on and torch.is_grad_enabled() else self.plain
        return call(*args, **kwargs)


def set_checkpointing(layer: torch.nn.Module, on: bool) -> None:
    """Checkpoint ``layer`` (a transformers GradientCheckpointingLayer) or not: inside its compiled graph where it
    has a ``RecomputeSwitch``, else by ``torch.utils.checkpoint`` (transformers' ``gradient_checkpointing``)."""
    switch = RecomputeSwitch.of(layer)
    if switch is not None:
        switch.on = on
    else:
        setattr(layer, "gradient_checkpointing", on)  # noqa: B010  (nn.Module types its attributes as tensors)

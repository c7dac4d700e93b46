"""The frozen 4-bit base, dequantized once for the run where the card has room for it.

Compiled layers dequantize every 4-bit weight twice a micro-batch: in forward, and again in backward rather than
keep it. The base is frozen, so those values never change: a card with room for them (the compute dtype's 2 bytes
a weight, 6.8 GiB for Phi-3-mini) keeps them, and each matmul reads them as they are. Measured on the H200 (README
quickstart, docs/performance.md, session 9): ~16 ms less a micro-batch, median step 0.1545 -> 0.137 s unpacked and
0.320 -> 0.304 s packed. They are bitsandbytes' own dequantization, so every matmul multiplies the same numbers
as before (tests compare losses and gradients bit for bit). The plan decides (``RunPlan.dequantized_base``); the
4-bit layers go back when the run ends, so the model a run returns, and its saved adapter, are what they would
have been.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DequantizedLinear(nn.Module):
    """A bitsandbytes ``Linear4bit``'s forward on its weights dequantized once: the input cast to the compute
    dtype, ``F.linear``, the output cast back (as ``Linear4bit.forward`` does). The 4-bit layer is held, not
    registered, so it stays out of ``parameters()`` and ``state_dict()`` and can be put back (``restore_4bit``)."""

    original: nn.Module

    def __init__(self, original: nn.Module, dtype: torch.dtype) -> None:
        import bitsandbytes.functional as bnbf

        super().__init__()
        weight: Any = original.weight
        bias: Any = original.bias
        values = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        object.__setattr__(self, "original", original)  # not a submodule (see the class docstring)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def _children(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every submodule of ``model`` of ``kind``: a list, so replacing them is safe."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, kind)]


def dequantize_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes 4-bit linear layer of ``model`` (a LoRA layer's base, or one with no adapter)
    by a :class:`DequantizedLinear` in ``dtype``; one layer at a time, so the peak grows by one layer's values at
    most beyond the result. Returns the bytes the dequantized weights take."""
    from bitsandbytes.nn import Linear4bit

    held = 0
    for parent, name, child in _children(model, Linear4bit):
        replacement = DequantizedLinear(child, dtype)
        setattr(parent, name, replacement)
        held += replacement.weight.numel() * replacement.weight.element_size()
    return held


def restore_4bit(model: nn.Module) -> int:
    """Put back every 4-bit layer :func:`dequantize_base` replaced (its dequantized values are freed); returns
    how many."""
    restored = 0
    for parent, name, child in _children(model, DequantizedLinear):
        setattr(parent, name, child.original)  # type: ignore[attr-defined]
        restored += 1
    return restored

"""LoRA's B product folded into the frozen base's matmul: one GEMM a linear where PEFT runs two and an add.

PEFT computes ``base(x) + B(A(drop(x))) * s``: the base matmul writes an M x N output, the r-wide B matmul writes
another, and the add reads both. With ``h = A(drop(x)) * s`` (M x r) the same sum is one matmul over K + r:
``[x | h] @ [W | B]ᵀ`` (one fp32 accumulation and one rounding, where PEFT rounds three times). Backward folds the
same way for a 4-bit base: ``dy @ [B | W]`` gives h's and the input's gradients in one GEMM (a dense base's
backward runs two, as PEFT's: concatenating a dense W would copy it); B's gradient is ``dyᵀ h`` alone. Plain
autograd through ``cat([W, B])`` would compute the whole [N, K + r] weight gradient (a forward-sized GEMM) to keep
B's r columns, hence the ``autograd.Function``, which, as bitsandbytes' own 4-bit matmul does, dequantizes the
4-bit weight again in backward rather than keep it (in a compiled layer the partitioner decides).

A benchmark knob (PHI3TUNE_LORA_FOLD=1, on any plan), not a plan's choice: on the GPU it ran out of memory on a
16 GiB card, its speed not yet measured (docs/performance.md, session 35). :func:`fold_lora` gives each plain LoRA
linear a :class:`FoldedBase` as its base layer (which computes the folded product) and the :class:`AlreadyFolded`
variant (so PEFT's forward adds nothing more); the PEFT modules and their parameters' names stay as they are, so
saved adapters are PEFT's. :func:`unfold_lora` undoes both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _dense(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [N, K] in ``dtype``: bitsandbytes' dequantization where it is 4-bit (``quant_state``)."""
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


class _FoldedMatmul(torch.autograd.Function):
    """``[x | h] @ [W | B]ᵀ`` for 2-D ``x`` [M, K], ``h`` [M, r]; ``weight`` frozen (4-bit with ``quant_state``,
    else dense), ``b`` [N, r] trained."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, b: torch.Tensor,
                quant_state: Any) -> torch.Tensor:
        dtype = x.dtype
        wb = torch.cat([_dense(weight, quant_state, dtype), b.to(dtype)], dim=1)
        ctx.quant_state, ctx.b_dtype = quant_state, b.dtype
        ctx.save_for_backward(h, weight, b)
        return F.linear(torch.cat([x, h.to(dtype)], dim=1), wb)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        h, weight, b = ctx.saved_tensors
        db = (dy.t() @ h.to(dy.dtype)).to(ctx.b_dtype)
        if ctx.quant_state is None:  # a dense base: two GEMMs, as PEFT's, cheaper than copying W into a cat
            return dy @ weight.to(dy.dtype), (dy @ b.to(dy.dtype)).to(h.dtype), None, db, None
        # the 4-bit base's dequantization writes into the cat at no extra cost: one GEMM for both gradients. [B | W],
        # not forward's [W | B]: in a compiled layer the joint graph's CSE would merge two equal concatenations,
        # and the partitioner never recomputes a cat that feeds a matmul, so every layer's [N, K + r] weight would
        # be saved for backward (+6.75 GiB on Phi-3-mini, s36c1). Reversed, the cat is backward's own
        bw = torch.cat([b.to(dy.dtype), _dense(weight, ctx.quant_state, dy.dtype)], dim=1)
        both = dy @ bw  # [M, r + K]: h's gradient and the input's
        r = h.shape[1]
        return both[:, r:], both[:, :r].to(h.dtype), None, db, None


class AlreadyFolded:
    """A PEFT LoRA variant (``LoraLayer.lora_variant``, PEFT's own hook for other ways to compute LoRA, e.g. DoRA;
    PEFT calls it private and subject to change) whose forward adds nothing: the module's base layer, a
    :class:`FoldedBase`, already computed the LoRA product with its own. Merging is refused: unfold first."""

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        return None

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        return result

    @staticmethod
    def _refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("phi3tune folded this LoRA layer for a run (lora_fold.py): unfold_lora(model) first")

    merge_safe = merge_unsafe = unmerge = _refuse


class FoldedBase(nn.Module):
    """The base layer of a PEFT LoRA linear, computing ``base(x) + B(A(drop(x))) * s`` as one folded matmul. It
    registers the base's own ``weight`` (so the module's parameters keep their names) and holds the replaced base
    and the LoRA module it serves unregistered (no parameter appears twice); :func:`unfold_lora` puts the base
    back."""

    original: nn.Module
    owner: nn.Module

    def __init__(self, owner: nn.Module, adapter: str) -> None:
        super().__init__()
        base: Any = owner.base_layer
        self.weight = base.weight
        self.adapter = adapter
        object.__setattr__(self, "original", base)
        object.__setattr__(self, "owner", owner)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        owner: Any = self.owner
        base: Any = self.original
        quant_state = getattr(self.weight, "quant_state", None)
        compute = getattr(base, "compute_dtype", None) or self.weight.dtype  # as the base's own forward computes
        a = owner.lora_A[self.adapter]
        lora_in = x if torch.is_autocast_enabled() else x.to(a.weight.dtype)  # as PEFT casts
        h = a(owner.lora_dropout[self.adapter](lora_in)) * owner.scaling[self.adapter]
        y = _FoldedMatmul.apply(x.reshape(-1, x.shape[-1]).to(compute), h.reshape(-1, h.shape[-1]), self.weight,
                                owner.lora_B[self.adapter].weight, quant_state)
        out_dtype = torch.promote_types(x.dtype, h.dtype)  # PEFT's base output (x's dtype) plus the LoRA term
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(out_dtype)


def _foldable(module: nn.Module) -> str | None:
    """The adapter a LoRA linear would fold (None: not a plain single-adapter LoRA linear on a bias-free base)."""
    tables = [getattr(module, name, None) for name in ("lora_A", "lora_B", "lora_dropout")]
    variants = getattr(module, "lora_variant", None)
    base = getattr(module, "base_layer", None)
    if not all(isinstance(t, nn.ModuleDict) for t in tables) or not isinstance(variants, dict) or base is None \
            or isinstance(base, FoldedBase) or getattr(base, "bias", None) is not None or not hasattr(base, "weight"):
        return None
    active = list(getattr(module, "active_adapters", []))
    if len(active) != 1 or active[0] in variants or getattr(module, "merged", False):
        return None
    lora_b: Any = tables[1]
    return active[0] if getattr(lora_b[active[0]], "bias", None) is None else None


def fold_lora(model: nn.Module) -> int:
    """Fold every plain LoRA linear of ``model``: its base layer a :class:`FoldedBase`, its adapter's variant
    :class:`AlreadyFolded`. Returns how many."""
    folded = 0
    for module in list(model.modules()):
        adapter = _foldable(module)
        if adapter is not None:
            variants: Any = module.lora_variant
            module.base_layer = FoldedBase(module, adapter)
            variants[adapter] = AlreadyFolded
            folded += 1
    return folded


def unfold_lora(model: nn.Module) -> int:
    """Undo :func:`fold_lora`: each base layer and PEFT's plain forward back; returns how many."""
    restored = 0
    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, FoldedBase):
            variants: Any = module.lora_variant
            module.base_layer = base.original
            del variants[base.adapter]
            restored += 1
    return restored

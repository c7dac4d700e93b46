"""LoRA dropout whose mask is a function of (key, element index), so a compiled layer can recompute it in backward.

PEFT's LoRA dropout is ``nn.Dropout``: its mask comes from the RNG, so a compiled layer must keep, for backward, the
dropped input of every LoRA'd linear (4 per decoder layer; fp32 where PEFT casts it to the adapter's dtype, as it does
outside CUDA autocast) or its mask. Measured on the H200 (README
quickstart, docs/performance.md, session 5) that was 2.9 GiB of the 20.6 GiB peak and 6% of the median step, and
it rules out the partitioner's activation budget, which recomputes cheap ops instead of saving them: torch redraws
a random mask when it recomputes it in backward (wrong gradients; tests/test_lora_dropout.py shows it). Here the
mask is a hash of a per-micro-batch key, a per-module salt and the element's index, in int32 torch ops (the bits
of the uint32 hash; int64 before session 22, the same masks) that the compiler fuses into the kernels that read the
input. Each element is still dropped with probability ``p``
(resolution 2**-32), independently, and the kept ones scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does.

The key is one int64 device tensor that every such module reads; the loop sets it before each micro-batch from
(seed, rank, step, micro-batch), so a resumed run draws the masks an unbroken one draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .knobs import int64_dropout_hash_wanted, scale_on_input_wanted

_MASK = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int) -> Any:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (two 16-bit halves of ``c``)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def mix32(x: Any) -> Any:
    """A 32-bit integer hash (Wellons' lowbias32), on Python ints or int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def micro_batch_key(seed: int, rank: int, step: int, micro: int) -> int:
    """The key of one micro-batch: distinct per (seed, rank, step, micro-batch), the same on every resume."""
    key = mix32(seed & _MASK)
    for part in (rank, step, micro):
        key = mix32(key ^ (part & _MASK))
    return int(key)


def _signed32(v: int) -> int:
    """The int32 whose bits are the uint32 ``v``."""
    return v - (1 << 32) if v >= 1 << 31 else v


def mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` on int32 tensors holding the uint32 bits: the same bits out. A GPU has no 64-bit integer
    multiply (each is several 32-bit ones), and the int64 version runs per element of every LoRA input, in
    forward and wherever backward recomputes a mask; int32 multiplies wrap modulo 2**32, as the hash wants, and
    masking an arithmetic shift's sign bits makes it the logical one."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _signed32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _signed32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def keep_mask(x: torch.Tensor, p: float, key: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """Which elements of ``x`` survive: a hash of (key, salt, index) at or above ``p * 2**32`` (as uint32). In
    int32 (:func:`mix32_int32`, the same bits) where the indices fit, else in int64."""
    threshold = round(p * 2**32)
    mixed_key = mix32(key ^ salt)  # one scalar
    if x.numel() > 1 << 31 or int64_dropout_hash_wanted():
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
        return mix32(mixed_key ^ mix32(index)) >= threshold
    index32 = torch.arange(x.numel(), device=x.device, dtype=torch.int32).view(x.shape)
    key32 = torch.where(mixed_key >= 1 << 31, mixed_key - (1 << 32), mixed_key).to(torch.int32)
    mixed = mix32_int32(key32 ^ mix32_int32(index32))
    # compared as the uint32 it is, in int64: so the partitioner still sees the mask as a reduction (8 bytes in, 1
    # out; 4 in would not do) and keeps it saved, as knobs.RECOMPUTE_MASKS describes, rather than hash again in
    # backward (measured on the CPU: with an int32 comparison a tiny layer saved 60% fewer mask bytes)
    return (mixed.to(torch.int64) & _MASK) >= threshold


class RecomputableDropout(nn.Module):
    """``nn.Dropout(p)`` with a hashed mask, times the adapter's scale (``scale``: PEFT's ``alpha / r``, which the
    LoRA layer's own ``scaling`` then leaves out, see :func:`make_recomputable`). ``key`` (shared, set per
    micro-batch) and ``salt`` (this module's) are int64 device tensors held as plain attributes: not buffers, so no
    ``.to()``, state dict or DDP buffer broadcast touches them, and to the compiler they are inputs (one graph for
    every layer)."""

    def __init__(self, p: float, key: torch.Tensor, salt: int, scale: float = 1.0) -> None:
        super().__init__()
        self.p = float(p)
        self.key = key
        self.salt = torch.tensor(salt & _MASK, dtype=torch.int64, device=key.device)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x if self.scale == 1.0 else x * self.scale
        return x * (keep_mask(x, self.p, self.key, self.salt).to(x.dtype) * (self.scale / (1.0 - self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}"


class ScaledLoraOutput(nn.Identity):
    """PEFT's ``nn.Identity`` (LoRA without dropout) in its place, carrying the layer's scale, which a forward hook
    applies to ``lora_A``'s output (r wide: 64 values a token in the quickstart's shape) while the layer's own
    ``scaling`` is 1 (:func:`make_recomputable`); :func:`make_plain` takes the hook out and puts both back."""

    def __init__(self, lora_a: nn.Module, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)
        self._handle = lora_a.register_forward_hook(self._scaled)

    def _scaled(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale

    def remove(self) -> None:
        """Take the hook off ``lora_A``."""
        self._handle.remove()

    def extra_repr(self) -> str:
        return f"scale={self.scale} on lora_A's output"


def _lora_dropouts(model: nn.Module) -> Iterator[tuple[Any, str, nn.Module]]:
    """Every LoRA layer's dropout of ``model``: (PEFT's LoRA layer, the adapter's name, its dropout module)."""
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if isinstance(table, nn.ModuleDict):
            for name, drop in list(table.items()):
                yield module, name, drop


def make_recomputable(model: nn.Module, device: torch.device) -> torch.Tensor | None:
    """Replace every LoRA ``nn.Dropout`` of ``model`` by a :class:`RecomputableDropout` sharing one key tensor on
    ``device`` and applying the layer's scale, whose own ``scaling`` becomes 1 (without dropout the scale goes on
    ``lora_A``'s output: :class:`ScaledLoraOutput`); returns that tensor (None where the model has no LoRA
    dropout).

    Why the scale moves: PEFT computes ``lora_B(lora_A(dropout(x))) * scaling``, so backward multiplies the
    output's gradient (tokens x out features: 9,216 or 16,384 wide in Phi-3-mini) by the scale and writes that
    copy out for both LoRA matmuls, once per LoRA'd linear. Applied to the input instead, the scale rides on the
    dropout mask's multiply, the LoRA matmuls read the output's gradient as it is (once the compiler drops the
    ``* 1`` left behind: unit_scale.py), and every gradient is the same number times the same factor: bit for bit
    where the scale is a power of two (alpha / r = 16 / 64, the default) in fp32 and bf16, as it commutes exactly
    with each product and sum (in fp16 values under its smallest normal, 2**-14, may round differently). Without
    dropout (p = 0) a scaled input would be one more tensor saved for backward (measured on the CPU), where the
    dropout's input is saved with or without it; there the scale goes on ``lora_A``'s r-wide output instead
    (:class:`ScaledLoraOutput`: PEFT's ``nn.Identity`` kept in place, and ``lora_B`` saves its input as before).
    DoRA's layers keep their own scale."""
    key = torch.zeros((), dtype=torch.int64, device=device)
    salt, on_input = 0, scale_on_input_wanted()
    for layer, name, drop in _lora_dropouts(model):
        scaling = getattr(layer, "scaling", {})
        # plain LoRA only: a variant's forward (DoRA's) reads ``scaling`` for more than the product
        fold = on_input and name in scaling and name not in getattr(layer, "lora_variant", {})
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            salt += 1
            layer.lora_dropout[name] = RecomputableDropout(drop.p, key, mix32(salt), scaling[name] if fold else 1.0)
        elif type(drop) is nn.Identity and fold and name in getattr(layer, "lora_A", {}):
            layer.lora_dropout[name] = ScaledLoraOutput(layer.lora_A[name], scaling[name])
        else:
            continue
        if fold:
            scaling[name] = 1.0
    return key if salt else None


def make_plain(model: nn.Module) -> None:
    """Put PEFT's ``nn.Dropout`` (or ``nn.Identity``, its hook taken off ``lora_A``) and each layer's scale back
    (after training: the model a run returns holds no key that nothing sets, and merges with its own ``scaling``),
    in the mode of the module it replaces (a new ``nn.Dropout`` trains: in a model already set to eval it would
    drop)."""
    for layer, name, drop in _lora_dropouts(model):
        if isinstance(drop, RecomputableDropout):
            layer.lora_dropout[name] = nn.Dropout(drop.p).train(drop.training)
        elif isinstance(drop, ScaledLoraOutput):
            drop.remove()
            layer.lora_dropout[name] = nn.Identity().train(drop.training)
        else:
            continue
        # folded: scaling is 1 and the module held the scale; not (DoRA, the knob): the module's scale is 1
        layer.scaling[name] *= drop.scale


def find_key(model: nn.Module) -> torch.Tensor | None:
    """The key tensor :func:`make_recomputable` installed in ``model`` (None: PEFT's own dropout, or none)."""
    return next((drop.key for _, _, drop in _lora_dropouts(model) if isinstance(drop, RecomputableDropout)), None)

"""What an offloaded forward holds (``offload.py``): each moved tensor's host copy and its way back, the forward's
chain of them that backward walks, and the one pinned host buffer a forward's copies share."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _strides_back(t: torch.Tensor) -> tuple[int, ...]:
    """The strides ``t``'s copy gets back on the device: its own where its elements fill their span exactly (dense,
    no overlap: compiled backward graphs expect the layout they saved), else contiguous ones."""
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    if t.numel() and all(st >= 0 for st in t.stride()) and span == t.numel():
        return tuple(t.stride())
    out, step = [], 1
    for n in reversed(t.shape):
        out.append(step)
        step *= max(1, n)
    return tuple(reversed(out))


class _Slab:
    """One host buffer that a forward's moved tensors take in turn, reused by the next forward once no entry of
    the last one needs it. Pinning host memory is slow (the driver maps each page), and one pinned tensor per saved
    tensor makes every new length pin new blocks: session 20's 8 GiB run with 22 layers moved had not finished its
    compile warm-up (38 lengths) after 65 s."""

    ALIGN = 512  # each slice starts here: any dtype's view of it is aligned

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.offset = 0
        self.owner: weakref.ref[_Chain] | None = None  # the forward whose entries it holds

    def take(self, chain: _Chain, t: torch.Tensor) -> torch.Tensor | None:
        """A contiguous host tensor of ``t``'s shape and dtype in the slab, or None where it is full or the last
        forward's entries still need it (copies on the one side stream keep their order, so a slice read back
        before is never overwritten before that copy ran)."""
        owner = self.owner() if self.owner is not None else None
        if owner is not chain:
            if owner is not None and owner.unused:
                return None
            self.owner, self.offset = weakref.ref(chain), 0
        end = self.offset + _nbytes(t)
        if end > self.buffer.numel():
            return None
        piece = self.buffer[self.offset:end]
        self.offset = -(-end // self.ALIGN) * self.ALIGN
        return piece.view(t.dtype).view(t.shape)


@dataclass(eq=False)
class _Held:
    """One saved tensor in host memory: where it came from, the copy, and (once fetched) its way back."""

    host: torch.Tensor  # contiguous
    device: torch.device
    chain: _Chain
    stride: tuple[int, ...]  # the saved tensor's strides, which the tensor backward gets must have
    copied: Any = None  # CUDA event: the device-to-host copy has finished
    source: torch.Tensor | None = None  # the device tensor, until the compute stream has waited for ``copied``
    back: torch.Tensor | None = None  # fetched device copy
    arrived: Any = None  # CUDA event: ``back`` is complete
    before: _Held | None = None  # the entry packed just before this one (backward needs it next)
    ahead: bool = False  # fetched ahead of its unpack: counted in its chain's ``ahead`` bytes
    used: bool = False  # unpacked once already: no prefetch for it again


@dataclass(eq=False)
class _Lead:
    """A tensor saved just after the moved ones, left on the device: its unpack starts their way back."""

    tensor: torch.Tensor
    chain: _Chain


@dataclass(eq=False)
class _Chain:
    """One forward's moved entries, newest first through ``_Held.before``, and backward's walk back through them.
    It points at entries only weakly (each entry points at it): the autograd graph alone keeps them, so each one's
    host and device copies go as soon as its backward has run, not at the next cyclic garbage collection."""

    limit: float  # bytes to move this forward
    lookahead: float  # bytes to have on their way back ahead of backward (0: one entry at a time)
    # where every save moves: a save that starts this many bytes into the forward stays on the device (its tail)
    keep_from: float = float("inf")
    keep_room: float = 0.0  # and the tail's bytes stop there
    moved: int = 0
    led: int = 0  # bytes of the tensors saved after the limit that carry a _Lead
    last: weakref.ref[_Held] | None = None
    cursor: weakref.ref[_Held] | None = None  # the next entry to fetch ahead
    started: bool = False  # backward has begun the walk
    ahead: int = 0  # bytes fetched ahead and not yet unpacked
    ahead_n: int = 0  # and how many entries
    # what this forward offered: (storage, view, version) -> the tensor, while it lives
    seen: dict[tuple[Any, ...], weakref.ref[torch.Tensor]] = field(default_factory=dict)
    shared: int = 0  # tensors offered again, left on the device
    kept: int = 0  # tensors past the limit or in the tail, left on the device
    kept_bytes: int = 0
    saved: int = 0  # bytes this forward offered (moved or not): the next forward's share is of this
    tokens: int = field(default=1)
    flight: list[_Held] = field(default_factory=list)  # entries still holding their device tensor, oldest first
    flying: int = 0  # their bytes
    stream: Any = None  # the compute stream the forward runs on (CUDA)
    unused: int = 0  # entries not unpacked yet (the slab is not reused before this is 0)

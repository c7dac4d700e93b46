"""Checkpointed layers' inputs kept in pinned host memory, not on the GPU, until backward recomputes the layer.

With every decoder layer checkpointed (the memory plan) what stays on the GPU between forward and backward is each
layer's input: 32 x tokens x hidden in bf16 for Phi-3-mini, 0.75 GiB for one 4,096-token example. Non-reentrant
``torch.utils.checkpoint`` saves those inputs through the autograd saved-tensor hooks active at the layer call (its
own hooks take over inside the layer), so ``Offloader.hooks()`` around the decoder stack sees exactly them (and the
final norm's saved tensors). Each one is copied to pinned host memory on a side stream as soon as forward has made
it, and its GPU memory is released once the copy is done; backward copies it back, one layer ahead of the one
being recomputed, on the same side stream. The values are copies: the loss and gradients are bit for bit those
of plain checkpointing (tests/test_offload.py). Torch's own ``save_on_cpu`` copies on the compute stream with no
lookahead (torchtune's ``OffloadActivations`` has both, but torchtune is not among our dependencies).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors (indices, norms' scales) stay where they are: a copy costs more


@dataclass
class _Held:
    """One saved tensor in host memory: where it came from, the copy, and (once prefetched) its way back."""

    host: torch.Tensor
    device: torch.device
    copied: Any = None  # CUDA event: the device-to-host copy has finished
    back: torch.Tensor | None = None  # prefetched device copy
    arrived: Any = None  # CUDA event: ``back`` is complete
    before: _Held | None = None  # the entry packed just before this one (backward needs it next)
    used: bool = False  # unpacked once already: no prefetch for it again


class Offloader:
    """Saved-tensor hooks that move large saved tensors to (pinned) host memory and back.

    ``min_bytes``: smaller CUDA tensors are saved as they are. On the CPU (tests) every saved tensor's "host copy"
    is a clone in new memory, so the original is released just as on a GPU."""

    def __init__(self, min_bytes: int = MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self._last: _Held | None = None  # during a forward: the latest entry (a chain back to the first)
        self._stream: Any = None
        self.packed = 0  # tensors moved by the last forward (tests, logs)
        self._hooks = (self._pack, self._unpack)  # the same two objects every forward

    def _side(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Offload what the code inside saves for backward (one forward: the lookahead follows its order)."""
        self._last, self.packed = None, 0
        try:
            with torch.autograd.graph.saved_tensors_hooks(*self._hooks):
                yield
        finally:  # from now on only the autograd graph holds the entries, and frees each after its backward
            self._last = None

    def _pack(self, t: torch.Tensor) -> Any:
        if t.layout != torch.strided or (t.device.type == "cuda" and t.numel() * t.element_size() < self.min_bytes):
            return t
        if t.device.type != "cuda":  # the CPU (tests): every saved tensor, so the mechanism shows at any size
            held = _Held(t.detach().clone(), t.device)
        else:
            side, now = self._side(t.device), torch.cuda.current_stream(t.device)
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            side.wait_stream(now)  # ``t`` is complete
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            t.record_stream(side)  # its memory is not reused before the copy has read it
            held = _Held(host, t.device, copied)
        held.before, self._last = self._last, held
        self.packed += 1
        return held

    def _unpack(self, held: Any) -> torch.Tensor:
        if not isinstance(held, _Held):
            return held
        held.used = True
        if held.device.type != "cuda":
            return held.host
        now = torch.cuda.current_stream(held.device)
        if held.back is None:
            self._fetch(held)
        back, held.back = held.back, None
        assert back is not None
        now.wait_event(held.arrived)
        back.record_stream(now)
        before = held.before  # backward runs the layers in reverse: the one packed before is next
        if before is not None and before.back is None and not before.used:
            self._fetch(before)
        return back

    def _fetch(self, held: _Held) -> None:
        """Start the host-to-device copy of ``held`` on the side stream."""
        side = self._side(held.device)
        with torch.cuda.stream(side):
            side.wait_event(held.copied)
            held.back = held.host.to(held.device, non_blocking=True)
            held.arrived = torch.cuda.Event()
            held.arrived.record(side)

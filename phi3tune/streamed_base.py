"""The frozen 4-bit base in pinned host memory, two decoder layers' worth on the device at a time.

On a small card the 4-bit base is most of what no micro-batch size reduces: Phi-3-mini's packed weights are 1.69
GiB of a ~3 GiB fixed part (memory.py). They never change, and each decoder layer needs its own only while it runs
(forward, then its backward: recomputation included). So each layer's packed bytes stay in pinned host memory, and
two device slots take turns: layer i runs from slot i % 2 while the next one's bytes (layer i + 1 in forward,
i - 1 in backward) are copied into the other slot on a side stream. The block scales (absmax, 1/8 of the bytes)
stay on the device, after one trip to host memory that lets the region the weights leave come free whole
(``StreamedBase._repack``). A plan may keep some layers' bytes on the device (``resident``, spread evenly): the
streamed layers then take the slots in turn, and each one's copy overlaps the resident layers before it too. A
layer's weight *is* its slot (``Params4bit.data`` points there), so eager, compiled and recomputed code all read it
unchanged; what this module adds is the order: a slot is refilled only after the
compute stream has queued everything that reads it, and a layer starts only once its bytes have arrived.

Triggers, all outside the compiled graphs: the layer's call (wrapped in ``_compiled_call_impl``, as
recompute.RecomputeSwitch is, so compiled layers run no hook inside their graphs) and, for backward, a hook on the
layer's output gradient, which runs before the layer's backward (and any recomputation of it) starts. The values
are copies of the same bytes: losses and gradients are bit for bit those of the resident base
(tests/test_streamed_base.py, with a negative control that skips the backward refill). ``unstream_base`` gives each
layer its own device copy again when the run ends.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .knobs import stream_slots_wanted
from .memory import STREAMED_LAYERS

log = logging.getLogger("phi3tune")
SLOTS = STREAMED_LAYERS  # the layer running and the one arriving (memory.py counts them)


def four_bit_weights(layer: nn.Module) -> list[torch.Tensor]:
    """The packed weights of ``layer``'s bitsandbytes 4-bit linears, in module order."""
    from bitsandbytes.nn import Linear4bit

    return [m.weight for m in layer.modules() if isinstance(m, Linear4bit)]


class StreamedBase:
    """The host copies, the device slots and the copy order of one model's decoder layers (module docstring)."""

    def __init__(self, layers: Sequence[nn.Module], device: torch.device, resident: int = 0,
                 slots: int = SLOTS) -> None:
        self.weights = [four_bit_weights(layer) for layer in layers]
        layouts = {tuple((tuple(w.shape), w.dtype) for w in ws) for ws in self.weights}
        if len(layouts) != 1 or not self.weights[0]:
            raise ValueError("streamed base: every decoder layer needs the same 4-bit weights (shapes and dtypes); "
                             "set PHI3TUNE_STREAM_BASE=0")
        (layout,) = layouts
        self.device = device
        self.cuda = device.type == "cuda"
        kept = resident_layers(len(self.weights), resident)
        self.streamed = [i for i in range(len(self.weights)) if i not in kept]
        self.slot_of = {i: n % slots for n, i in enumerate(self.streamed)}
        self.host = {i: [w.data.to("cpu", copy=True).pin_memory() if self.cuda and i not in kept else
                         w.data.to("cpu", copy=True) for w in self.weights[i]] for i in range(len(self.weights))}
        self._repack(device)
        self.slots = [[torch.empty(size, dtype=dtype, device=device) for size, dtype in layout]
                      for _ in range(slots)]
        for state in self._states():  # the block scales come back after the slots, beside them
            state.to(device)
        self.resident = [-1] * slots  # which layer each slot holds
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [torch.cuda.Event() if self.cuda else None for _ in range(slots)]
        for i, ws in enumerate(self.weights):  # a streamed layer's weight is its slot from now on
            own = [h.to(device, copy=True) for h in self.host.pop(i)] if i in kept else None
            for j, w in enumerate(ws):
                w.data = own[j] if own is not None else self.slots[self.slot_of[i]][j]
        for i in self.streamed[:slots]:
            self.fetch(i)
        # the streamed layers after / before each layer (as many as the other slots hold, nearest first), which a
        # layer's call or backward sends for next
        self.after = [[j for j in self.streamed if j > i][:slots - 1] for i in range(len(self.weights))]
        self.before = [[j for j in reversed(self.streamed) if j < i][:slots - 1] for i in range(len(self.weights))]

    def _states(self) -> list[Any]:
        """The 4-bit weights' quantization states (block scales, code table; bitsandbytes' QuantState)."""
        states = (getattr(w, "quant_state", None) for ws in self.weights for w in ws)
        return [state for state in states if state is not None]

    def _repack(self, device: torch.device) -> None:
        """Free the packed weights' device memory and hand its pages back to the device. Loading interleaved each
        weight with its block scales, so freeing the weights alone would leave 128 holes of 12-48 MB between live
        scales (Phi-3-mini): reserved by the allocator, too small for most activations. The scales wait in host
        memory meanwhile, so the whole region comes free."""
        for state in self._states():
            state.to("cpu")
        for ws in self.weights:
            for w in ws:
                w.data = torch.empty(0, dtype=w.dtype, device=device)
        if self.cuda:
            torch.cuda.empty_cache()

    def fetch(self, i: int) -> None:
        """Start copying layer ``i``'s bytes into its slot, once the compute stream has queued every read of the
        layer there before (a no-op where it is there, or past either end)."""
        s = self.slot_of.get(i)
        if s is None or self.resident[s] == i:  # resident, or past either end (-1)
            return
        if self.side is None:
            for dst, src in zip(self.slots[s], self.host[i]):
                dst.copy_(src)
        else:
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                for dst, src in zip(self.slots[s], self.host[i]):
                    dst.copy_(src, non_blocking=True)
                event = self.ready[s]
                assert event is not None
                event.record(self.side)
        self.resident[s] = i

    def use(self, i: int) -> None:
        """Layer ``i``'s bytes in its slot before the compute stream's next kernel reads them."""
        s = self.slot_of.get(i)
        if s is None:  # a resident layer
            return
        self.fetch(i)
        event = self.ready[s]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def backward_reaches(self, i: int, _grad: torch.Tensor) -> None:
        """Layer ``i``'s output gradient is ready: its backward is next, then layer i - 1's."""
        self.use(i)
        for j in self.before[i]:
            self.fetch(j)

    def restore(self) -> bool:
        """Every layer's weights on the device again, each its own tensor (the run is over); False, with nothing
        changed, where the device cannot hold them all. The activations' cached blocks go back to the device first:
        on a card the run filled, the weights would otherwise not fit beside them (session 25: a 5.5 GiB card's
        allocator freed its cache mid-run, once)."""
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            torch.cuda.empty_cache()
        try:
            copies = self._device_copies()
        except torch.OutOfMemoryError:
            return False
        for i, cs in copies.items():
            for w, c in zip(self.weights[i], cs):
                w.data = c
        return True

    def _device_copies(self) -> dict[int, list[torch.Tensor]]:
        return {i: [h.to(self.device, copy=True) for h in hs] for i, hs in self.host.items()}


class StreamedCall:
    """A decoder layer's call with its bytes brought in first, the next layer's sent for, and, in training, the
    backward's refill hooked to its output's gradient. ``inner``: the call it wraps (the compiled one, a
    RecomputeSwitch, or the module's plain ``_call_impl``)."""

    def __init__(self, streamer: StreamedBase, index: int, inner: Callable[..., Any], compiled: bool) -> None:
        self.streamer, self.index, self.inner, self.compiled = streamer, index, inner, compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        s, i = self.streamer, self.index
        in_backward = torch._C._current_graph_task_id() != -1  # torch.utils.checkpoint recomputing the layer
        s.use(i)
        for j in s.before[i] if in_backward else s.after[i]:
            s.fetch(j)
        out = self.inner(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        if not in_backward and isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(functools.partial(s.backward_reaches, i))
        return out


def resident_layers(layers: int, resident: int) -> set[int]:
    """Which of ``layers`` decoder layers keep their own device weights when ``resident`` of them do: spread
    evenly, so each streamed layer's copy has the layers before it to overlap with, not only one."""
    resident = max(0, min(resident, layers))
    return {(n * layers) // resident for n in range(resident)} if resident else set()


def stream_base(layers: Sequence[nn.Module], device: torch.device, resident: int = 0) -> StreamedBase:
    """Keep ``layers``' 4-bit weights in host memory and stream them in (module docstring), but for ``resident``
    layers that keep theirs on the device. Call it last: after the layers are compiled and their checkpointing is
    set. PHI3TUNE_STREAM_SLOTS=N (benchmarks): N device slots, N - 1 layers on their way in, not ``SLOTS``."""
    streamer = StreamedBase(layers, device, resident, stream_slots_wanted() or SLOTS)
    for i, layer in enumerate(layers):
        compiled = getattr(layer, "_compiled_call_impl", None)
        inner = compiled if compiled is not None else layer._call_impl
        layer._compiled_call_impl = StreamedCall(streamer, i, inner, compiled is not None)
    return streamer


def unstream_base(model: nn.Module) -> bool:
    """Undo :func:`stream_base` in ``model`` (each layer its own device weights, its call as before); False where
    it was never done. Where the device cannot hold the whole base beside what the run left there, the model stays
    streamed: it runs the same, a layer's bytes at a time (the adapter is saved before this)."""
    calls = [(m, call) for m in model.modules()
             if isinstance(call := getattr(m, "_compiled_call_impl", None), StreamedCall)]
    if not calls:
        return False
    if not calls[0][1].streamer.restore():
        log.warning("the 4-bit base stays streamed from host memory: the device has no room for all of it beside "
                    "what the run left there. The returned model runs the same, slower; load the saved adapter in a "
                    "fresh process for fast generation")
        return True
    for layer, call in calls:
        layer._compiled_call_impl = call.inner if call.compiled else None
    return True

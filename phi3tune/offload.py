"""Saved activations kept in pinned host memory, not on the GPU, until backward needs them.

Two plans use it. The memory plan checkpoints every decoder layer, so what stays on the GPU between forward and
backward is each layer's input: 32 x tokens x hidden in bf16 for Phi-3-mini, 0.75 GiB for one 4,096-token example.
Non-reentrant ``torch.utils.checkpoint`` saves those inputs through the autograd saved-tensor hooks active at the
layer call (its own hooks take over inside the layer), so ``Offloader.hooks()`` around the decoder stack sees
exactly them (and the final norm's saved tensors). A speed plan that cannot hold every layer's activations
(``RunPlan.offload_layers``) moves, instead of recomputing, the first layers' saved activations: backward needs them
last, so their copies have the most time to go out and come back. The compiled layers save through the same hooks;
``share`` of the bytes a forward saves are moved, those saved first (the first layers'), the model's own weights
never (``static``).

Each moved tensor is copied to pinned host memory (a slice of one slab a forward, where the plan sizes one) on a
side stream as soon as forward has made it, and its GPU memory is released once the copy is done: the offloader
holds the tensor until ``HELD_SAVES`` more are saved, then makes the compute stream wait for its copy and lets it
go, so the block returns to the compute stream's pool at once. (``record_stream`` would also keep it safe, but the
allocator then reuses the block only once everything queued on the side stream by its free has run; with the host
a step ahead, that is every later layer's copy, and the pool grew instead: session 28, 0.4-1.4 GiB reserved above
the allocated peak.) Backward copies
entries back on the same side stream, ``lookahead`` bytes ahead of the one it unpacks (at least one entry; the
memory plan's: two layers' worth of what its forward moved, since a layer checkpointed in its graph saves ~4 tensors
of 1 MiB and more, not only its input: session 29's profile counted ~130 copies out a 4,096-token micro-batch, and
one entry ahead left each layer's backward ~1.25 ms waiting for the rest); the first few tensors saved after the
moved ones start that walk, so the last moved layer is on its way back before its backward. The values are copies:
the loss and gradients are bit for bit those of the plan without it (tests/test_offload.py).
Torch's own ``save_on_cpu`` copies on the compute stream with no lookahead (torchtune's ``OffloadActivations`` has
both, but torchtune is not among our dependencies).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from .knobs import held_saves_wanted, offload_ahead_wanted, offload_tail_wanted, record_stream_wanted
from .memory import OFFLOAD_TAIL_HIDDENS
from .offload_entries import _Chain, _Held, _Lead, _nbytes, _Slab, _strides_back

log = logging.getLogger("phi3tune")
MIN_BYTES = 1 << 20  # smaller saved tensors (indices, norms' scales) stay where they are: a copy costs more
LOOKAHEAD_LAYERS = 2  # offloaded layers: bring back this many layers' activations ahead of backward
# checkpointed inputs (every saved tensor moves): the compute stream waits for a copy out only this many saves later.
# Session 29, 8 GiB card, the memory plan packed, median steps: three saves later 0.512 s, eight 0.4845, and
# record_stream (before session 28) 0.4785 but 0.16 GiB more at the device's peak (4.66 against 4.51 GiB), in one call;
# one save later (session 28's way) 0.5172 against record_stream's 0.4847 in another. The copies out run layers behind
# the compute (the profile, three saves later: the compute stream waited 66 ms over two steps for them), so a wait for
# a recent one stalls
HELD_SAVES = 8
# their host buffer: the plan's moved bytes at its longest micro-batch, with room for the modelled bytes' error and
# for the tensor that crosses the share (past it, a moved tensor gets its own pinned memory)
SLAB_MARGIN, SLAB_EXTRA = 1.25, 256 << 20


class Offloader:
    """Saved-tensor hooks that move large saved tensors to (pinned) host memory and back.

    ``min_bytes``: smaller CUDA tensors are saved as they are. ``share``: the share of the bytes a forward saves to
    move, the first saved (1.0: all of them); a forward's saved bytes a token are learnt from the one before (the
    first uses ``token_bytes``). ``lookahead``: layers' worth of bytes to bring back ahead of backward. ``static``:
    tensors (the model's weights) never moved, whose storage a compiled layer saves too (looked up at each forward:
    ``.data`` may be re-pointed). ``slab_bytes``: one host
    buffer of that size for each forward's moved tensors (``_Slab``), else pinned memory for each. On the CPU (tests)
    a moved tensor's "host copy" is a copy in other memory, so the original is released just as on a GPU, at any
    size. ``layers``: where every saved tensor moves, the decoder layers the forward runs; backward then keeps
    ``LOOKAHEAD_LAYERS`` layers' worth of what the forward moved on its way back (PHI3TUNE_OFFLOAD_AHEAD=N: N
    entries instead, benchmarks). ``tail``: there, the forward's last saves worth that many bytes a token stay on
    the device (from the second forward on: the first tells how many bytes a forward saves). ``log_at``: the log
    says once what a forward of at least that many tokens moved (how many tensors, their bytes and shapes)."""

    def __init__(self, min_bytes: int = MIN_BYTES, share: float = 1.0, token_bytes: float = 0.0,
                 lookahead: float = 0.0, static: Iterable[torch.Tensor] = (), slab_bytes: int = 0,
                 layers: int = 0, log_at: int = 0, tail: float = 0.0) -> None:
        self.min_bytes, self.share, self.token_bytes, self.lookahead = min_bytes, share, token_bytes, lookahead
        self.tail = tail if share >= 1.0 else 0.0
        self.slab_bytes = slab_bytes  # a host buffer this large, taken at the first move (0: a tensor each)
        self._slab: _Slab | None = None
        self._static_tensors = list(static)  # their storage, looked up at each forward (``_static``)
        self._static: set[int] = set()
        self._chain: _Chain | None = None  # during a forward: its entries
        self._stream: Any = None
        self.packed = 0  # tensors moved by the last forward (tests, logs)
        self.moved_bytes = 0  # and their bytes
        self._hooks = (self._pack, self._unpack)  # the same two objects every forward
        self.record_stream = record_stream_wanted()  # benchmarks: the release before session 28 (knobs.py)
        self.held_saves = held_saves_wanted() or HELD_SAVES
        asked = offload_ahead_wanted()  # benchmarks: N entries on their way back, and no layers' worth
        self.ahead_entries = asked or 1  # entries on their way back, at least
        self._told, self._told_at = False, log_at  # the log's line about what a forward moves: once, at this size
        self._sizes: dict[tuple[Any, ...], int] = {}  # (shape, dtype) of the tensors this forward moved: how many
        # every saved tensor moving: backward brings LOOKAHEAD_LAYERS of the ``layers`` layers' worth back ahead
        self.layers = 0 if asked else layers

    def _side(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    @contextmanager
    def hooks(self, tokens: int = 1) -> Iterator[None]:
        """Offload what the code inside saves for backward (one forward of ``tokens`` tokens: the lookahead
        follows its order)."""
        per_token = self.token_bytes * tokens
        limit = math.inf if self.share >= 1.0 else self.share * per_token
        chain = self._chain = _Chain(limit, self.lookahead * per_token, tokens=max(1, tokens))
        if self.tail and per_token:  # a save starting within the tail's bytes of the end (1/64 for rounding) stays,
            chain.keep_room = self.tail * tokens * (1 + 1 / 64)  # never more than those bytes (a forward that
            chain.keep_from = per_token - chain.keep_room  # saved fewer a token before would start it early)
        # where the weights live now: the optimizer's flat buffers re-point the adapter's ``.data`` after the
        # offloader is built (flat_steps.py), and the storage left behind may hold an activation by now. Session
        # 30: with the storage taken once, each 4,096-token forward moved 96 adapter weights, 0.26 GiB, out and back.
        # The lookup costs the host ~0.15 ms a forward for Phi-3-mini's ~700 weights and quantization states (scaled
        # from 0.33 ms for 1,500 tensors on a dev CPU), against ~200 ms of a 4,096-token micro-batch
        self._static = {t.untyped_storage().data_ptr() for t in self._static_tensors}
        self.packed = self.moved_bytes = 0
        self._sizes = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(*self._hooks):
                yield
        finally:  # from now on only the autograd graph holds the entries, and frees each after its backward
            self._chain = None
            while chain.flight:  # entries point at the chain: no strong way back to them
                self._release(chain)
            if chain.saved:
                self.token_bytes = chain.saved / chain.tokens
            if self.layers and self.share >= 1.0:  # what this forward moved, a layer's worth at a time
                chain.lookahead = max(chain.lookahead, LOOKAHEAD_LAYERS * chain.moved / self.layers)
            chain.seen.clear()
            settled = not self.tail or chain.keep_room > 0  # the tail starts at the second forward
            if not self._told and chain.tokens >= self._told_at and self.packed and settled:  # once: what it moves
                self._told = True
                kinds = ", ".join(f"{n} x {shape} {dtype}" for (shape, dtype), n in sorted(
                    self._sizes.items(), key=lambda kv: -kv[1])[:6])
                log.info("inputs in host memory: a %s-token forward moved %d tensors, %.2f GiB (%s); %d saved again "
                         "and %d at its end stayed on the device", f"{chain.tokens:,}", self.packed,
                         self.moved_bytes / 2**30, kinds, chain.shared, chain.kept)

    def _pack(self, t: torch.Tensor) -> Any:
        chain = self._chain
        cuda = t.device.type == "cuda"
        if chain is None or t.layout != torch.strided or (cuda and _nbytes(t) < self.min_bytes) \
                or t.untyped_storage().data_ptr() in self._static:
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        first = chain.seen.get(key)
        if first is not None and first() is not None:  # saved again (a table every layer saves, e.g. the rotary
            chain.shared += 1  # cos / sin): it stays alive on the device for that layer anyway, so moving it
            return t  # again would only copy it. (Where the first one is gone, its memory may hold another tensor)
        chain.seen[key] = weakref.ref(t)
        n = _nbytes(t)
        chain.saved += n
        tail = chain.saved - n >= chain.keep_from and chain.kept_bytes + n <= chain.keep_room
        if chain.moved >= chain.limit or tail:  # the rest stays; the first of it leads the way back
            chain.kept, chain.kept_bytes = chain.kept + 1, chain.kept_bytes + n
            if chain.last is None or chain.led > chain.lookahead:  # nothing moved yet, or led enough
                return t
            chain.led += n
            return _Lead(t, chain)
        if self._slab is None and self.slab_bytes:
            self._slab = _Slab(self.slab_bytes, pinned=cuda)
        host = self._slab.take(chain, t) if self._slab is not None else None
        if host is None:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        stride = _strides_back(t)
        if not cuda:  # the CPU (tests): every saved tensor, so the mechanism shows at any size
            host.copy_(t.detach())
            held = _Held(host, t.device, chain, stride)
        else:
            side, now = self._side(t.device), torch.cuda.current_stream(t.device)
            side.wait_stream(now)  # ``t`` is complete
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            if self.record_stream:  # as before session 28: the allocator holds the block until the side stream ran
                t.record_stream(side)
            held = _Held(host, t.device, chain, stride, copied, source=None if self.record_stream else t)
            chain.stream = now  # a held source is released by _throttle / the forward's end
            self._throttle(chain, held)
        held.before, chain.last = chain.last() if chain.last is not None else None, weakref.ref(held)
        chain.moved += n
        chain.unused += 1
        self.packed += 1
        self.moved_bytes += n
        if not self._told:  # for the log's one line
            shape = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            self._sizes[shape] = self._sizes.get(shape, 0) + 1
        return held

    def _throttle(self, chain: _Chain, held: _Held) -> None:
        """Let go of the device tensors whose copy out has been queued before ``held``'s: the compute stream waits
        for each one's copy (on the device: the host queues on), so the block it frees is safe to reuse at once.
        All but the newest ``HELD_SAVES`` where every saved tensor moves (checkpointed inputs: each copy has that many
        saves' compute to finish, about two layers'); where only the first layers move, past ``lookahead`` bytes in
        flight, so that a forward that saves faster than the host link copies out holds no more than the plan
        counts."""
        chain.flight.append(held)
        chain.flying += _nbytes(held.host)
        while len(chain.flight) > (self.held_saves if self.share >= 1.0 else 1) and (
                self.share >= 1.0 or chain.flying > chain.lookahead):
            self._release(chain)

    @staticmethod
    def _release(chain: _Chain) -> None:
        """The oldest entry in flight gives up its device tensor once the compute stream has waited for its copy."""
        oldest = chain.flight.pop(0)
        chain.flying -= _nbytes(oldest.host)
        if oldest.source is not None:
            chain.stream.wait_event(oldest.copied)
            oldest.source = None

    def _unpack(self, held: Any) -> torch.Tensor:
        if isinstance(held, _Lead):
            self._walk(held.chain)
            return held.tensor
        if not isinstance(held, _Held):
            return held
        if not held.used:
            held.used, held.chain.unused = True, held.chain.unused - 1
        if held.ahead:
            held.ahead, held.chain.ahead = False, held.chain.ahead - _nbytes(held.host)
            held.chain.ahead_n -= 1
        if held.device.type != "cuda":
            self._walk(held.chain)
            return torch.empty_strided(held.host.shape, held.stride, dtype=held.host.dtype).copy_(held.host)
        now = torch.cuda.current_stream(held.device)
        if held.back is None:
            self._fetch(held)
        back, held.back = held.back, None
        assert back is not None
        now.wait_event(held.arrived)
        self._walk(held.chain)
        return back

    def _walk(self, chain: _Chain) -> None:
        """Fetch entries ahead of backward, newest first, until ``lookahead`` bytes and ``ahead_entries`` entries
        (at least one) are on their way back."""
        if not chain.started:
            chain.started, chain.cursor = True, chain.last
        while (held := chain.cursor() if chain.cursor is not None else None) is not None and (
                chain.ahead == 0 or chain.ahead < chain.lookahead or chain.ahead_n < self.ahead_entries):
            chain.cursor = weakref.ref(held.before) if held.before is not None else None
            if held.used or held.ahead:
                continue
            if held.device.type == "cuda":
                self._fetch(held)
            held.ahead, chain.ahead, chain.ahead_n = True, chain.ahead + _nbytes(held.host), chain.ahead_n + 1

    def _fetch(self, held: _Held) -> None:
        """Start the host-to-device copy of ``held`` on the side stream, into memory of the compute stream's pool
        (a side-stream pool would keep its own blocks, which the compute stream cannot reuse: session 20, +1.5 GiB
        reserved on a 12 GiB card)."""
        side, now = self._side(held.device), torch.cuda.current_stream(held.device)
        back = torch.empty_strided(held.host.shape, held.stride, dtype=held.host.dtype, device=held.device)
        side.wait_stream(now)  # the block may have been freed by compute-stream work still queued
        with torch.cuda.stream(side):
            side.wait_event(held.copied)
            back.copy_(held.host, non_blocking=True)
            held.arrived = torch.cuda.Event()
            held.arrived.record(side)
        back.record_stream(side)  # dropped unused (no backward), it is still not reused before the copy is done
        held.back = back


class OffloadingPlan(Protocol):
    """What ``offloader_for`` reads of a plan (a ``plan.RunPlan``)."""

    @property
    def offload_checkpoints(self) -> bool: ...
    @property
    def offload_layers(self) -> int: ...
    @property
    def memory(self) -> dict[str, int]: ...
    @property
    def peak_micro_batch_tokens(self) -> int: ...


def frozen_tensors(model: Any) -> list[torch.Tensor]:
    """``model``'s parameters and buffers and its 4-bit weights' quantization states (block scales, code tables):
    a compiled layer saves them for backward as graph inputs (a layer checkpointed in graph saves little else), and
    they stay on the device for the run, so moving them would only copy them (and a streamed base's slots, which
    its weights are, would come back with another layer's bytes: streamed_base.py refills them)."""
    out = [*model.parameters(), *model.buffers()]
    states = [getattr(p, "quant_state", None) for p in model.parameters()]
    while states:
        state = states.pop()
        for value in vars(state).values() if state is not None else ():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif hasattr(value, "absmax"):  # a double-quantized state's own state
                states.append(value)
    return out


def offloader_for(plan: OffloadingPlan, model: Any) -> Offloader | None:
    """The plan's offloader for ``model`` (the PEFT model), if it has one: every checkpointed input (the memory
    plan's, whose layers torch.utils.checkpoint saves, and a speed plan's, whose in-graph checkpoints save their
    inputs and the frozen tensors, ``frozen_tensors``, which stay), or the first ``plan.offload_layers`` decoder
    layers' activations, the bytes of the whole stack a token first taken from the plan's memory model
    (``activations`` counts the layers it keeps), then measured."""
    if plan.offload_checkpoints:
        asked = offload_tail_wanted()
        embed = model.get_input_embeddings().weight  # a hidden vector a token, in the compute dtype
        tail = (OFFLOAD_TAIL_HIDDENS if asked is None else asked) * embed.shape[-1] * embed.element_size()
        return Offloader(static=frozen_tensors(model), layers=len(model.get_base_model().model.layers),
                         log_at=plan.peak_micro_batch_tokens, tail=tail)
    if not plan.offload_layers:
        return None
    layers = len(model.get_base_model().model.layers)
    kept = max(1, layers - plan.offload_layers)
    stack = plan.memory.get("activations", 0) / max(1, plan.peak_micro_batch_tokens) * layers / kept
    static = frozen_tensors(model)
    share = plan.offload_layers / layers
    slab = int(SLAB_MARGIN * share * stack * plan.peak_micro_batch_tokens) + SLAB_EXTRA  # the peak's moved bytes
    return Offloader(share=share, token_bytes=stack, lookahead=LOOKAHEAD_LAYERS / layers, static=static,
                     slab_bytes=slab)

"""Checkpointed layers' inputs in host memory (offload.py): released on the device after forward, brought back for
backward, the step unchanged bit for bit; the plan asks for it where it should."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, tiny_tuner

from phi3tune import FineTuner
from phi3tune.loss import TokenLoss
from phi3tune.offload import Offloader
from phi3tune.tiny import write_tiny_phi3


def _checkpointed_model(path: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step(model: Any, offloader: Offloader | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Any], int]:
    """Forward + backward of one packed row of two documents. Returns the loss, the gradients, weak references to
    each decoder layer's output as they stood after forward, and how many saved tensors went to the host."""
    model.zero_grad(set_to_none=True)
    loss_fn = TokenLoss(model)
    loss_fn.offloader = offloader
    outputs: list[Any] = []
    handles = [layer.register_forward_hook(
        lambda _m, _i, out: outputs.append(weakref.ref(out[0] if isinstance(out, tuple) else out)))
        for layer in model.model.layers]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 48), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    loss = loss_fn(ids, ids.clone(), pos)
    for h in handles:
        h.remove()
    gc.collect()
    alive = [ref() is not None for ref in outputs]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, alive, offloader.packed if offloader else 0


def test_offloaded_inputs_leave_the_device_and_the_step_is_unchanged(tmp_path):
    """With every layer checkpointed, each layer's output (the next one's input) is held only as the offloader's
    copy after forward, and the loss and every gradient equal plain checkpointing's bit for bit. Negative control:
    plain checkpointing keeps those outputs alive until backward."""
    model = _checkpointed_model(write_tiny_phi3(tmp_path / "m", layers=4))
    loss, grads, alive, _ = _step(model, None)
    off_loss, off_grads, off_alive, packed = _step(model, Offloader())
    assert alive[:-1] == [True] * 3  # plain checkpointing holds every layer's input on the device
    assert off_alive[:-1] == [False] * 3  # offloaded: released (the last output goes on to the final norm)
    assert packed >= 4  # at least each layer's input
    assert torch.equal(loss, off_loss)
    assert grads.keys() == off_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], off_grads[n]) for n in grads)


def test_offloader_hooks_apply_only_inside_and_are_released(tmp_path):
    """Outside ``hooks()`` nothing is packed; after it the offloader holds no entry of that forward (the autograd
    graph alone does, so host copies go when backward has used them)."""
    off = Offloader()
    x = torch.randn(8, 8, requires_grad=True)
    (x * x).sum().backward()
    assert off.packed == 0
    with off.hooks():
        y = (x * x.clone()).sum()  # two tensors saved (x itself twice would be moved once)
    assert off.packed == 2 and off._chain is None
    y.backward()
    assert torch.equal(x.grad, 2 * x.detach() + 2 * x.detach())  # the first backward's grad, then this one's


@needs_shared
def test_plan_offloads_for_the_memory_plan_on_cuda(monkeypatch):
    """The memory plan on CUDA offloads and predicts less (all but two checkpointed inputs off the device); the
    CPU, FSDP and the speed plans do not; PHI3TUNE_OFFLOAD=1 asks for it only where every layer is checkpointed."""
    from phi3tune.bench import plan_for

    monkeypatch.delenv("PHI3TUNE_OFFLOAD", raising=False)
    mem = FineTuner(str(PHI3_DIR)).training(optimize_for="memory").data(packing=True, max_seq_length=4096)
    on = plan_for(mem, "cuda", free_gib=8)
    assert on.offload_checkpoints and "their inputs in host memory" in on.describe()
    assert not plan_for(mem, "cpu").offload_checkpoints
    monkeypatch.setenv("PHI3TUNE_OFFLOAD", "0")
    off = plan_for(mem, "cuda", free_gib=8)
    assert not off.offload_checkpoints
    saved = (on.checkpoint_layers - 2) * 4096 * 3072 * 2 / 2**30  # bf16 inputs of 30 layers at 4,096 tokens
    extra = on.memory["offload_extra"] / 2**30  # the measured allowance for moved inputs (memory.py)
    combo = on.memory.get("combo_kernels", 0) / 2**30  # measured with the inputs in host memory: only there
    assert on.combo_kernels and not off.combo_kernels
    assert on.streamed_base and abs((off.predicted_peak_gib - on.predicted_peak_gib) - (saved - extra - combo)) < 0.01
    monkeypatch.delenv("PHI3TUNE_OFFLOAD")
    monkeypatch.setenv("PHI3TUNE_OFFLOAD_LAYERS", "0")  # no layer's activations offloaded instead
    eight = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=8)  # the speed plan checkpoints some layers
    assert eight.checkpoint_layers > 0 and not eight.offload_checkpoints
    monkeypatch.setenv("PHI3TUNE_OFFLOAD", "1")  # asked for: only ever with every layer checkpointed
    plans = [plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=g) for g in (4.5, 5, 5.5, 6, 8, 12, 24, 139)]
    assert all(p.checkpoint_layers == 32 for p in plans if p.offload_checkpoints)
    moved = [p for p in plans if p.offload_checkpoints]  # in host memory: every layer's bf16 input, longest micro-batch
    assert moved and all(p.memory["host_checkpoints"] == 32 * p.peak_micro_batch_tokens * 3072 * 2 for p in moved)
    monkeypatch.delenv("PHI3TUNE_OFFLOAD")
    assert not plan_for(mem.training(distributed="fsdp"), "cuda", free_gib=8, processes=2).offload_checkpoints


def test_public_run_with_offload_trains_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    """Through FineTuner.run: the memory plan (every layer checkpointed) with offloading asked for trains the adapter
    and losses of the run without it, bit for bit, and says so in its plan. (Eager layers, for the suite's time:
    compiled ones on the CPU gave the same equality and no extra graph, measured once; on the H200 the compiled
    memory plan trains with it, docs/performance.md session 7.)"""
    rows = rows_of_text(8, seed=4)
    runs, moved = {}, {"0": 0, "1": 0}
    real_pack = Offloader._pack

    def counting(self: Offloader, t: torch.Tensor) -> Any:
        moved[flag] += 1
        return real_pack(self, t)

    monkeypatch.setattr(Offloader, "_pack", counting)
    for flag in ("0", "1"):
        monkeypatch.setenv("PHI3TUNE_OFFLOAD", flag)
        runs[flag] = tiny_tuner(tiny_model, tmp_path / flag, rows, optimize_for="memory", grad_accum=2,
                                max_steps=3).run()
    assert runs["1"].plan.offload_checkpoints and not runs["0"].plan.offload_checkpoints
    assert moved["0"] == 0 and moved["1"] >= 3 * 2  # at least both layers' inputs in each of the 3 steps
    assert runs["1"].losses == runs["0"].losses and len(runs["0"].losses) == 3
    a, b = adapter_tensors(runs["0"]), adapter_tensors(runs["1"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _plain_model(path: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def _order_of(offloader: Offloader) -> list[tuple[str, torch.Tensor]]:
    """Wrap ``offloader``'s pack hook: the list fills with ("moved" | "kept", tensor) in the order forward saves."""
    seen: list[tuple[str, torch.Tensor]] = []
    pack = offloader._pack

    def recording(t: torch.Tensor) -> Any:
        out = pack(t)
        seen.append(("kept" if out is t or not hasattr(out, "host") else "moved", t))
        return out

    offloader._hooks = (recording, offloader._unpack)
    return seen


def test_offloaded_layers_move_the_first_share_never_a_weight_and_the_step_is_unchanged(tmp_path):
    """A speed plan's offloaded layers (no checkpointing): the offloader moves the first ``share`` of the bytes the
    decoder stack saves, in the order saved, and never the storage of a weight; the loss and every gradient equal
    the run without it bit for bit. Negative control: without ``static`` it moves weights too."""
    model = _plain_model(write_tiny_phi3(tmp_path / "m", layers=4))
    loss, grads, _, _ = _step(model, None)
    weights = [*model.parameters(), *model.buffers()]
    whole = Offloader(static=weights)  # everything: learns the stack's saved bytes a token
    _step(model, whole)
    ptrs = {w.untyped_storage().data_ptr() for w in weights}
    careless = Offloader()
    seen_careless = _order_of(careless)
    _step(model, careless)
    assert any(t.untyped_storage().data_ptr() in ptrs for kind, t in seen_careless if kind == "moved")

    half = Offloader(share=0.5, token_bytes=whole.token_bytes, lookahead=0.1, static=weights)
    seen = _order_of(half)
    off_loss, off_grads, _, packed = _step(model, half)
    firsts, keys = [], set()  # a tensor saved again in the forward stays where it is (rotary tables, the mask)
    for kind, t in seen:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        if key not in keys:
            keys.add(key)
            firsts.append((kind, t))
    assert len(firsts) < len(seen)  # every layer saves the rotary tables again
    kinds = [kind for kind, t in firsts if t.untyped_storage().data_ptr() not in ptrs]  # weights: always kept
    assert packed > 0 and "kept" in kinds
    assert kinds == sorted(kinds, key=lambda k: k != "moved")  # the moved ones are the first saved
    assert not any(t.untyped_storage().data_ptr() in ptrs for kind, t in seen if kind == "moved")
    saved = sum(t.numel() * t.element_size() for _, t in firsts if t.untyped_storage().data_ptr() not in ptrs)
    largest = max(t.numel() * t.element_size() for _, t in seen)
    assert 0.5 * saved <= half.moved_bytes <= 0.5 * saved + largest
    assert torch.equal(loss, off_loss)
    assert grads.keys() == off_grads.keys() and all(torch.equal(grads[n], off_grads[n]) for n in grads)


def test_backward_brings_moved_tensors_back_ahead_led_by_the_first_kept_one():
    """The walk back: the first tensor kept after the moved ones starts it, so the last moved tensor is already on
    its way back when backward unpacks it, and never more than ``lookahead`` bytes (at least one entry) are ahead.
    Negative control: moving everything leaves nothing to lead, so backward's first unpack finds it not ahead."""
    def run(share: float, lookahead: float) -> list[tuple[bool, int]]:
        off = Offloader(share=share, token_bytes=8 * 4 * 64, lookahead=lookahead)  # 8 saved tensors of 64 floats
        at_unpack: list[tuple[bool, int]] = []  # (the entry was ahead, bytes ahead) at each moved one's unpack

        def watching(held: Any) -> torch.Tensor:
            if hasattr(held, "host"):
                at_unpack.append((held.ahead, held.chain.ahead))
            return off._unpack(held)

        off._hooks = (off._pack, watching)  # the graph keeps the hooks it was built with
        x = torch.randn(64, requires_grad=True)
        with off.hooks(tokens=1):
            y = x
            for _ in range(8):
                y = torch.sin(y)  # saves its input
        y.sum().backward()
        assert x.grad is not None and torch.allclose(x.grad, _sin_chain_grad(x.detach(), 8))
        return at_unpack

    half = run(0.5, lookahead=2 * 4 * 64 / (8 * 4 * 64))  # 4 moved, two tensors' bytes ahead
    assert len(half) == 4 and half[0][0]  # the first moved one unpacked was already ahead
    assert all(ahead <= 2 * 4 * 64 for _, ahead in half)
    everything = run(1.0, lookahead=0.0)
    assert len(everything) == 8 and not everything[0][0]  # no lead: the first comes back on demand
    assert all(flag for flag, _ in everything[1:])  # then each one ahead of its unpack


def test_backward_keeps_two_layers_worth_of_moved_tensors_ahead(monkeypatch):
    """Every saved tensor moving over ``layers`` layers (the memory plan's checkpointed inputs: a layer saves several
    tensors), backward keeps two layers' worth on their way back ahead of the one it unpacks (as many as are left),
    with the same gradient; PHI3TUNE_OFFLOAD_AHEAD=3 (benchmarks) keeps three entries whatever the layers. Negative
    control: not told the layers, one entry."""
    def ahead_at_unpacks(layers: int = 0) -> list[int]:
        off = Offloader(share=1.0, layers=layers)
        seen: list[int] = []

        def watching(held: Any) -> torch.Tensor:
            out = off._unpack(held)
            seen.append(held.chain.ahead_n)
            return out

        off._hooks = (off._pack, watching)
        x = torch.randn(64, requires_grad=True)
        with off.hooks(tokens=1):
            y = x
            for _ in range(8):
                y = torch.sin(y)
        y.sum().backward()
        assert x.grad is not None and torch.allclose(x.grad, _sin_chain_grad(x.detach(), 8))
        return seen

    monkeypatch.delenv("PHI3TUNE_OFFLOAD_AHEAD", raising=False)
    assert ahead_at_unpacks() == [1] * 7 + [0]
    assert ahead_at_unpacks(layers=4) == [4] * 4 + [3, 2, 1, 0]  # 2 entries a "layer": two layers' worth ahead
    monkeypatch.setenv("PHI3TUNE_OFFLOAD_AHEAD", "3")
    assert ahead_at_unpacks() == [3] * 5 + [2, 1, 0]
    assert ahead_at_unpacks(layers=4) == [3] * 5 + [2, 1, 0]  # the knob's count, not the layers' worth


def test_a_tensor_saved_again_in_one_forward_stays_where_it_is(caplog):
    """A tensor every layer saves (the rotary cos / sin tables, a mask) is moved once a forward, not once a layer:
    saved again (same storage, view and version), it stays on the device, where that layer's save keeps it alive
    anyway. The gradient is the same, and the log says once what a forward moved. Negative control: an equal copy in
    its own storage is moved."""
    def run(shared: bool) -> tuple[Offloader, torch.Tensor]:
        off = Offloader(share=1.0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, generator=g).requires_grad_()
        w = torch.randn(64, generator=g)
        w2 = w if shared else w.clone()
        with off.hooks(tokens=1):
            y = torch.sin(x) * w  # saves x, then w
            z = torch.sin(y) * w2  # saves y, then w again (or its copy)
        z.sum().backward()
        assert x.grad is not None
        return off, x.grad

    with caplog.at_level("INFO", logger="phi3tune"):
        once, grad = run(shared=True)
    copied, grad2 = run(shared=False)
    assert once.packed == 3 and copied.packed == 4  # x, w, y (w's second save stayed) against x, w, y, w's copy
    assert torch.equal(grad, grad2) and grad.abs().sum() > 0
    assert caplog.text.count("inputs in host memory: a 1-token forward moved 3 tensors") == 1
    assert "1 saved again and 0 at its end stayed on the device" in caplog.text
    # a new tensor where one that is gone was (the same storage, view and version: a fresh view of one buffer, as a
    # freed address handed out again would be) is not "saved again": it moves. Negative control: while the first
    # lives, the same view stays
    buf = torch.randn(1024)
    off = Offloader(share=1.0)
    with off.hooks(tokens=1):
        a = buf[:256]
        off._pack(a)
        again = buf[:256]
        assert off._pack(again) is again
        del a
        b = buf[:256]
        assert off._pack(b) is not b


def test_a_moved_device_tensor_is_let_go_only_after_the_compute_stream_waits_for_its_copy():
    """CUDA's order, with stand-in events and stream: each moved tensor stays held until the compute stream has been
    told to wait for its copy out, then is let go (its block is then safe to reuse at once, no ``record_stream``).
    Every saved tensor moving, all but the newest ``HELD_SAVES`` go at each save (each copy has that many layers'
    compute to finish first) and the rest at the forward's end, in order; the first layers moving, only past
    ``lookahead`` bytes in flight (negative control: under it, every one stays held)."""
    from phi3tune.offload import HELD_SAVES, _Chain, _Held

    class Stream:
        def __init__(self) -> None:
            self.waited: list[tuple[Any, bool]] = []  # (event, its tensor still held when the wait was queued)

        def wait_event(self, event: Any) -> None:
            self.waited.append((event, event.held.source is not None))

    class Event:
        held: Any = None

    def save(off: Offloader, chain: _Chain, n: int) -> list[Any]:
        helds = []
        for _ in range(n):
            event = Event()
            held = _Held(torch.zeros(16), torch.device("cpu"), chain, (1,), event, source=torch.zeros(16))
            event.held = held
            chain.stream = stream
            off._throttle(chain, held)
            helds.append(held)
        return helds

    stream = Stream()
    every = Offloader(share=1.0)
    chain = _Chain(limit=float("inf"), lookahead=0.0)
    helds = save(every, chain, HELD_SAVES + 2)
    assert [h.source is None for h in helds] == [True, True] + [False] * HELD_SAVES  # the newest still held
    assert [e.held for e, _ in stream.waited] == helds[:2] and all(still for _, still in stream.waited)
    while chain.flight:  # the forward's end (Offloader.hooks)
        Offloader._release(chain)
    assert all(h.source is None for h in helds) and [e.held for e, _ in stream.waited] == helds
    assert chain.flying == 0

    stream = Stream()
    first = Offloader(share=0.5)
    chain = _Chain(limit=1e9, lookahead=2 * 16 * 4)  # two tensors' bytes may be in flight
    helds = save(first, chain, 4)
    assert [h.source is None for h in helds] == [True, True, False, False]
    assert [e.held for e, _ in stream.waited] == helds[:2]
    stream = Stream()
    roomy = _Chain(limit=1e9, lookahead=10 * 16 * 4)
    assert all(h.source is not None for h in save(first, roomy, 4)) and not stream.waited


def _sin_chain_grad(x: torch.Tensor, n: int) -> torch.Tensor:
    grad, y = torch.ones_like(x), x
    values = []
    for _ in range(n):
        values.append(y)
        y = torch.sin(y)
    for v in reversed(values):
        grad = grad * torch.cos(v)
    return grad


def test_public_run_with_offloaded_layers_trains_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    """Through FineTuner.run on the 4-bit tiny model: PHI3TUNE_OFFLOAD_LAYERS=1 (one of its two layers' activations in
    host memory; on the CPU a clone) trains the adapter and losses of the run without it, bit for bit, moves
    tensors in every step and never a weight, and its plan says so. Negative control: unset, nothing moves."""
    rows = rows_of_text(8, seed=5)
    runs: dict[str, Any] = {}
    moved: dict[str, list[torch.Tensor]] = {"": [], "1": []}
    real_pack = Offloader._pack

    def recording(self: Offloader, t: torch.Tensor) -> Any:
        out = real_pack(self, t)
        if out is not t and hasattr(out, "host"):
            moved[flag].append(t)
        return out

    monkeypatch.setattr(Offloader, "_pack", recording)
    for flag in ("", "1"):
        monkeypatch.setenv("PHI3TUNE_OFFLOAD_LAYERS", flag)
        runs[flag] = tiny_tuner(tiny_model, tmp_path / (flag or "0"), rows, grad_accum=2, max_steps=3).run()
    assert runs["1"].plan.offload_layers == 1 and runs[""].plan.offload_layers == 0
    assert not moved[""] and len(moved["1"]) >= 3 * 2  # every micro-batch of the 3 steps moved some
    weights = {p.untyped_storage().data_ptr() for p in runs["1"].model.parameters()}  # 4-bit base and adapter
    assert len(weights) > 10 and not any(t.untyped_storage().data_ptr() in weights for t in moved["1"])
    assert runs["1"].losses == runs[""].losses and len(runs[""].losses) == 3
    a, b = adapter_tensors(runs[""]), adapter_tensors(runs["1"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_shared
def test_plan_offloads_layers_only_when_asked(monkeypatch):
    """`auto` never offloads layers yet (sessions 20-21: slower on 12 and 8 GiB cards over a run):
    a 6 GiB card checkpoints. Asked for N layers (PHI3TUNE_OFFLOAD_LAYERS), a plan that would checkpoint moves the
    first N layers' activations instead: they count in ``host_offloaded``, outside the predicted peak, which one
    more moved layer lowers by one layer's activations. A plan that checkpoints nothing, FSDP and (eager) layers
    on the CPU under ``auto`` stay as they are... except the CPU's named plan, which tests use."""
    from phi3tune.bench import plan_for

    monkeypatch.delenv("PHI3TUNE_OFFLOAD_LAYERS", raising=False)
    # the base on the device: streamed (auto's choice on 6 GiB since session 26), the room it frees fits a plan that
    # checkpoints nothing at a lower activation budget, and there is nothing left to offload
    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "0")
    quick = FineTuner(str(PHI3_DIR))
    six = plan_for(quick, "cuda", free_gib=6, step_tokens=4842)  # the quickstart's longest step
    assert six.offload_layers == 0 and six.checkpoint_layers > 0
    sized = FineTuner(str(PHI3_DIR)).training(micro_batch_tokens=six.micro_batch_tokens)
    forced = []
    for n in (30, 31):  # what a 6 GiB card holds at its micro-batch size
        monkeypatch.setenv("PHI3TUNE_OFFLOAD_LAYERS", str(n))
        forced.append(plan_for(sized, "cuda", free_gib=6))
    assert [p.offload_layers for p in forced] == [30, 31] and not any(p.checkpointing for p in forced)
    assert "the first 30 layers' activations in host memory" in forced[0].describe()
    one_layer = forced[1].memory["host_offloaded"] - forced[0].memory["host_offloaded"]
    assert one_layer > 0 and forced[0].activation_budget == forced[1].activation_budget
    assert forced[0].memory["activations"] - forced[1].memory["activations"] == pytest.approx(one_layer, abs=64)
    assert forced[0].predicted_peak_gib * 2**30 == pytest.approx(
        sum(v for k, v in forced[0].memory.items() if k not in ("lora_params", "host_offloaded")), abs=2**21)
    assert plan_for(quick, "cuda", free_gib=24, step_tokens=4842).offload_layers == 0  # nothing to checkpoint
    fsdp = FineTuner(str(PHI3_DIR)).training(distributed="fsdp")
    assert plan_for(fsdp, "cuda", free_gib=6, processes=2).offload_layers == 0


def test_moved_entries_go_with_their_backward_not_with_a_garbage_collection():
    """Each moved tensor's entry (its host copy, and a device copy fetched ahead) is freed by reference counting once
    backward has used it, with the cyclic garbage collector off: nothing but the autograd graph holds an entry
    (session 20's first version kept them in a cycle through their chain, so pinned memory grew until a collection).
    Negative control: before backward the entries are alive."""
    off = Offloader(share=0.5, token_bytes=8 * 4 * 64, lookahead=0.25)
    x = torch.randn(64, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        with off.hooks(tokens=1):
            y = x
            for _ in range(8):
                y = torch.sin(y)
        held = [weakref.ref(obj) for obj in gc.get_objects() if type(obj).__name__ == "_Held"]
        assert off.packed == 4 and len(held) == 4 and all(ref() is not None for ref in held)
        y.sum().backward()
        del y
        assert all(ref() is None for ref in held)
    finally:
        gc.enable()


def _sin_chain(off: Offloader, x: torch.Tensor, n: int = 8) -> torch.Tensor:
    with off.hooks(tokens=1):
        y = x
        for _ in range(n):
            y = torch.sin(y)  # saves its input
    return y


def test_one_slab_serves_each_forward_once_the_last_forward_is_done_with_it():
    """With a slab, a forward's moved tensors sit in one host buffer, from its start again at the next forward once
    every entry of the last was unpacked; a forward that starts while another's entries still wait gets its own
    memory, so both backwards see their own values (the guard's negative control: overwritten, the first graph's
    gradient would be computed from the second's inputs)."""
    off = Offloader(share=0.5, token_bytes=8 * 4 * 64, slab_bytes=1 << 16)
    hosts: list[torch.Tensor] = []
    pack = off._pack

    def recording(t: torch.Tensor) -> Any:
        out = pack(t)
        if hasattr(out, "host"):
            hosts.append(out.host)
        return out

    off._hooks = (recording, off._unpack)

    def in_slab(t: torch.Tensor) -> bool:
        assert off._slab is not None
        start = off._slab.buffer.data_ptr()
        return start <= t.data_ptr() < start + off._slab.buffer.numel()

    x = torch.randn(64, requires_grad=True)
    _sin_chain(off, x).sum().backward()
    first = [h.data_ptr() for h in hosts]
    assert len(first) == 4 and all(in_slab(h) for h in hosts)
    assert x.grad is not None and torch.allclose(x.grad, _sin_chain_grad(x.detach(), 8))
    hosts.clear()
    _sin_chain(off, x.detach().requires_grad_()).sum().backward()
    assert [h.data_ptr() for h in hosts] == first  # the slab again, from its start

    hosts.clear()
    a, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    ya = _sin_chain(off, a)  # its entries wait for a backward
    yb = _sin_chain(off, b)
    assert all(in_slab(h) for h in hosts[:4]) and not any(in_slab(h) for h in hosts[4:])  # b's: their own
    yb.sum().backward()
    ya.sum().backward()
    assert a.grad is not None and torch.allclose(a.grad, _sin_chain_grad(a.detach(), 8))
    assert b.grad is not None and torch.allclose(b.grad, _sin_chain_grad(b.detach(), 8))


def test_a_moved_tensor_comes_back_with_the_strides_it_was_saved_with():
    """A dense tensor in any layout (here transposed) comes back with its own strides, which a compiled backward
    expects; one with gaps (a slice of a wider tensor) or overlaps (an expanded one) comes back contiguous, its
    values the same."""
    off = Offloader()
    cases = [(torch.randn(8, 16).t(), (1, 16)), (torch.randn(16, 24)[:, :8], (8, 1)),
             (torch.randn(4, 1).expand(4, 6), (6, 1)), (torch.randn(2, 3, 4).permute(2, 0, 1), (1, 12, 4))]
    for t, stride in cases:
        with off.hooks():
            held = off._pack(t)
        back = off._unpack(held)
        assert torch.equal(back, t) and back.stride() == stride



@needs_shared
def test_inputs_in_host_memory_trade_the_host_link_for_device_memory(monkeypatch):
    """A 5 GiB card's speed plan (4,096-token micro-batches, base streamed, every layer checkpointed in graph) with
    its checkpointed inputs in host memory: the same plan (micro-batches, layers, kernels) predicting 30 layers'
    bf16 inputs less at its peak (two stay: the one coming back and the one in use; beside a streamed base, less the
    measured allowance), and costing the exposed share of the host link's time for them, out and back. Negative
    control: with no exposure the two cost the same."""
    from phi3tune import step_cost
    from phi3tune.bench import plan_for
    from phi3tune.plan import MODES

    monkeypatch.setitem(MODES["speed"], "ce_chunk", 1024)  # the kept plan's (it needs the smaller chunk), for both

    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "1")

    def plan(offload: str) -> Any:  # the speed plan, every layer checkpointed
        monkeypatch.setenv("PHI3TUNE_OFFLOAD", offload)
        return plan_for(FineTuner(str(PHI3_DIR)).training(micro_batch_tokens=4096, optimize_for="speed",
                                                          gradient_checkpointing=True), "cuda", free_gib=5)

    kept, away = plan("0"), plan("1")
    assert away.offload_checkpoints and not kept.offload_checkpoints and away.streamed_base and kept.streamed_base
    assert (away.checkpoint_layers, away.peak_micro_batch_tokens, away.recompute_in_graph, away.ce_chunk) == \
        (kept.checkpoint_layers, kept.peak_micro_batch_tokens, kept.recompute_in_graph, kept.ce_chunk) == \
        (32, 4096, True, 1024)
    inputs = 4096 * 3072 * 2  # one layer's bf16 input
    assert away.memory["host_checkpoints"] == 32 * inputs and "host_checkpoints" not in kept.memory
    extra = away.memory["offload_extra"]  # the measured allowance for moved inputs (memory.py), grows with them
    from phi3tune import memory

    assert extra == int(memory.OFFLOAD_EXTRA * away.memory["host_checkpoints"]) and "offload_extra" not in kept.memory
    assert (kept.predicted_peak_gib - away.predicted_peak_gib) * 2**30 == pytest.approx(30 * inputs - extra, rel=5e-3)
    link = 2 * 32 * inputs / step_cost._HOST_LINK_BYTES_PER_MS
    exposed = step_cost._OFFLOAD_EXPOSED * link / step_cost.micro_batch_ms(4096)
    cost_kept, cost_away = step_cost.expected_cost(kept, 32), step_cost.expected_cost(away, 32)
    assert cost_away / cost_kept == pytest.approx(1 + exposed / (1 + step_cost._RECOMPUTE_COST), rel=1e-6)
    monkeypatch.setattr(step_cost, "_OFFLOAD_EXPOSED", 0.0)
    assert step_cost.expected_cost(away, 32) == step_cost.expected_cost(kept, 32)


def test_a_weight_repointed_after_the_offloader_is_built_is_still_never_moved():
    """The optimizer's flat buffers re-point each adapter weight's ``.data`` after the offloader is built
    (flat_steps.flat_set); the offloader still keeps those weights where they are, and the gradients are the plain
    ones. Negative control: with the weights' storage taken when it was built (session 29's code, emulated by a
    static list of the old tensors), both weights were moved beside the input."""
    from phi3tune.flat_steps import flat_set

    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(2))
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    ((x @ a) @ b).sum().backward()
    plain = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    old = [a.detach(), b.detach()]  # the storage the weights had when the offloader was built
    offloader, stale = Offloader(static=[a, b]), Offloader(static=old)
    flat_set([a, b])  # a.data, b.data: views of one new buffer
    assert a.untyped_storage().data_ptr() != old[0].untyped_storage().data_ptr()
    for off in (offloader, stale):
        for t in (x, a, b):
            t.grad = None
        with off.hooks(4):
            loss = ((x @ a) @ b).sum()  # saves x, a, x @ a and b
        loss.backward()
        assert all(torch.equal(t.grad, p) for t, p in zip((x, a, b), plain))
    assert offloader.packed == 2  # x and x @ a
    assert stale.packed == 4


def test_the_forwards_last_saves_stay_on_the_device_never_more_than_the_tail():
    """Every saved tensor moving, the saves at a forward's end worth ``tail`` bytes a token stay on the device (backward
    needs them first): from the second forward on, once the first has said how many bytes a forward saves; the
    gradient is the same. Where an earlier forward saved fewer bytes a token, the tail starts early but still keeps
    no more than its bytes. Negative control: no tail, every save moves each time."""
    def run(tail: float, token_bytes: float = 0.0) -> list[int]:
        off = Offloader(share=1.0, tail=tail, token_bytes=token_bytes)
        packed = []
        for _ in range(2):
            x = torch.randn(64, requires_grad=True)
            with off.hooks(tokens=1):
                y = x
                for _ in range(8):
                    y = torch.sin(y)  # saves its input: 8 tensors of 256 bytes
            y.sum().backward()
            assert x.grad is not None and torch.allclose(x.grad, _sin_chain_grad(x.detach(), 8))
            packed.append(off.packed)
        return packed

    assert run(tail=2 * 256) == [8, 6]  # the last two kept, from the second forward on
    assert run(tail=2 * 256, token_bytes=3 * 256) == [6, 6]  # started early (bytes 256-767), still only two kept
    assert run(tail=0.0) == [8, 8]

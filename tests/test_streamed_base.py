"""The 4-bit base streamed from host memory a decoder layer at a time (phi3tune/streamed_base.py): two device slots
shared by every layer, refilled in forward order and again in backward order, train the resident base's losses and
adapter bit for bit, eager, checkpointed and compiled; the memory model counts two layers' packed bytes on the
device; the run hands back a model whose layers own their weights again."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, run_counting_graphs, tiny_tuner
from test_checkpoint_lengths import _by_length

from phi3tune import pipeline
from phi3tune.streamed_base import StreamedBase, StreamedCall, four_bit_weights


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four decoder layers: two slots, so each slot is shared by two layers (with two, each would have its own)."""
    from phi3tune.tiny import write_tiny_phi3

    return write_tiny_phi3(tmp_path_factory.mktemp("tiny4") / "model", layers=4)


def _skip_backward_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: backward no longer brings a layer's bytes back, so it reads whichever layer's the slot
    held last."""
    monkeypatch.setattr(StreamedBase, "backward_reaches", lambda self, i, grad: None)


def _layers(result: Any) -> list[Any]:
    return list(result.model.get_base_model().model.layers)


def _same(a: Any, b: Any) -> bool:
    x, y = adapter_tensors(a), adapter_tensors(b)
    return a.losses == b.losses and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_public_run_streaming_the_base_trains_the_same_adapter(four_layers, tmp_path, monkeypatch, checkpointing):
    """Through FineTuner.run (the CPU's eager plan; with torch.utils.checkpoint, whose recomputation reads the
    slot after the output's gradient hook refilled it): the streamed run trains the resident run's 3 losses and
    adapter bit for bit, its layers really run from the two shared slots, and the model it returns has every
    layer's own weights back, equal to the resident run's. Negative control (without checkpointing, where
    backward reads the bytes forward saved): no refill in backward changes the losses."""
    rows = rows_of_text(8, seed=4)
    calls = {"n": 0}
    real_call = StreamedCall.__call__

    def counting(self: StreamedCall, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        slots = {t.data_ptr() for slot in self.streamer.slots for t in slot}
        assert {w.data_ptr() for w in self.streamer.weights[self.index]} <= slots  # this layer's weights: a slot
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StreamedCall, "__call__", counting)

    def run(name: str, stream: str) -> Any:
        monkeypatch.setenv("PHI3TUNE_STREAM_BASE", stream)
        return tiny_tuner(four_layers, tmp_path / name, rows, grad_accum=2, max_steps=3,
                          gradient_checkpointing=checkpointing).run()

    resident = run("resident", "0")
    assert calls["n"] == 0 and not resident.plan.streamed_base
    streamed = run("streamed", "1")
    assert streamed.plan.streamed_base and "4-bit base streamed from host memory" in streamed.plan.describe()
    assert calls["n"] >= 3 * 2 * 4  # steps x micro-batches x layers (transformers recomputes forward, not the call)
    assert _same(streamed, resident) and len(resident.losses) == 3
    own = [four_bit_weights(layer) for layer in _layers(streamed)]
    pointers = [w.data_ptr() for ws in own for w in ws]
    assert len(set(pointers)) == len(pointers) == 16  # 4 layers x 4 linears, each its own storage again
    assert not any(isinstance(getattr(m, "_compiled_call_impl", None), StreamedCall) for m in _layers(streamed))
    for ws, rs in zip(own, [four_bit_weights(layer) for layer in _layers(resident)], strict=True):
        assert all(torch.equal(w.data, r.data) for w, r in zip(ws, rs, strict=True))
    if not checkpointing:
        _skip_backward_refill(monkeypatch)
        assert not _same(run("no_refill", "1"), resident)


def test_resident_layers_are_spread_evenly():
    """A streamed base that keeps some layers on the device spreads them (each streamed layer's copy then overlaps
    the resident layers before it): 12 of 32 leave no three streamed layers between two resident ones; none and
    more than all are the edges."""
    from phi3tune.streamed_base import resident_layers

    kept = sorted(resident_layers(32, 12))
    assert len(kept) == 12 and kept[0] == 0 and max(b - a for a, b in pairwise(kept)) <= 3
    assert resident_layers(4, 0) == set() and resident_layers(4, 9) == {0, 1, 2, 3}


def test_a_base_streamed_around_resident_layers_trains_the_same_adapter(four_layers, tmp_path, monkeypatch):
    """PHI3TUNE_STREAM_RESIDENT=1 of four layers: layer 0 keeps its own device weights, layers 1-3 share the two
    slots in turn (1 and 3 the same one). The run trains the resident base's losses and adapter bit for bit, the
    plan counts the resident layer's bytes on the device, and the kept layer never runs from a slot. Negative
    control: without the backward refill the streamed layers read the wrong bytes."""
    rows = rows_of_text(8, seed=4)
    seen: dict[int, bool] = {}
    real_call = StreamedCall.__call__

    def recording(self: StreamedCall, *args: Any, **kwargs: Any) -> Any:
        slots = {t.data_ptr() for slot in self.streamer.slots for t in slot}
        seen[self.index] = {w.data_ptr() for w in self.streamer.weights[self.index]} <= slots
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StreamedCall, "__call__", recording)

    def run(name: str, stream: str) -> Any:
        monkeypatch.setenv("PHI3TUNE_STREAM_BASE", stream)
        return tiny_tuner(four_layers, tmp_path / name, rows, grad_accum=2, max_steps=3).run()

    monkeypatch.setenv("PHI3TUNE_STREAM_RESIDENT", "1")
    resident = run("resident", "0")
    assert resident.plan.resident_layers == 0  # nothing streams, so none is "resident" in that sense
    streamed = run("streamed", "1")
    assert streamed.plan.resident_layers == 1 and "1 layers resident" in streamed.plan.describe()
    assert seen == {0: False, 1: True, 2: True, 3: True}
    assert _same(streamed, resident) and len(resident.losses) == 3
    monkeypatch.setenv("PHI3TUNE_STREAM_RESIDENT", "0")
    all_streamed = run("all_streamed", "1")
    host = all_streamed.plan.memory["host_streamed"]
    gone = all_streamed.plan.memory["quantized_weights"] - streamed.plan.memory["quantized_weights"]
    assert gone == -host // 4  # one layer's packed bytes more on the device
    monkeypatch.setenv("PHI3TUNE_STREAM_RESIDENT", "1")
    _skip_backward_refill(monkeypatch)
    assert not _same(run("no_refill", "1"), resident)


def test_three_slots_keep_two_layers_on_their_way_in_and_train_the_same_adapter(four_layers, tmp_path, monkeypatch):
    """PHI3TUNE_STREAM_SLOTS=3 (benchmarks): four layers take turns in three slots (0 and 3 share one), and each
    layer's call finds the next two layers' bytes already sent for (forward: i + 1, i + 2; backward: i - 1, i - 2),
    where two slots hold one. The run trains the resident base's losses and adapter bit for bit. Negative control:
    without the backward refill the layers read the wrong bytes."""
    rows = rows_of_text(8, seed=4)
    held: list[tuple[int, tuple[int, ...]]] = []  # (layer, the layers the slots hold) after each streamed call
    real_call = StreamedCall.__call__

    def recording(self: StreamedCall, *args: Any, **kwargs: Any) -> Any:
        out = real_call(self, *args, **kwargs)
        if not held or held[-1][0] != self.index:
            held.append((self.index, tuple(sorted(self.streamer.resident))))
        return out

    monkeypatch.setattr(StreamedCall, "__call__", recording)

    def run(name: str, stream: str, slots: str) -> Any:
        monkeypatch.setenv("PHI3TUNE_STREAM_BASE", stream)
        monkeypatch.setenv("PHI3TUNE_STREAM_SLOTS", slots)
        held.clear()
        return tiny_tuner(four_layers, tmp_path / name, rows, grad_accum=2, max_steps=3).run()

    resident = run("resident", "0", "3")
    three = run("three", "1", "3")
    assert _same(three, resident) and len(resident.losses) == 3
    assert held[:4] == [(0, (0, 1, 2)), (1, (1, 2, 3)), (2, (1, 2, 3)), (3, (1, 2, 3))]  # after each call: two ahead
    two = run("two", "1", "2")
    assert _same(two, resident)
    assert held[:4] == [(0, (0, 1)), (1, (1, 2)), (2, (2, 3)), (3, (2, 3))]  # one ahead
    monkeypatch.setenv("PHI3TUNE_STREAM_SLOTS", "3")
    _skip_backward_refill(monkeypatch)
    assert not _same(run("no_refill", "1", "3"), resident)


def test_the_memory_plan_streams_beside_its_inputs_in_host_memory(four_layers, tmp_path, monkeypatch):
    """The memory plan (every layer checkpointed by torch, its inputs in host memory: offload.py, whose side stream
    and saved-tensor hooks run beside the streamer's) trains the same 3 losses and adapter streamed as resident.
    What a missing refill would change: the negative control above."""
    monkeypatch.setenv("PHI3TUNE_OFFLOAD", "1")  # the CUDA memory plan's choice, here on the CPU

    def run(name: str, stream: str) -> Any:
        monkeypatch.setenv("PHI3TUNE_STREAM_BASE", stream)
        return tiny_tuner(four_layers, tmp_path / name, rows_of_text(8, seed=4), grad_accum=2, max_steps=3,
                          optimize_for="memory").run()

    resident, streamed = run("resident", "0"), run("streamed", "1")
    assert resident.plan.offload_checkpoints and streamed.plan.offload_checkpoints
    assert streamed.plan.streamed_base and not resident.plan.streamed_base
    assert _same(streamed, resident) and len(resident.losses) == 3


def test_public_run_streaming_into_compiled_layers_that_recompute_in_graph(four_layers, tmp_path, monkeypatch,
                                                                          traced_layers):
    """The small cards' GPU path on this CPU: compiled layers (symbolic lengths) that checkpoint inside their graphs
    for passes over 120 tokens. Streamed, the run trains the resident run's losses and adapter (the compiled
    backward reads the bytes its forward saved: the hook on the layer's output refills them first) and compiles no
    more graphs. Negative control: no refill in backward changes the losses."""
    lengths = ((120, 0), (128, 4))
    monkeypatch.setattr(pipeline, "resolve_plan", _by_length(pipeline.resolve_plan, lengths, recompute_in_graph=True))
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")

    def run(name: str, stream: str) -> tuple[Any, list[int]]:
        monkeypatch.setenv("PHI3TUNE_STREAM_BASE", stream)
        return run_counting_graphs(tiny_tuner(four_layers, tmp_path / name, rows_of_text(36, seed=4),
                                              optimize_for="speed", compile=True, micro_batch_tokens=128,
                                              batch_size=3, grad_accum=2, max_steps=2))

    resident, resident_graphs = run("resident", "0")
    streamed, streamed_graphs = run("streamed", "1")
    assert streamed.plan.streamed_base and streamed.plan.recompute_in_graph
    assert streamed.losses == pytest.approx(resident.losses, rel=1e-6) and len(resident.losses) == 2
    a, b = adapter_tensors(streamed), adapter_tensors(resident)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert streamed_graphs[-1] == resident_graphs[-1], (streamed_graphs, resident_graphs)
    _skip_backward_refill(monkeypatch)
    skipped, _ = run("no_refill", "1")
    assert adapter_tensors(skipped)[next(iter(a))].shape  # it ran
    assert not all(torch.allclose(adapter_tensors(skipped)[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_in_graph_checkpoints_offloaded_beside_a_streamed_base_train_the_same_adapter(four_layers, tmp_path,
                                                                                    monkeypatch, traced_layers):
    """The smallest cards' GPU path on this CPU: compiled layers checkpointed inside their graphs, every layer on every
    pass, their saved inputs in host memory (offload.py) and the base streamed. It trains the losses and adapter of
    the resident run that keeps its inputs on the device, bit for bit, and compiles no more graphs. What moves is
    each layer's input, never a frozen tensor: the weights (a streamed layer's weight is its slot), the block scales,
    the LoRA weights, which every layer's graph saves too (negative control: they reach the hooks, and the static
    rule keeps them)."""
    from phi3tune import loop
    from phi3tune.offload import Offloader, frozen_tensors

    real = pipeline.resolve_plan
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    offered: list[tuple[bool, bool, tuple[int, ...]]] = []  # (moved, frozen, shape) of each tensor a forward saves
    frozen: set[int] = set()  # the storages of the run's weights (a streamed layer's: its slot) and block scales
    real_pack, real_offloader_for = Offloader._pack, loop.offloader_for

    def offloader_for(plan: Any, model: Any) -> Any:
        frozen.update(t.untyped_storage().data_ptr() for t in frozen_tensors(model))
        return real_offloader_for(plan, model)

    def pack(self: Offloader, t: torch.Tensor) -> Any:
        out = real_pack(self, t)
        offered.append((out is not t, t.untyped_storage().data_ptr() in frozen, tuple(t.shape)))
        return out

    monkeypatch.setattr(loop, "offloader_for", offloader_for)
    monkeypatch.setattr(Offloader, "_pack", pack)

    def run(name: str, stream: str, offload: bool) -> tuple[Any, list[int]]:
        monkeypatch.setenv("PHI3TUNE_STREAM_BASE", stream)
        monkeypatch.setattr(pipeline, "resolve_plan", lambda *a, **k: replace(
            real(*a, **k), checkpointing=True, checkpoint_layers=4, recompute_in_graph=True,
            offload_checkpoints=offload))
        return run_counting_graphs(tiny_tuner(four_layers, tmp_path / name, rows_of_text(36, seed=4),
                                              optimize_for="speed", compile=True, micro_batch_tokens=128,
                                              batch_size=3, grad_accum=2, max_steps=2))

    resident, resident_graphs = run("resident", "0", False)
    assert not offered  # no offloader without the plan's word
    streamed, streamed_graphs = run("streamed", "1", True)
    assert streamed.plan.streamed_base and streamed.plan.offload_checkpoints and streamed.plan.recompute_in_graph
    assert _same(streamed, resident) and len(resident.losses) == 2
    assert streamed_graphs[-1] == resident_graphs[-1], (streamed_graphs, resident_graphs)
    hidden = json.loads((four_layers / "config.json").read_text())["hidden_size"]
    inputs = [shape for was_moved, _, shape in offered if was_moved and shape[-1] == hidden]
    assert len(inputs) >= 4 * 4  # each layer's input, in each of the 4 passes of the 2 steps (and the warm-up's)
    assert not any(was_moved and is_frozen for was_moved, is_frozen, _ in offered)
    assert any(is_frozen for _, is_frozen, _ in offered)  # negative control: the graphs save frozen tensors too


def test_the_memory_model_keeps_two_layers_of_packed_bytes():
    """Streamed, the device holds the block scales and two of four layers' packed bytes; the rest is in
    host_streamed, outside the device total; nothing else changes."""
    from phi3tune.memory import ModelShape, estimate_parts, total_gib

    linears = tuple((f"layers.{i}.q", 64, 128) for i in range(4))
    shape = ModelShape(hidden=64, intermediate=128, layers=4, vocab=100, other_params=0, linears=linears)
    kw = dict(bits=4, double_quant=False, targets={"q"}, r=4, dropout=0.1, optimizer_state_bytes=8, act_bytes=2,
              upcast_frozen=False, tokens=100, checkpointing=False, compiled=True, ce_chunk=50, cuda=True)
    resident, streamed = estimate_parts(shape, **kw), estimate_parts(shape, streamed_base=True, **kw)
    packed, scales = 4 * 64 * 128 // 2, 4 * 64 * 128 // 64 * 4
    assert resident["quantized_weights"] == packed + scales
    assert streamed["quantized_weights"] == packed // 2 + scales
    assert streamed["host_streamed"] == packed and "host_streamed" not in resident
    assert {k: v for k, v in streamed.items() if k not in ("quantized_weights", "host_streamed")} == \
        {k: v for k, v in resident.items() if k != "quantized_weights"}
    gib = 2**30
    assert total_gib(streamed) == pytest.approx(total_gib(resident) - packed / 2 / gib, abs=2e-3)


@needs_shared
def test_a_streamed_base_frees_room_on_a_small_card(monkeypatch):
    """Phi-3-mini's quickstart on an 8 GiB card: streamed, 1.6 GiB of the base leave the device (30 of 32 layers'
    packed bytes), so the plan checkpoints fewer layers for the same micro-batches or takes larger ones; never
    with the base dequantized. Negative control: unset, the knob changes nothing."""
    from phi3tune import FineTuner
    from phi3tune.bench import plan_for

    monkeypatch.delenv("PHI3TUNE_STREAM_BASE", raising=False)
    resident = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=8)
    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "1")
    streamed = plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=8)
    assert streamed.streamed_base and not resident.streamed_base and not streamed.dequantized_base
    moved = streamed.memory["host_streamed"] / 2**30
    assert 1.55 < moved < 1.75  # Phi-3-mini's packed 4-bit bytes
    gone = resident.memory["quantized_weights"] - streamed.memory["quantized_weights"]
    assert gone == pytest.approx(streamed.memory["host_streamed"] * 30 / 32, rel=1e-3)
    assert (streamed.peak_micro_batch_tokens, -streamed.checkpoint_layers) > \
        (resident.peak_micro_batch_tokens, -resident.checkpoint_layers)
    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "0")
    assert plan_for(FineTuner(str(PHI3_DIR)), "cuda", free_gib=8) == resident


@needs_shared
def test_auto_streams_the_base_only_where_resident_plans_fall_short(monkeypatch):
    """``auto`` weighs the base streamed against resident (plan_search._streams), at a margin
    (step_cost._STREAMED_COST). Phi-3-mini's quickstart on a 5 GiB card, where no resident plan fits, runs the
    memory plan streamed: 4,096-token micro-batches, every layer checkpointed in graph, their inputs in host memory
    (a streamed plan that checkpoints every layer keeps its inputs there: session 27, where keeping them on the
    device had filled a 5 GiB card, the paged optimizer state then read from host memory). On 8-16 GiB it stays
    resident, though streaming would free room there, because the gain the model sees is under the margin; a 4 GiB
    card streams, with small micro-batches. Negative controls: PHI3TUNE_STREAM_BASE=0 gives the resident plans back
    (on 5 GiB nothing fits: the least the memory plan holds); PHI3TUNE_OFFLOAD=0 keeps the inputs on the device
    (session 26's 5 GiB plan); the speed mode, named, never streams unasked; the memory mode, named, streams
    wherever it can."""
    from phi3tune import FineTuner
    from phi3tune.bench import plan_for
    from phi3tune.step_cost import _STREAMED_COST, expected_cost

    def plan(gib: float, knob: str | None = None, **train: Any) -> Any:
        if knob is None:
            monkeypatch.delenv("PHI3TUNE_STREAM_BASE", raising=False)
        else:
            monkeypatch.setenv("PHI3TUNE_STREAM_BASE", knob)
        return plan_for(FineTuner(str(PHI3_DIR)).training(**train), "cuda", free_gib=gib)

    five, five_resident = plan(5), plan(5, "0")
    assert (five.mode, five.streamed_base, five.offload_checkpoints, five.peak_micro_batch_tokens) == \
        ("memory", True, True, 4096) and five.predicted_peak_gib <= 0.9 * 5
    assert five_resident.mode == "memory" and not five_resident.streamed_base
    assert five_resident.predicted_peak_gib > 0.9 * 5 and five_resident.peak_micro_batch_tokens == 1024
    assert expected_cost(five, 32) < expected_cost(five_resident, 32)
    monkeypatch.setenv("PHI3TUNE_OFFLOAD", "0")
    five_kept = plan(5)
    assert (five_kept.mode, five_kept.streamed_base, five_kept.offload_checkpoints) == ("speed", True, False)
    monkeypatch.delenv("PHI3TUNE_OFFLOAD")
    for gib in (8, 12, 16):
        auto, forced = plan(gib), plan(gib, "1")
        assert not auto.streamed_base and auto == plan(gib, "0")
        assert forced.streamed_base and expected_cost(forced, 32) >= expected_cost(auto, 32)
    eight, eight_streamed = plan(8), plan(8, "1")  # it frees room there: a gain, but under the margin
    assert expected_cost(eight_streamed, 32) / _STREAMED_COST < expected_cost(eight, 32)
    four = plan(4)
    assert four.streamed_base and four.predicted_peak_gib <= 0.9 * 4
    assert not plan(5, optimize_for="speed").streamed_base and plan(5, "1", optimize_for="speed").streamed_base
    # the memory plan, named, streams wherever it can: holding little is what it is for
    assert plan(8, optimize_for="memory").streamed_base
    small, held = plan(4, optimize_for="memory"), plan(4, "0", optimize_for="memory")
    assert small.streamed_base and not held.streamed_base and small.predicted_peak_gib < held.predicted_peak_gib


def test_only_a_model_whose_decoder_layers_are_alike_can_stream():
    """The layers share two device slots, so every layer needs the same 4-bit weights: a shape where one layer has
    a linear more (or none is named as a decoder layer's) never streams, whatever the knob asks."""
    from phi3tune import FineTuner
    from phi3tune.memory import ModelShape
    from phi3tune.plan import can_stream

    def shape(*extra: tuple[str, int, int]) -> ModelShape:
        linears = tuple((f"model.layers.{i}.{name}", 8, o) for i in range(3) for name, o in (("qkv", 24), ("o", 8)))
        return ModelShape(hidden=8, intermediate=16, layers=3, vocab=10, linears=linears + extra, other_params=0)

    run = FineTuner("any/model").freeze()  # the default: a 4-bit base
    assert shape().uniform_layers and can_stream(run, shape(), processes=1)
    assert not can_stream(run, shape(), processes=2)  # FSDP shards the base instead
    assert not can_stream(FineTuner("any/model").quantize(False).freeze(), shape(), processes=1)  # no 4-bit base
    odd = shape(("model.layers.1.extra", 8, 8))
    assert not odd.uniform_layers and not can_stream(run, odd, processes=1)
    assert not ModelShape(hidden=8, intermediate=16, layers=3, vocab=10, linears=(), other_params=0).uniform_layers


def test_a_base_streams_only_where_the_model_still_loads(monkeypatch):
    """bitsandbytes quantizes the base on the device as it loads, and only then does it move to host memory, so a
    streamed plan must hold the whole base while loading (memory.load_bytes). Phi-3-medium (14B) on an 8 GiB card
    (7.5 GiB free): streamed, its peak would fit, but loading would not; so the memory plan stays resident and the
    run is refused before weights load, and a streamed plan asked for by the knob is refused too. Negative control:
    on a 10 GiB card the model loads, and the memory plan, which would not fit resident, streams."""
    from test_fsdp import _medium

    from phi3tune.bench import plan_for
    from phi3tune.errors import ConfigError
    from phi3tune.memory import GIB, fixed_bytes, load_bytes
    from phi3tune.pipeline import check_fits

    monkeypatch.delenv("PHI3TUNE_STREAM_BASE", raising=False)
    assert not plan_for(_medium("auto"), "cuda", free_gib=7.5).streamed_base
    roomy = plan_for(_medium("auto"), "cuda", free_gib=10)
    assert roomy.streamed_base and roomy.mode == "memory"
    check_fits(roomy)
    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "1")
    forced = plan_for(_medium("auto"), "cuda", free_gib=7.5)
    assert forced.streamed_base and fixed_bytes(forced.memory) < 7.5 * GIB < load_bytes(forced.memory)
    weights = sum(forced.memory[k] for k in ("quantized_weights", "host_streamed", "other_weights", "cuda_context"))
    assert load_bytes(forced.memory) == weights + 4 * forced.memory["lora_params"]  # the adapter attaches first
    with pytest.raises(ConfigError, match="GiB free"):
        check_fits(forced)


def test_a_device_too_full_for_the_whole_base_leaves_the_model_streamed(four_layers, tmp_path, monkeypatch, caplog):
    """The run is over and its adapter saved when the base comes back to the device; where it does not fit there
    (the device copies run out of memory), the model stays streamed, with a warning: it still computes what the
    resident model computes (the same logits), and nothing half-restored is left. Negative control: the weights are
    the slots still."""
    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "1")

    def no_room(self: StreamedBase) -> list[list[torch.Tensor]]:
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(StreamedBase, "_device_copies", no_room)
    rows = rows_of_text(8, seed=5)
    with caplog.at_level("WARNING", logger="phi3tune"):
        kept = tiny_tuner(four_layers, tmp_path / "kept", rows, grad_accum=2, max_steps=2).run()
    assert "stays streamed from host memory" in caplog.text
    calls = [getattr(layer, "_compiled_call_impl", None) for layer in _layers(kept)]
    assert all(isinstance(c, StreamedCall) for c in calls)
    streamer = calls[0].streamer
    slots = {t.data_ptr() for slot in streamer.slots for t in slot}
    assert {w.data_ptr() for ws in streamer.weights for w in ws} <= slots  # none half-restored
    monkeypatch.setenv("PHI3TUNE_STREAM_BASE", "0")
    resident = tiny_tuner(four_layers, tmp_path / "resident", rows, grad_accum=2, max_steps=2).run()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.equal(kept.model(input_ids=ids).logits, resident.model(input_ids=ids).logits)

"""Checkpointing inside the compiled graph (recompute.RecomputeSwitch): a compiled layer switched on keeps
only its inputs for backward and recomputes the rest in its backward graph, with the gradients of the eager layer;
a run that checkpoints that way trains what torch.utils.checkpoint's run trains."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, run_counting_graphs, tiny_tuner
from test_checkpoint_lengths import _by_length
from test_lora_dropout import _lora_layer, _step

from phi3tune import compiled_layers as cl
from phi3tune import pipeline
from phi3tune.checkpoint_lengths import LengthCheckpointing
from phi3tune.recompute import RecomputeSwitch, set_checkpointing


def _saved_per_token(inner: Any, layer: Any, n: int) -> tuple[list[torch.Tensor], int]:
    for p in inner.parameters():
        p.grad = None
    return _step(inner, layer, n)


def test_a_switched_layer_keeps_only_its_inputs_and_gets_the_eager_gradients(tiny_model, traced_layers):
    """One tiny LoRA layer (hashed dropout 0.3), compiled as the plans compile it, plus its RecomputeSwitch. Off,
    it saves what its budget keeps; on, only what a checkpoint keeps, its inputs: per token the hidden state and the
    rotary tables (which every layer of a model shares), from 32 to 48 tokens. Both give the eager layer's
    gradients (the masks recomputed in backward are the same). Without gradients (eval) the plain graphs run:
    switching on builds no graph there. Negative control: the plain graphs save several times more per token."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    inner = _lora_layer(tiny_model, "hashed")
    eager, _ = _step(inner, inner.layers[0])
    layer = inner.layers[0]
    cl.compile_layers([layer], {}, dynamic=False, recompute_in_graph=True)
    switch = RecomputeSwitch.of(layer)
    assert switch is not None and not switch.on
    hidden = inner.config.hidden_size

    def per_token(on: bool) -> tuple[list[torch.Tensor], float]:
        set_checkpointing(layer, on)
        _saved_per_token(inner, layer, 32)  # compile at this length
        grads32, saved32 = _saved_per_token(inner, layer, 32)
        _saved_per_token(inner, layer, 48)
        _, saved48 = _saved_per_token(inner, layer, 48)
        return grads32, (saved48 - saved32) / 16 / 4  # fp32 elements a token adds

    plain_grads, plain_kept = per_token(False)
    grads, kept = per_token(True)
    rotary = 2 * hidden // inner.config.num_attention_heads  # cos and sin: inputs every layer shares in a model
    assert kept == hidden + rotary  # the input's row and the rotary tables'; everything else is recomputed
    assert plain_kept > 4 * hidden  # negative control: the plain graphs keep the layer's activations

    def worst(got: list[torch.Tensor]) -> float:
        return max(float((g - e).norm() / e.norm()) for g, e in zip(got, eager, strict=True))

    assert worst(grads) < 1e-4 and worst(plain_grads) < 1e-4
    built = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # eval: the plain graphs, already built for 32 tokens
        x = torch.randn(1, 32, hidden)
        pos = torch.arange(32)[None]
        layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
        set_checkpointing(layer, False)
        layer(x, position_embeddings=inner.rotary_emb(x, pos), position_ids=pos)
    assert counters["stats"]["unique_graphs"] == built + 1  # one inference graph, shared by both settings


def test_a_layer_without_the_switch_is_checkpointed_by_torch():
    """set_checkpointing on a layer compiled without a switch (or not compiled) sets transformers' flag, which
    LengthCheckpointing then flips per pass."""
    layers = [torch.nn.Module() for _ in range(2)]
    switch = LengthCheckpointing(layers, ((64, 0), (96, 1)), default=2)
    switch(96)
    assert [getattr(m, "gradient_checkpointing", None) for m in layers] == [True, False]


def test_public_run_recomputing_in_graph_trains_what_torch_checkpoint_trains(tiny_model, tmp_path, monkeypatch,
                                                                            traced_layers):
    """Through FineTuner.run (compiled speed plan, symbolic lengths, LoRA dropout 0.1 with hashed masks), a plan that
    checkpoints both layers for passes over 120 tokens and none below: inside the compiled graphs and by
    torch.utils.checkpoint train the same losses and adapter; the in-graph run's passes switch its layers exactly
    as the table says, its warm-up builds every graph both ways and its steps build none (the torch run's, with
    dropout on, build two after the warm-up on this CPU). Negative control: the torch run's layers carry no
    switch, and torch's checkpoint ran in it only."""
    from transformers import modeling_utils

    calls: list[int] = []
    real_checkpoint = modeling_utils.checkpoint

    def counting(function: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(args[0].shape[1]))
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    lengths = ((120, 0), (128, 2))
    real_resolve = pipeline.resolve_plan
    monkeypatch.setattr(pipeline, "resolve_plan", _by_length(real_resolve, lengths, recompute_in_graph=True))
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    seen: list[tuple[int, tuple[bool, ...]]] = []
    real_switch = LengthCheckpointing.__call__

    def spy(self: LengthCheckpointing, tokens: int) -> None:
        real_switch(self, tokens)
        switches = [RecomputeSwitch.of(layer) for layer in self.layers]
        seen.append((tokens, tuple(bool(s and s.on) for s in switches)))

    monkeypatch.setattr(LengthCheckpointing, "__call__", spy)
    rows = rows_of_text(36, seed=4)

    def run(out: str) -> tuple[Any, list[int]]:
        tuner = tiny_tuner(tiny_model, tmp_path / out, rows, optimize_for="speed", compile=True,
                           micro_batch_tokens=128, batch_size=3, grad_accum=2, max_steps=2)
        return run_counting_graphs(tuner)

    graph, graphs = run("in_graph")
    assert graph.plan.recompute_in_graph and "inside their compiled graphs" in graph.plan.describe()
    assert not calls  # torch's checkpoint never ran
    assert {on for _, on in seen} == {(False, False), (True, True)}  # both ways ran
    assert all(on == (tokens > 120,) * 2 for tokens, on in seen)
    assert graphs[0] == graphs[-1], graphs  # nothing compiled after the warm-up
    seen.clear()
    monkeypatch.setattr(pipeline, "resolve_plan", _by_length(real_resolve, lengths, recompute_in_graph=False))
    torch_run, graphs = run("torch")
    assert not torch_run.plan.recompute_in_graph and calls  # negative control: torch's checkpoint did the work
    assert all(on == (False, False) for _, on in seen)
    assert graph.losses == pytest.approx(torch_run.losses, rel=1e-5) and len(graph.losses) == 2
    a, b = adapter_tensors(graph), adapter_tensors(torch_run)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@needs_shared
def test_compiled_plans_that_checkpoint_do_so_in_graph(monkeypatch):
    """An 8 GiB card's quickstart checkpoints every layer's longest passes inside the compiled graphs, and so does
    the memory plan, whose checkpointed inputs (what those graphs save) wait in host memory (offload.py); a plan
    that checkpoints nothing has nothing to switch. Negative control: PHI3TUNE_RECOMPUTE_IN_GRAPH=0 checkpoints
    by torch's checkpoint, the memory plan's too."""
    from phi3tune import FineTuner
    from phi3tune.bench import plan_for

    monkeypatch.delenv("PHI3TUNE_RECOMPUTE_IN_GRAPH", raising=False)
    ft = FineTuner(str(PHI3_DIR))
    small = plan_for(ft, "cuda", free_gib=8)
    assert small.checkpoint_layers > 0 and small.recompute_in_graph
    assert "layers inside their compiled graphs" in small.describe()
    memory = plan_for(FineTuner(str(PHI3_DIR)).training(optimize_for="memory"), "cuda", free_gib=8)
    assert memory.offload_checkpoints and memory.recompute_in_graph
    assert not plan_for(ft, "cuda", free_gib=80).recompute_in_graph
    monkeypatch.setenv("PHI3TUNE_RECOMPUTE_IN_GRAPH", "0")
    off = plan_for(ft, "cuda", free_gib=8)
    assert off.checkpoint_layers > 0 and not off.recompute_in_graph
    torch_memory = plan_for(FineTuner(str(PHI3_DIR)).training(optimize_for="memory"), "cuda", free_gib=8)
    assert torch_memory.offload_checkpoints and not torch_memory.recompute_in_graph
    assert "inside their compiled graphs" not in off.describe()


def test_the_memory_model_counts_more_for_a_layer_recomputed_in_graph():
    """A layer recomputed inside its compiled backward graph holds 1.28x torch checkpoint's recomputation
    (measured, memory.py): the same plan's activations grow by that layer's 28% and by nothing else; without
    checkpointing the flag changes nothing."""
    from phi3tune.memory import ModelShape, estimate_parts

    shape = ModelShape(hidden=64, intermediate=128, layers=4, vocab=100, other_params=0,
                       linears=(("q", 64, 64),))
    kw = dict(bits=4, double_quant=False, targets={"q"}, r=4, dropout=0.1, optimizer_state_bytes=8, act_bytes=2,
              upcast_frozen=False, tokens=100, compiled=True, ce_chunk=50, cuda=True, checkpoint_layers=2)
    torch_ckpt = estimate_parts(shape, checkpointing=True, **kw)
    in_graph = estimate_parts(shape, checkpointing=True, recompute_in_graph=True, **kw)
    flat = estimate_parts(shape, checkpointing=False, **kw)
    grown = in_graph["activations"] - torch_ckpt["activations"]
    recomputed = 2 * (14 * 64 + 5 * 128 + 95) * 0.85 * 100  # the recomputed layer's bytes (memory.py's model)
    assert grown == pytest.approx(0.28 * recomputed, rel=1e-3)
    others = [k for k in in_graph if k != "activations"]
    assert [in_graph[k] for k in others] == [torch_ckpt[k] for k in others]
    assert estimate_parts(shape, checkpointing=False, recompute_in_graph=True, **kw) == flat


def test_each_graph_family_compiles_once_symbolic_from_the_first_length(tiny_model, tmp_path, monkeypatch,
                                                                        traced_layers):
    """A symbolic-length plan (varlen attention, whose layers get no mask: the CUDA plans' inputs) that checkpoints
    its layers in graph for the longer passes: its layers' inputs are marked dynamic in the token dimension
    (compiled_layers.symbolic_from_the_first_length), so each of the two graph families compiles once, symbolic,
    and the steps compile nothing more. Negative control: without the marks dynamo first builds a static graph
    for the first length each family meets, more graphs for the same losses."""
    lengths = ((120, 0), (128, 2))
    monkeypatch.setattr(pipeline, "resolve_plan", _by_length(pipeline.resolve_plan, lengths, recompute_in_graph=True))
    monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")

    def run(out: str) -> tuple[Any, list[int]]:
        tuner = tiny_tuner(tiny_model, tmp_path / out, rows_of_text(36, seed=4), optimize_for="speed", compile=True,
                           micro_batch_tokens=128, batch_size=3, grad_accum=2, max_steps=2).adapter(dropout=0.1)
        tuner.attn_implementation = "phi3tune_varlen"
        return run_counting_graphs(tuner)

    marked, graphs = run("marked")
    assert marked.plan.dynamic_lengths and marked.plan.attn_implementation == "phi3tune_varlen"
    assert graphs[0] == graphs[-1] == 2, graphs  # one symbolic graph per family
    monkeypatch.setattr(pipeline, "symbolic_from_the_first_length", lambda decoder: None)
    plain, plain_graphs = run("plain")
    # the plain family: a static graph at the first length, then the symbolic one; the recomputing family meets
    # only 128 tokens here: one static graph
    assert plain_graphs[0] == plain_graphs[-1] == 3, plain_graphs
    assert marked.losses == pytest.approx(plain.losses, rel=1e-6) and len(marked.losses) == 2

"""Checkpointing by micro-batch length (checkpoint_lengths.py): each length checkpoints the fewest first layers that
keep it within the plan's predicted peak; a run that switches layers per pass trains exactly what one that
checkpoints nothing trains; `auto` takes it where a whole step needs layers checkpointed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from helpers import PHI3_DIR, adapter_tensors, needs_shared, rows_of_text, run_counting_graphs, tiny_tuner

from phi3tune import FineTuner, pipeline
from phi3tune.checkpoint_lengths import LengthCheckpointing, layers_for, recomputed_share, table


def _peak_of(n: int, k: int, layers: int = 8) -> float:
    """A toy peak: weights 1, a kept layer 1 per token, a checkpointed one 0.25, one layer recomputed whole (2)."""
    return 1 + n * ((layers - k) * 1.0 + k * 0.25 + (2.0 if k else 0.0)) / 1000


def test_each_length_takes_the_fewest_layers_within_the_peak():
    """Against a brute-force search of every count at every length: the table's count is the fewest that fits
    (one checkpointed layer costs more than none here: the search starts at none), entries merge where the count
    does not change, and the longest takes the plan's own count. Negative control: one layer fewer at any
    listed length would be over the peak."""
    lengths = tuple(range(128, 2049, 128))
    peak = _peak_of(2048, 6)
    got = table(lengths, 6, peak, _peak_of)
    assert got[-1] == (2048, 6) and [n for n, _ in got] == sorted({n for n, _ in got})
    assert len({k for _, k in got}) == len(got)  # merged: one entry per count
    for n in lengths:
        k = layers_for(got, n, 6)
        assert k == next(j for j in range(7) if _peak_of(n, j) <= peak), n
        assert _peak_of(n, k) <= peak and (k == 0 or _peak_of(n, k - 1) > peak)
    assert layers_for(got, 128, 6) == 0 and layers_for(got, 4096, 6) == 6  # past the table: the plan's count


def test_the_cost_model_counts_only_the_steps_that_recompute():
    """The recomputed share weights each step's count by its tokens: steps that checkpoint none cost nothing."""
    lengths = ((3968, 0), (4224, 5), (4736, 9))
    assert recomputed_share(lengths, 32, [3000] * 10) == 0.0
    assert recomputed_share(lengths, 32, [3000] * 9 + [4500]) == pytest.approx(4500 * 9 / (31500 * 32))
    assert recomputed_share((), 32, [3000]) is None and recomputed_share(lengths, 32, []) is None


def test_the_switch_sets_each_layers_flag_for_the_pass():
    layers = [torch.nn.Module() for _ in range(4)]
    switch = LengthCheckpointing(layers, ((64, 0), (96, 2)), default=4)
    seen = []
    for n in (32, 96, 64, 200):
        switch(n)
        seen.append([getattr(layer, "gradient_checkpointing", None) for layer in layers])
    assert seen == [[False] * 4, [True, True, False, False], [False] * 4, [True] * 4]


def _by_length(real: Any, lengths: tuple[tuple[int, int], ...], **changes: Any) -> Any:
    def resolve(*args: Any, **kwargs: Any) -> Any:  # a plan the search makes on a GPU, on this CPU
        plan = real(*args, **kwargs)
        return replace(plan, checkpointing=True, checkpoint_layers=lengths[-1][1], checkpoint_lengths=lengths,
                       **changes)
    return resolve


@pytest.mark.parametrize("compile", [False, True])
def test_public_run_checkpointing_by_length_trains_the_same_adapter(tiny_model, tmp_path, monkeypatch, compile):
    """Through FineTuner.run (speed plan, micro-batches up to 128 tokens), a plan that checkpoints layers by length
    trains the losses and adapter of the eager run that checkpoints nothing. Eager (4 fixed lengths, LoRA dropout,
    the same masks recomputed): none of the 2 layers up to 104 tokens, the first up to 120, both above; the layers
    really run checkpointed, exactly in the passes the table says (negative control: the run without it checkpoints
    none).
    Compiled (symbolic lengths, every multiple of 8; no dropout, whose hashed masks eager layers do not draw: a
    checkpointed compiled layer's are tests/test_lora_dropout.py's): none up to 120 tokens, both above; the warm-up
    builds every graph the steps need, both ways, and the steps build none."""
    from transformers import modeling_utils

    calls: list[int] = []
    real_checkpoint = modeling_utils.checkpoint

    def counting(function: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(args[0].shape[1]))  # the layer's hidden states: (1, tokens, hidden)
        return real_checkpoint(function, *args, **kwargs)

    if not compile:  # traced, the count would be the compiler's business
        monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    widths: list[int] = []
    real_switch = LengthCheckpointing.__call__

    def spy(self: LengthCheckpointing, tokens: int) -> None:
        widths.append(tokens)
        real_switch(self, tokens)

    monkeypatch.setattr(LengthCheckpointing, "__call__", spy)
    rows = rows_of_text(36, seed=4)

    def run(out: str, compiled: bool) -> tuple[Any, list[int]]:
        tuner = tiny_tuner(tiny_model, tmp_path / out, rows, optimize_for="speed", compile=compiled,
                           micro_batch_tokens=128, batch_size=3, grad_accum=2, max_steps=3
                           ).adapter(dropout=0.0 if compile else 0.1)
        return run_counting_graphs(tuner)

    plain, _ = run("plain", compiled=False)
    assert not calls and not widths and not plain.plan.checkpointing
    lengths = ((120, 0), (128, 2)) if compile else ((104, 0), (120, 1), (128, 2))
    monkeypatch.setattr(pipeline, "resolve_plan", _by_length(pipeline.resolve_plan, lengths))
    if compile:
        monkeypatch.setenv("PHI3TUNE_COMPILE", "dynamic_lengths=1")
    res, graphs = run("by_length", compiled=compile)
    assert res.plan.checkpoint_lengths == lengths and "by length: 0 up to 1" in res.plan.describe()
    close = {"rel": 1e-5} if compile else {"rel": 1e-6, "abs": 1e-7}  # compiled against eager: as compiled_layers
    assert res.losses == pytest.approx(plain.losses, **close) and len(res.losses) == 3
    a, b = adapter_tensors(plain), adapter_tensors(res)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    ways = {layers_for(lengths, n, 2) for n in widths}
    assert ways == {k for _, k in lengths}, widths  # every way ran
    if compile:
        assert graphs[0] == graphs[-1], graphs  # nothing compiled after the warm-up
    else:  # one call per checkpointed layer and pass: none up to 104 tokens, the first layer up to 120, both above
        assert calls and sorted(calls) == sorted(n for n in widths for _ in range(layers_for(lengths, n, 2)))


@needs_shared
def test_auto_checkpoints_by_length_where_a_whole_step_needs_layers(monkeypatch):
    """A 12 GiB card, the quickstart's steps (most ~3,100 tokens, three over 4,096): `auto` takes whole-step
    micro-batches that checkpoint layers only for the longest steps, not two passes for them, and its cost counts
    only the steps that recompute. Negative
    control (PHI3TUNE_CKPT_BY_LENGTH=0): every pass would checkpoint as many, so the plan cuts 4,096-token
    micro-batches instead, as before."""
    from phi3tune.bench import plan_for
    from phi3tune.step_cost import expected_cost

    monkeypatch.delenv("PHI3TUNE_CKPT_BY_LENGTH", raising=False)
    steps = [3100] * 56 + [2000, 2500, 3500, 3900, 4158, 4499, 4686]
    ft = FineTuner(str(PHI3_DIR))
    plan = plan_for(ft, "cuda", free_gib=12, steps=steps)
    assert plan.micro_batch_tokens >= max(steps) and plan.checkpoint_layers > 0
    assert layers_for(plan.checkpoint_lengths, 3968, -1) == 0 and plan.checkpoint_lengths[-1][1] > 0
    assert plan.predicted_peak_gib <= 12 * 0.94
    uniform = replace(plan, checkpoint_lengths=())
    assert expected_cost(plan, 32, False, steps) < expected_cost(uniform, 32, False, steps)
    # priced per share recomputed, never above checkpointing the longest's layers on every pass (8 GiB: all)
    eight = plan_for(ft, "cuda", free_gib=8, steps=steps)
    assert eight.checkpoint_lengths and expected_cost(eight, 32, False, steps) == pytest.approx(
        expected_cost(replace(eight, checkpoint_lengths=()), 32, False, steps))
    # 20 GiB: a tenth of the layer passes recomputed at the default budget measured slower (session 21) than the
    # middle budget, which checkpoints nothing
    twenty = plan_for(ft, "cuda", free_gib=20, steps=steps)
    assert not twenty.checkpointing and twenty.activation_budget == 0.5
    from phi3tune import step_cost

    monkeypatch.setattr(step_cost, "_BY_LENGTH_RECOMPUTE", step_cost._RECOMPUTE_COST)  # priced as full recompute
    assert plan_for(ft, "cuda", free_gib=20, steps=steps).checkpoint_lengths
    monkeypatch.undo()
    # FSDP: ranks whose micro-batches differ in length would checkpoint different layers; DDP's may
    fsdp = plan_for(FineTuner(str(PHI3_DIR)).training(distributed="fsdp"), "cuda", free_gib=8, processes=2, steps=steps)
    assert fsdp.sharded and fsdp.checkpointing and not fsdp.checkpoint_lengths
    # (on 8 GiB, NCCL's buffers leave DDP whole steps only with every checkpointed input in host memory)
    assert plan_for(ft, "cuda", free_gib=9, processes=2, steps=steps).checkpoint_lengths
    monkeypatch.setenv("PHI3TUNE_CKPT_BY_LENGTH", "0")
    before = plan_for(ft, "cuda", free_gib=12, steps=steps)
    assert before.micro_batch_tokens == 4096 and not before.checkpointing and not before.checkpoint_lengths

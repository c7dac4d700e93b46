"""optimize_for modes change speed and memory, never the loss; the bench and the memory estimate."""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_tensors, rows_of_text, run_counting_graphs, tiny_tuner

from phi3tune.batching import Collator
from phi3tune.data import IGNORE


def test_padding_free_batch_has_the_same_trained_tokens():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}]
    padded = Collator(0)(rows)
    flat = Collator(0, padding_free=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    # the shifted targets (what the loss sees) are the same multiset in both layouts
    def targets(b):
        return sorted(b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE].tolist())
    assert targets(flat) == targets(padded)
    assert int(flat["num_real_tokens"]) == int(padded["num_real_tokens"]) == 5


@pytest.mark.parametrize("mode", ["speed", "memory", "auto"])
def test_modes_give_the_same_first_step_as_balanced(tiny_model, tmp_path, mode):
    rows = rows_of_text(8, seed=5)
    ref = tiny_tuner(tiny_model, tmp_path / "b", rows, batch_size=4, grad_accum=2).run()
    got = tiny_tuner(tiny_model, tmp_path / mode, rows, batch_size=4, grad_accum=2, optimize_for=mode).run()
    assert got.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-5)
    assert got.history[0]["grad_norm"] == pytest.approx(ref.history[0]["grad_norm"], rel=1e-4)
    a, b = adapter_tensors(ref), adapter_tensors(got)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_bench_reports_throughput_and_padding(tiny_model, monkeypatch):
    from phi3tune import bench
    from phi3tune.bench import benchmark

    ft = tiny_tuner(tiny_model, "unused", rows_of_text(16), batch_size=4, grad_accum=1)
    rep = benchmark(ft, steps=3, warmup=1)
    assert rep["steps"] == 3 and rep["real_tokens_per_s"] > 0 and len(rep["losses"]) == 3
    assert 0 < rep["padding_fraction"] < 1  # padded batches of uneven rows
    assert rep["frames_compiled"] == [0, 0, 0]  # eager layers: nothing compiled during a timed step
    # the wait before training (load, data, the warm-up's first step) is part of the run, the timed steps are not
    assert sum(rep["step_s"]) < rep["total_s"] and 0 < rep["first_step_s"] <= rep["total_s"] - sum(rep["step_s"])
    # the CPU computes as the host queues: queuing is most of each step, the wait for the "device" next to nothing
    assert len(rep["queue_s"]) == len(rep["wait_s"]) == 3 and sum(rep["wait_s"]) < sum(rep["queue_s"])
    reads = iter(range(100, 200))  # control: a count that grows by one a read shows as one a step, not as the total
    monkeypatch.setattr(bench, "_frames_compiled", lambda: next(reads))
    assert benchmark(ft, steps=2, warmup=1)["frames_compiled"] == [1, 1]
    monkeypatch.undo()
    flat = benchmark(ft.training(optimize_for="speed", micro_batch_tokens=64), steps=3, warmup=1)
    assert flat["mode"] == "speed" and flat["plan"].startswith("plan: speed")
    assert 0 <= flat["padding_fraction"] < rep["padding_fraction"]  # only the pads up to a fixed length remain
    assert flat["losses"] == pytest.approx(rep["losses"], rel=1e-4)  # same steps, same math


def test_resplit_keeps_examples_and_respects_the_budget():
    from phi3tune.batching import resplit_flat

    rows = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in (3, 5, 2, 7, 4)]
    flat = [Collator(0, padding_free=True)(rows[:2]), Collator(0, padding_free=True)(rows[2:])]
    parts = resplit_flat(flat, budget=8)
    assert all(p["input_ids"].shape[1] <= 8 for p in parts)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.cat([p[key][0] for p in parts]).tolist() == torch.cat([b[key][0] for b in flat]).tolist()
    for p in parts:  # every cut is at an example start
        assert p["position_ids"][0, 0] == 0 and p["labels"][0, 0] == IGNORE
    assert len(resplit_flat(flat, budget=100)) == 1


def test_micro_batch_tokens_changes_nothing_but_the_split(tiny_model, tmp_path):
    rows = rows_of_text(8, seed=6)
    ref = tiny_tuner(tiny_model, tmp_path / "a", rows, batch_size=8, optimize_for="speed").run()
    got = tiny_tuner(tiny_model, tmp_path / "b", rows, batch_size=8, optimize_for="speed",
                     micro_batch_tokens=64).run()
    assert got.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-5)
    assert got.history[0]["grad_norm"] == pytest.approx(ref.history[0]["grad_norm"], rel=1e-4)


def test_compiled_layers_give_the_same_first_step_and_never_recompile(tiny_model, tmp_path):
    """torch.compile of the decoder layers (the speed plan's default on CUDA), checked on the CPU: the same first
    step as eager, one graph per fixed micro-batch length, all built before step 1 (a graph built in eval mode, or a
    second graph for the first layer's grad-less input, would show up as compilations during training)."""
    rows = rows_of_text(24, seed=5)
    ref = tiny_tuner(tiny_model, tmp_path / "a", rows, batch_size=4, grad_accum=2, max_steps=3).run()
    got, graphs = run_counting_graphs(tiny_tuner(tiny_model, tmp_path / "b", rows, batch_size=4, grad_accum=2,
                                                 optimize_for="speed", compile=True, micro_batch_tokens=64,
                                                 max_steps=3))
    assert got.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-5)
    assert got.history[0]["grad_norm"] == pytest.approx(ref.history[0]["grad_norm"], rel=1e-4)
    assert got.plan is not None and 1 <= len(got.plan.token_buckets) <= 4
    assert graphs[0] == graphs[-1], graphs  # nothing compiled after the first step
    from phi3tune.compiled_layers import warm_up_positions

    # one per length, and one more per length a single example can fill (+ the loss's own small graphs)
    assert graphs[0] <= len(warm_up_positions(got.plan.token_buckets, got.plan.position_cap)) + 2


def test_bench_leaves_the_callers_finetuner_alone(tiny_model):
    from phi3tune.bench import benchmark

    ft = tiny_tuner(tiny_model, "unused", rows_of_text(8), batch_size=4)
    before = ft.to_config()
    benchmark(ft, steps=1, warmup=1)
    assert ft.to_config() == before

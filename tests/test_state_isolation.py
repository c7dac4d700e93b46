"""A run leaves the process as it found it (notebooks, pipelines, hyper-parameter sweeps run many in one process):
accelerate's singletons, the global RNGs, environment, torch settings, logging, signal handlers, the caller's
objects. Each test fails without phi3tune/_isolation.py (or the fix it names)."""

from __future__ import annotations

import copy
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch
from helpers import rows_of_text, tiny_tuner

from phi3tune import DataSpec, FineTuner


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Each test starts and ends with no accelerate state (other test files' runs may have left some before
    the fix; this file checks what a run leaves)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_second_run_with_another_precision(tiny_model, tmp_path):
    rows = rows_of_text(4)
    first = tiny_tuner(tiny_model, tmp_path / "a", rows, precision="fp32").run()
    second = tiny_tuner(tiny_model, tmp_path / "b", rows, precision="bf16").run()  # raised in accelerate before
    assert first.metrics["steps"] == second.metrics["steps"] == 1
    from accelerate import Accelerator

    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"  # the caller's own, after runs


def test_callers_accelerator_survives_a_run_with_another_precision(tiny_model, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mine = Accelerator(mixed_precision="bf16", cpu=True)
    res = tiny_tuner(tiny_model, tmp_path / "a", rows_of_text(4), precision="fp32").run()
    assert res.metrics["steps"] == 1
    assert mine.mixed_precision == "bf16" and AcceleratorState().mixed_precision == "bf16"
    assert Accelerator(mixed_precision="bf16", cpu=True).state.mixed_precision == "bf16"


def test_accelerate_state_is_released_after_a_failed_run(tiny_model, tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    def boom(event):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        tiny_tuner(tiny_model, tmp_path / "a", rows_of_text(4)).run(callbacks=[boom])
    assert AcceleratorState._shared_state == {} and PartialState._shared_state == {}


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_run_leaves_the_global_rngs_as_found(tiny_model, tmp_path):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = _draws()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    for i, seed in enumerate((7, 7)):  # the run seeds every RNG with training.seed inside
        tiny_tuner(tiny_model, tmp_path / f"r{i}", rows_of_text(4), seed=seed).run()
    assert _draws() == expected


def test_run_leaves_env_torch_logging_signals_and_inputs_as_found(tiny_model, tmp_path, monkeypatch):
    import datasets
    import transformers

    monkeypatch.chdir(tmp_path)
    rows = rows_of_text(4)
    rows_before = copy.deepcopy(rows)
    spec = DataSpec(source=rows, max_seq_length=64)
    spec_before = spec.model_dump()
    loggers = ("transformers", "datasets", "accelerate", "peft", "bitsandbytes", "phi3tune", "")
    state = lambda: (  # noqa: E731
        dict(os.environ), torch.get_num_threads(), torch.get_default_dtype(), torch.get_float32_matmul_precision(),
        {n: (logging.getLogger(n).level, len(logging.getLogger(n).handlers)) for n in loggers},
        transformers.logging.get_verbosity(), datasets.logging.get_verbosity(),
        transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
        signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), os.getcwd())
    before = state()
    ft = (FineTuner(tiny_model).adapter(r=8, dropout=0.0).data(spec)
          .training(output_dir=str(tmp_path / "o"), max_steps=1, batch_size=2, grad_accum=1, save_strategy="no",
                    optimizer="adamw_torch", progress_bar=False))
    ft.run()
    assert state() == before
    assert rows == rows_before and spec.model_dump() == spec_before and spec.source is rows
    with pytest.raises(RuntimeError):  # a run that fails midway too
        ft.training(output_dir=str(tmp_path / "o2")).run(callbacks=[lambda e: (_ for _ in ()).throw(RuntimeError())])
    assert state() == before


def test_what_a_run_sets_is_put_back(monkeypatch):
    """Negative control for the checks above: what is changed inside the block is put back after it."""
    from phi3tune import _isolation

    monkeypatch.delenv("PHI3TUNE_PROBE", raising=False)
    threads, draw = torch.get_num_threads(), random.getstate()
    with _isolation.process_as_found():
        os.environ["PHI3TUNE_PROBE"] = "1"
        torch.set_num_threads(threads + 1)
        random.seed(0)
    assert "PHI3TUNE_PROBE" not in os.environ
    assert torch.get_num_threads() == threads and random.getstate() == draw


def test_the_steps_run_with_the_heap_frozen_and_it_is_thawed_after(tiny_model, tmp_path):
    """The objects alive before the first step (model, compiled graphs) are out of the collector's full
    collections while the steps run (a full collection of them stopped a step for ~1 s on GPUs), and the
    process's collector is as it was after the run; a caller's own frozen objects are left frozen."""
    import gc

    seen: list[int] = []
    tiny_tuner(tiny_model, tmp_path / "a", rows_of_text(4)).run(
        callbacks=[lambda e: seen.append(gc.get_freeze_count())])
    assert seen and min(seen) > 10_000  # every step saw the setup's objects frozen
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's
    try:
        mine = gc.get_freeze_count()
        tiny_tuner(tiny_model, tmp_path / "b", rows_of_text(4)).run()
        assert gc.get_freeze_count() > 0.9 * mine  # not thawed by the run (a few frozen objects are freed)
    finally:
        gc.unfreeze()

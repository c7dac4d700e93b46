"""Checkpoints and resume: a resumed run is bit-identical (CPU, fp32) to an uninterrupted one.

The reference run saves a checkpoint after every step. "Killed after checkpoint N" is reproduced by copying
its output_dir and deleting what a kill right after checkpoint N would not have written (later checkpoints,
the final adapter), leaving behind what a kill does leave (metrics.jsonl lines past N, a half-written hidden
temp dir). A real SIGKILL of a real subprocess is tested too (test_sigkill_mid_run_then_resume).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TESTS, assert_same_run, kill_after, resume_tuner

from phi3tune import CheckpointError, OutputDirError
from phi3tune import checkpoints as ckpt
from phi3tune.files import MANIFEST_NAME


def test_reference_run_layout(reference):
    """Every checkpoint holds adapter, optimizer, scheduler, RNG and data position; all are complete."""
    out = reference.output_dir
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{i}" for i in range(1, 9)]
    state, tensors = ckpt.load_checkpoint(out / "checkpoint-2")
    assert (state["step"], state["epoch"], state["micro_in_epoch"]) == (2, 0, 4)
    assert {"optimizer", "scheduler", "rng"} <= tensors.keys()
    assert set(tensors["rng"]) >= {"python", "numpy", "torch"}
    assert tensors["optimizer"]["state"], "optimizer moments are saved"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert state["log_window"]["tokens"] > 0  # steps 1-2 are not logged yet (logging_steps=3)
    assert ckpt.load_checkpoint(out / "checkpoint-3")[0]["micro_in_epoch"] == 5  # the epoch's last step
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("n", [2, 3, 5], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_resume_after_kill_is_bit_identical(reference, tiny_model, tmp_path, n):
    out = kill_after(reference.output_dir, tmp_path / "run", n)
    (out / f"checkpoint-{n + 1}").mkdir()  # a torn checkpoint without trainer_state.json: never resumed
    res = resume_tuner(tiny_model, out).run(resume=True)
    assert_same_run(res, reference)
    kept = [h for h in reference.history if h["step"] <= n]  # logged before the checkpoint: kept as it was
    assert res.history[:len(kept)] == kept
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "leftover temp dirs are cleaned up"
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{i}" for i in range(1, 9)]


def test_resume_from_epoch_strategy_checkpoint(tiny_model, tmp_path):
    ref = resume_tuner(tiny_model, tmp_path / "ref", save_strategy="epoch").run()
    assert [p.name for p in ckpt.list_checkpoints(ref.output_dir)] == ["checkpoint-3", "checkpoint-6"]
    state, _ = ckpt.load_checkpoint(ref.output_dir / "checkpoint-3")
    assert (state["epoch"], state["micro_in_epoch"]) == (1, 0)
    out = kill_after(ref.output_dir, tmp_path / "run", 3)
    assert_same_run(resume_tuner(tiny_model, out, save_strategy="epoch").run(resume=True), ref)


def test_resume_with_token_budget_micro_batches(tiny_model, tmp_path):
    """speed mode re-cuts each step into micro-batches of a token budget; resume still skips loader batches."""
    kw = dict(optimize_for="speed", micro_batch_tokens=48, batch_size=3)
    ref = resume_tuner(tiny_model, tmp_path / "ref", **kw).run()
    assert ckpt.load_checkpoint(ref.output_dir / "checkpoint-1")[0]["micro_in_epoch"] == 2  # of 3 loader batches
    out = kill_after(ref.output_dir, tmp_path / "run", 1)
    assert_same_run(resume_tuner(tiny_model, out, **kw).run(resume=True), ref)


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_resume_from_a_named_checkpoint(reference, tiny_model, tmp_path, how):
    out = tmp_path / "run"
    shutil.copytree(reference.output_dir, out)  # a finished run: checkpoint-N must be named to go back
    where = "checkpoint-5" if how == "relative" else str(out / "checkpoint-2")
    res = resume_tuner(tiny_model, out).run(resume=where)
    assert_same_run(res, reference)


def test_resume_from_a_missing_checkpoint_lists_the_complete_ones(reference, tiny_model, tmp_path):
    out = kill_after(reference.output_dir, tmp_path / "run", 2)
    with pytest.raises(CheckpointError) as err:
        resume_tuner(tiny_model, out).run(resume="checkpoint-7")
    assert "checkpoint-7" in str(err.value) and "['checkpoint-1', 'checkpoint-2']" in str(err.value)
    assert "resume=True" in str(err.value)


def test_corrupt_checkpoint_is_named(reference, tmp_path):
    out = kill_after(reference.output_dir, tmp_path / "run", 2)
    (out / "checkpoint-2" / ckpt.TENSORS_NAME).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"checkpoint-2.*unreadable.*resume='checkpoint-N'"):
        ckpt.load_checkpoint(out / "checkpoint-2")


def test_sigkill_mid_run_then_resume(reference, tiny_model, tmp_path):
    """A real process, killed with SIGKILL while it trains; resuming gives the uninterrupted run's result."""
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(TESTS)!r}]
        from helpers import resume_tuner
        slow = lambda event: time.sleep(0.25)  # so that the kill lands mid-run
        resume_tuner({str(tiny_model)!r}, {str(out)!r}).run(callbacks=[slow])
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(out):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / ckpt.FINAL_DIR).exists(), "the kill landed after the run had finished"
    left = ckpt.list_checkpoints(out)
    assert left and len(left) < 8
    for p in left:  # every checkpoint that exists is complete and loadable
        ckpt.load_checkpoint(p)
    (out / f".checkpoint-{len(left) + 1}.killed00").mkdir(exist_ok=True)
    res = resume_tuner(tiny_model, out).run(resume=True)
    assert_same_run(res, reference)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------- checkpoints on disk
def test_save_total_limit_keeps_the_newest(tiny_model, tmp_path):
    res = resume_tuner(tiny_model, tmp_path / "o", max_steps=4, save_total_limit=2, eval_steps=None).run()
    assert [p.name for p in ckpt.list_checkpoints(res.output_dir)] == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in res.output_dir.iterdir() if p.name.startswith((".", "checkpoint-1", "checkpoint-2"))]


class _Model:
    """Stands in for a PeftModel: writes its file, or fails half-way when asked to."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail

    def save_pretrained(self, path: Path, **_: Any) -> None:
        (Path(path) / "adapter_model.safetensors").write_bytes(b"weights")
        if self.fail is not None:
            raise self.fail


@pytest.mark.parametrize("fail", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_save_leaves_no_trace_and_keeps_the_previous(tmp_path, fail):
    ckpt.save_checkpoint(tmp_path, 1, _Model(), None, {"step": 1}, {"x": torch.ones(2)})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(type(fail)):
        ckpt.save_checkpoint(tmp_path, 2, _Model(fail), None, {"step": 2}, {"x": torch.ones(2)})
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-1")[0] == {"step": 1}


def test_resaving_a_step_replaces_it_whole(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _Model(), None, {"step": 1, "v": "old"}, {})
    ckpt.save_checkpoint(tmp_path, 1, _Model(), None, {"step": 1, "v": "new"}, {})
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-1")[0]["v"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", MANIFEST_NAME]


# ------------------------------------------------------------------------------------------- output protection
def _no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise AssertionError("model weights were loaded before the check")

    monkeypatch.setattr("phi3tune.model.load_base_model", fail)


def test_resume_with_another_configuration_is_refused(reference, tiny_model, tmp_path, monkeypatch):
    out = kill_after(reference.output_dir, tmp_path / "run", 2)
    before = sorted(p.name for p in out.iterdir())
    _no_weights(monkeypatch)
    with pytest.raises(OutputDirError, match="different configuration") as err:
        resume_tuner(tiny_model, out).adapter(r=4).run(resume=True)
    assert str(out) in str(err.value) and "overwrite=True" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched, not even the temp dir


def test_bookkeeping_fields_may_change_on_resume(reference, tiny_model, tmp_path):
    """max_steps, logging, saving and the output_dir itself are not part of a run's identity: train on."""
    out = tmp_path / "run"
    shutil.copytree(reference.output_dir, out)
    res = resume_tuner(tiny_model, out, max_steps=9, logging_steps=1, save_strategy="no").run(resume=True)
    assert res.metrics["steps"] == 9 and res.history[-1]["step"] == 9


def test_resume_on_a_finished_run_without_checkpoints_is_refused(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    resume_tuner(tiny_model, out, max_steps=1, save_strategy="no", eval_steps=None).run()
    adapter = (out / ckpt.FINAL_DIR / "adapter_model.safetensors").read_bytes()
    _no_weights(monkeypatch)
    with pytest.raises(OutputDirError, match="finished run with no checkpoint") as err:
        resume_tuner(tiny_model, out, max_steps=1, save_strategy="no", eval_steps=None).run(resume=True)
    assert "overwrite=True" in str(err.value)
    assert (out / ckpt.FINAL_DIR / "adapter_model.safetensors").read_bytes() == adapter


def test_resume_on_a_finished_run_repeats_nothing(reference, tiny_model, tmp_path):
    """The newest checkpoint is the last step: nothing is trained again and the adapter is unchanged."""
    out = tmp_path / "run"
    shutil.copytree(reference.output_dir, out)
    res = resume_tuner(tiny_model, out).run(resume=True)
    assert_same_run(res, reference)
    assert res.metrics["tokens_per_s"] is None  # no step ran


def test_resume_without_any_checkpoint_starts_over_cleanly(reference, tiny_model, tmp_path):
    """Killed before its first checkpoint: resume=True trains from step 0, and the dead run's log lines go."""
    out = kill_after(reference.output_dir, tmp_path / "run", 0)
    assert (out / "metrics.jsonl").read_text()  # lines the killed run logged
    assert_same_run(resume_tuner(tiny_model, out).run(resume=True), reference)


def test_resume_true_on_an_empty_dir_trains_from_scratch(tiny_model, tmp_path):
    res = resume_tuner(tiny_model, tmp_path / "new", max_steps=1, save_strategy="no", eval_steps=None)
    assert res.run(resume=True).metrics["steps"] == 1


def test_overwrite_discards_checkpoints_of_another_configuration(reference, tiny_model, tmp_path):
    """overwrite (without resume) starts over: the old run's checkpoints go, nothing of it is left to resume."""
    out = kill_after(reference.output_dir, tmp_path / "run", 2)
    res = resume_tuner(tiny_model, out, max_steps=1, save_strategy="no", eval_steps=None).adapter(r=4)
    res.run(overwrite=True)
    assert not ckpt.list_checkpoints(out) and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / ckpt.FINAL_DIR / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("how", ["argument", "spec"])
def test_resume_and_overwrite_together_are_refused(reference, tiny_model, tmp_path, monkeypatch, how):
    """A request to resume never deletes a checkpoint: resume + overwrite is refused before anything loads."""
    out = kill_after(reference.output_dir, tmp_path / "run", 2)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _no_weights(monkeypatch)
    ft = resume_tuner(tiny_model, out, overwrite_output_dir=how == "spec")
    with pytest.raises(OutputDirError, match="resume=True together with overwrite") as err:
        ft.run(resume=True, overwrite=True if how == "argument" else None)
    assert "overwrite_output_dir" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

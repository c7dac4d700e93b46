"""Ctrl-C / SIGTERM finish the step, save a checkpoint and raise TrainingInterrupted saying how to resume;
non-finite loss or gradients stop with an error naming the step and keep the last good checkpoint."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TESTS, assert_same_run, resume_tuner

from phi3tune import TrainingError, TrainingInterrupted
from phi3tune import checkpoints as ckpt
from phi3tune.loop import StopFlag


def _signal_at(step: int, sig: signal.Signals = signal.SIGINT) -> Any:
    """A step callback that sends ``sig`` to this process after optimizer step ``step`` (Ctrl-C in a notebook)."""
    def fn(event: dict[str, Any]) -> None:
        if event["step"] == step:
            signal.raise_signal(sig)
    return fn


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(reference, tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as err:
        resume_tuner(tiny_model, out, save_strategy="no").run(callbacks=[_signal_at(4)])
    msg = str(err.value)
    assert isinstance(err.value, KeyboardInterrupt)  # plain `except KeyboardInterrupt` still works
    assert "SIGINT" in msg and "after step 4 of 8" in msg and "run(resume=True)" in msg
    assert str(out / "phi3tune_config.yaml") in msg
    assert err.value.checkpoint == str(out / "checkpoint-4")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]  # saved although save_strategy="no"
    assert not (out / ckpt.FINAL_DIR).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again
    # ... and resuming finishes exactly like the run that was never interrupted
    assert_same_run(resume_tuner(tiny_model, out, save_strategy="no").run(resume=True), reference)


def test_interrupt_on_a_save_step_saves_once(tiny_model, tmp_path, monkeypatch):
    saves: list[int] = []
    real = ckpt.save_checkpoint

    def counting(output_dir: Path, step: int, *args: Any, **kwargs: Any) -> Path:
        saves.append(step)
        return real(output_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", counting)
    with pytest.raises(TrainingInterrupted) as err:
        resume_tuner(tiny_model, tmp_path / "run", save_steps=2).run(callbacks=[_signal_at(2)])
    assert saves == [2] and err.value.checkpoint == str(tmp_path / "run" / "checkpoint-2")


def test_second_ctrl_c_aborts_at_once():
    with StopFlag() as stop:
        assert stop.signal is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored(tiny_model, tmp_path):
    """Under nohup or in a background job SIGINT is ignored: a run neither un-ignores it nor stops on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: list[Any] = []

    def ctrl_c(event: dict[str, Any]) -> None:
        seen.append(signal.getsignal(signal.SIGINT))
        signal.raise_signal(signal.SIGINT)

    res = resume_tuner(tiny_model, tmp_path / "run", max_steps=2, save_strategy="no").run(callbacks=[ctrl_c])
    assert res.metrics["steps"] == 2 and seen == [signal.SIG_IGN, signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_to_a_training_process(reference, tiny_model, tmp_path):
    """A real process gets SIGTERM (what a scheduler or `kill` sends): it saves, explains and exits non-zero."""
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(TESTS)!r}]
        from helpers import resume_tuner
        def tell(event):
            print("step", event["step"], flush=True)
            time.sleep(0.2)
        resume_tuner({str(tiny_model)!r}, {str(out)!r}, save_strategy="no").run(callbacks=[tell])
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.strip() == "step 2":
                proc.send_signal(signal.SIGTERM)
                break
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"phi3tune\.errors\.TrainingInterrupted: SIGTERM: stopped after step (\d) of 8 and saved "
                     r"(\S+)\. Resume with .*run\(resume=True\)", last)
    assert m, stderr[-2000:]
    step, path = int(m.group(1)), Path(m.group(2))
    assert step in (2, 3) and path == out / f"checkpoint-{step}"
    assert ckpt.load_checkpoint(path)[0]["step"] == step
    assert_same_run(resume_tuner(tiny_model, out, save_strategy="no").run(resume=True), reference)


# ------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("late", ["0", "1"])
def test_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, monkeypatch,
                                                                                late):
    """Read late too (late_read.py: the non-finite step is found after its update), no checkpoint is written of a
    step whose numbers were not read and finite."""
    monkeypatch.setenv("PHI3TUNE_READ_LATE", late)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        resume_tuner(tiny_model, out, learning_rate=1e30, warmup_ratio=0.0, optimizer="adamw_torch").run()
    msg = str(err.value)
    m = re.match(r"step (\d+): non-finite (loss|gradient norm)", msg)
    assert m, msg
    bad = int(m.group(1))
    good = [p.name for p in ckpt.list_checkpoints(out)]
    assert good == [f"checkpoint-{i}" for i in range(1, bad)]  # every step before the bad one, none after
    assert f"last good checkpoint: {out / f'checkpoint-{bad - 1}'}" in msg and "learning_rate" in msg
    assert not (out / ckpt.FINAL_DIR).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    # checkpoints only every 3rd step: read late, steps in between are read a step later, and the error still
    # names the first non-finite step, with no checkpoint of it or after it
    sparse = resume_tuner(tiny_model, tmp_path / "sparse", learning_rate=1e30, warmup_ratio=0.0, save_steps=3,
                          optimizer="adamw_torch")
    with pytest.raises(TrainingError, match=rf"^step {bad}: non-finite {m.group(2)}"):
        sparse.run()
    assert all(int(p.name.split("-")[1]) < bad for p in ckpt.list_checkpoints(tmp_path / "sparse"))


def test_non_finite_weights_stop_the_run_and_the_last_good_checkpoint_resumes(reference, tiny_model, tmp_path,
                                                                             monkeypatch):
    import phi3tune.model

    models: list[Any] = []
    attach = phi3tune.model.attach_adapter
    monkeypatch.setattr(phi3tune.model, "attach_adapter", lambda *a, **k: models.append(attach(*a, **k)) or models[-1])

    saved: dict[str, bytes] = {}

    def poison(event: dict[str, Any]) -> None:  # after step 3 (not saved: save_steps=2), a LoRA weight goes NaN
        if event["step"] == 3:
            saved.update((p.name, p.read_bytes()) for p in (out / "checkpoint-2").iterdir())
            with torch.no_grad():
                next(p for n, p in models[0].named_parameters() if "lora_A" in n).fill_(math.nan)

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"^step 4: non-finite loss") as err:
        resume_tuner(tiny_model, out, save_steps=2).run(callbacks=[poison])
    assert f"last good checkpoint: {out / 'checkpoint-2'}" in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()} == saved  # untouched
    monkeypatch.undo()
    res = resume_tuner(tiny_model, out, save_steps=2).run(resume=True)
    assert res.metrics["steps"] == 8
    assert_same_run(res, reference)  # the in-memory NaN is gone: training goes on from the good checkpoint


"""TrainSpec.report_to: trackers get the metrics.jsonl numbers and the config, through accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import rows_of_text, tiny_tuner

from phi3tune import ConfigError, TrainSpec, tracking


def _events(run_dir):
    """{tag: {step: value}} of every scalar in the TensorBoard event files under run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_metrics_jsonl_numbers_and_the_config(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    ft = tiny_tuner(tiny_model, out, rows_of_text(24), max_steps=4, logging_steps=2, eval_steps=2,
                    report_to="tensorboard")
    ft.data(eval_fraction=0.25)
    ft.run()
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {e["step"] for e in entries} == {0, 2, 4} and any("eval_loss" in e for e in entries)  # 0: before training
    run_dir = out / tracking.TRACKER_DIR / tracking.PROJECT
    scalars = _events(run_dir)
    expected = {(k, e["step"]): v for e in entries for k, v in e.items() if k != "step"}
    assert {(k, s) for k, steps in scalars.items() for s in steps} == set(expected)  # nothing missing or extra
    for (key, step), value in expected.items():
        assert scalars[key][step] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # float32 in the event file
    # the run's config as hyperparameters, flattened to dotted keys
    hparams = yaml.safe_load(next(run_dir.glob("*/hparams.yml")).read_text())
    assert hparams["training.learning_rate"] == 1e-3 and hparams["adapter.r"] == 8
    assert hparams["training.report_to"] == "tensorboard" and hparams["quant.bits"] == 4
    # overwrite starts the tracker files over too, so an old run's curve cannot mix with the new one
    ft.training(max_steps=2, overwrite_output_dir=True).run()
    assert set(_events(run_dir)["loss"]) == {2}


def test_no_tracker_by_default_writes_no_tracker_files(tiny_model, tmp_path):
    assert TrainSpec().report_to is None
    out = tmp_path / "run"
    tiny_tuner(tiny_model, out, rows_of_text(8)).run()
    assert not (out / tracking.TRACKER_DIR).exists() and (out / "metrics.jsonl").is_file()


def test_unknown_tracker_fails_before_anything_is_written(tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"training.report_to: unknown tracker 'tensorbord'.*tensorboard"):
        tiny_tuner(tiny_model, out, rows_of_text(8), report_to=["tensorbord"]).run()
    assert not out.exists()


def test_missing_tracker_package_names_the_extra_to_install(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", ("phi3tune_no_such_module", "wandb"))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r'training.report_to=.wandb.*pip install "phi3tune\[wandb\]"'):
        tiny_tuner(tiny_model, out, rows_of_text(8), report_to=["tensorboard", "wandb"]).run()
    assert not out.exists()


def test_report_to_names_and_flat_config():
    assert tracking.tracker_names(None) == [] and tracking.tracker_names("none") == []
    assert tracking.tracker_names("TensorBoard") == ["tensorboard"]
    assert tracking.tracker_names(["wandb", "mlflow"]) == ["wandb", "mlflow"]
    flat = tracking.flat_config({"a": {"b": 1, "c": None, "d": ["x", "y"]}, "e": True})
    assert flat == {"a.b": 1, "a.c": "null", "a.d": '["x", "y"]', "e": True}
    assert tracking.accelerator_kwargs(None, Path("o")) == {}
    assert tracking.accelerator_kwargs("wandb", Path("o")) == {"log_with": ["wandb"], "project_dir": "o/runs"}

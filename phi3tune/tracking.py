"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, trackio) through accelerate's tracker integration.

``TrainSpec.report_to`` names the trackers. The loop logs to them exactly the entries it writes to
``metrics.jsonl`` (same keys, same numbers, the entry's ``step`` as the step) and stores the run's config
(``phi3tune_config.yaml``, flattened to dotted keys) as the run's hyperparameters. Local tracker files go to
``output_dir/runs``. Names and packages are checked before any weights load: accelerate itself would silently
drop a tracker whose package is missing, and the user would find an empty dashboard after the run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import CONFIG_NAME, TRACKER_DIR

log = logging.getLogger("phi3tune")

# report_to name -> (module that must be importable, pip extra of phi3tune that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "phi3tune"  # TensorBoard sub-directory / W&B and trackio project / MLflow experiment


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """``report_to`` as a list of tracker names; None, "none" and [] mean no tracker."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n.strip().lower() for n in names if n.strip().lower() not in ("", "none")]


def check_report_to(report_to: str | list[str] | None) -> list[str]:
    """Fail before training if a tracker is unknown or its package is not installed; return the names."""
    names = tracker_names(report_to)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"training.report_to: unknown tracker {name!r}; use some of {sorted(TRACKERS)} "
                              "or None (no tracker)")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"training.report_to={name!r} but the {module!r} package is not installed; "
                              f"install it with: pip install \"phi3tune[{extra}]\" (or remove {name!r} from "
                              "training.report_to)")
    return names


def accelerator_kwargs(report_to: str | list[str] | None, output_dir: Path) -> dict[str, Any]:
    """Extra ``Accelerator(...)`` arguments: the trackers and where local ones write."""
    names = tracker_names(report_to)
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(output_dir / TRACKER_DIR)}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"training.learning_rate": 2e-4, …}; values every tracker accepts (bool/int/float/str)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:  # None, lists: a string, so TensorBoard's hparams and MLflow's params take them
            out[name] = json.dumps(value, default=str)
    return out


def start(accelerator: Any, output_dir: Path, fallback_config: dict[str, Any]) -> None:
    """Start the trackers with the run's config (the saved ``phi3tune_config.yaml`` when there is one)."""
    if not accelerator.log_with:
        return
    import yaml

    saved = output_dir / CONFIG_NAME
    config = yaml.safe_load(saved.read_text()) if saved.is_file() else fallback_config
    run_name = output_dir.resolve().name
    init_kwargs = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}
    accelerator.init_trackers(PROJECT, config=flat_config(config), init_kwargs=init_kwargs)
    if accelerator.is_main_process:
        log.info("tracking to %s", ", ".join(t.name for t in accelerator.trackers))


def log_entry(accelerator: Any, entry: dict[str, Any]) -> None:
    """One metrics.jsonl entry to every tracker, at the entry's step."""
    if not accelerator.log_with:
        return
    values = {k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}
    accelerator.log(values, step=int(entry["step"]))


def finish(accelerator: Any) -> None:
    """Close the trackers. Not ``Accelerator.end_training``: that also tears down the process group, which the
    run still needs to save the adapter."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers = []

"""Output directory protection and checkpoints that are never half-written.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so a
kill at any moment leaves either the previous checkpoints or the new one — never a torn one. Resume loads
only directories with the completion marker.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, OutputDirError

CONFIG_NAME = "phi3tune_config.yaml"
STATE_NAME = "trainer_state.json"
FINAL_DIR = "final_checkpoint"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
RUN_MARKERS = (CONFIG_NAME, "metrics.jsonl", FINAL_DIR)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CKPT.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and (
        any((output_dir / m).exists() for m in RUN_MARKERS)
        or any(_CKPT.match(p.name) for p in output_dir.iterdir())
    )


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool | str, config: dict[str, Any]) -> None:
    """Refuse to train into a directory holding another run, unless told to overwrite or resume it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"training.output_dir {str(output_dir)!r} is a file; give a directory")
    if resume:
        saved = output_dir / CONFIG_NAME
        if saved.is_file() and not overwrite:
            import yaml

            old = yaml.safe_load(saved.read_text())
            if _run_identity(old) != _run_identity(config):
                raise OutputDirError(
                    f"training.output_dir {str(output_dir)!r} holds checkpoints of a different configuration; "
                    "resume with the same specs, or use a new output_dir (or overwrite=True to discard them)"
                )
    elif holds_run(output_dir) and not overwrite:
        raise OutputDirError(
            f"training.output_dir {str(output_dir)!r} already holds a run; pass resume=True to continue it, "
            "overwrite=True (or training.overwrite_output_dir) to replace it, or choose another output_dir"
        )
    probe_dir = output_dir if output_dir.exists() else _nearest_existing(output_dir)
    if not os.access(probe_dir, os.W_OK):
        raise OutputDirError(f"training.output_dir {str(output_dir)!r} is not writable ({probe_dir} is read-only); "
                             "choose a directory you can write to")


def clear_run(output_dir: Path) -> None:
    """Remove phi3tune's artifacts (only those) for overwrite=True."""
    if not output_dir.is_dir():
        return
    for p in output_dir.iterdir():
        if p.name in RUN_MARKERS or _CKPT.match(p.name) or p.name in ("loss.png",):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What must match for checkpoints to be resumable: everything but bookkeeping fields."""
    cfg = json.loads(json.dumps(config, default=str))
    train = cfg.get("training", {})
    for key in ("max_steps", "logging_steps", "save_steps", "save_strategy", "save_total_limit", "eval_steps",
                "overwrite_output_dir", "progress_bar", "num_epochs"):
        train.pop(key, None)
    return cfg


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    numpy_state = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, model: Any, tokenizer: Any, train_state: dict[str, Any],
                    tensors: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint-<step>/ atomically (temp dir + rename), then drop all but the newest ``keep``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(tensors, tmp / "training_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(train_state, indent=1))  # written last: the completion mark
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, tensors) of a complete checkpoint."""
    if not (path / STATE_NAME).is_file() or not (path / "training_state.pt").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is missing or incomplete (no {STATE_NAME}); "
                              "resume=True picks the newest complete one")
    state = json.loads((path / STATE_NAME).read_text())
    tensors = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    return state, tensors


def find_resume_checkpoint(output_dir: Path, resume: bool | str) -> Path | None:
    if isinstance(resume, str):
        path = Path(resume).expanduser()
        if not path.is_absolute() and not path.exists():
            path = output_dir / resume
        if not (path / STATE_NAME).is_file():
            raise CheckpointError(f"resume={resume!r}: no complete checkpoint there; "
                                  f"complete ones in {str(output_dir)!r}: "
                                  f"{[p.name for p in list_checkpoints(output_dir)]}")
        return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None

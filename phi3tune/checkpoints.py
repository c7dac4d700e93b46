"""Output directory protection, checkpoints that are never half-written (``files.atomic_dir``), and RNG state.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so a
kill at any moment leaves either the previous checkpoints or the new one — never a torn one. Resume loads
only directories with the completion marker; hidden leftovers of a killed save are ignored, then removed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, OutputDirError
from .files import CONFIG_NAME as CONFIG_NAME
from .files import FINAL_DIR as FINAL_DIR
from .files import LOSS_PLOT_NAME, METRICS_NAME, TRACKER_DIR, atomic_dir, discard
from .files import STATE_NAME as STATE_NAME
from .files import TENSORS_NAME as TENSORS_NAME

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^\.(checkpoint-\d+|final|trash)\.")  # temp dirs of an unfinished save or delete
RUN_MARKERS = (CONFIG_NAME, METRICS_NAME, FINAL_DIR)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CKPT.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def holds_run(output_dir: Path) -> bool:
    """Whether output_dir holds something a run produced. The config alone is not a run: every run writes it
    before loading weights, so a run that failed (or was killed) before training anything left only that, and
    its corrected retry must not be refused."""
    return output_dir.is_dir() and (
        any((output_dir / m).exists() for m in RUN_MARKERS if m != CONFIG_NAME)
        or any(_CKPT.match(p.name) for p in output_dir.iterdir())
    )


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool | str, config: dict[str, Any]) -> None:
    """Refuse to train into a directory holding another run, unless told to overwrite or resume it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"training.output_dir {str(output_dir)!r} is a file; give a directory")
    if resume and not overwrite:
        saved = output_dir / CONFIG_NAME
        if saved.is_file() and list_checkpoints(output_dir):  # nothing to resume: any config may start over
            import yaml

            old = yaml.safe_load(saved.read_text())
            if not isinstance(old, dict) or _run_identity(old) != _run_identity(config):
                raise OutputDirError(
                    f"training.output_dir {str(output_dir)!r} holds checkpoints of a different configuration; "
                    "resume with the same specs, or use a new output_dir (or overwrite=True to discard them)"
                )
        if resume is True and (output_dir / FINAL_DIR).exists() and not list_checkpoints(output_dir):
            raise OutputDirError(
                f"training.output_dir {str(output_dir)!r} holds a finished run with no checkpoint to resume from; "
                f"its adapter is in {str(output_dir / FINAL_DIR)!r}. Pass overwrite=True to train it again, "
                "or choose another output_dir"
            )
    elif not resume and holds_run(output_dir) and not overwrite:
        raise OutputDirError(
            f"training.output_dir {str(output_dir)!r} already holds a run; pass resume=True to continue it, "
            "overwrite=True (or training.overwrite_output_dir) to replace it, or choose another output_dir"
        )
    _check_writable(output_dir)


def _check_writable(output_dir: Path) -> None:
    """Really try to write (os.access says yes to root everywhere) in the directory or its nearest ancestor."""
    probe_dir = _nearest_existing(output_dir)
    if not probe_dir.is_dir():
        raise OutputDirError(f"training.output_dir {str(output_dir)!r} cannot be created: {str(probe_dir)!r} is a "
                             "file, not a directory; choose an output_dir under a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".phi3tune-probe.", dir=probe_dir)).rmdir()
    except OSError as exc:
        raise OutputDirError(f"training.output_dir {str(output_dir)!r} is not writable ({str(probe_dir)!r}: "
                             f"{exc.strerror}); choose a directory you can write to") from exc


def clear_run(output_dir: Path) -> None:
    """Remove phi3tune's artifacts (only those) for overwrite=True."""
    if not output_dir.is_dir():
        return
    for p in output_dir.iterdir():
        if p.name in (*RUN_MARKERS, LOSS_PLOT_NAME, TRACKER_DIR) or _CKPT.match(p.name) or _PARTIAL.match(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def remove_partial(output_dir: Path) -> list[Path]:
    """Delete the hidden temp dirs that a killed save or delete left behind; return what was removed."""
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if p.is_dir() and _PARTIAL.match(p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What must match for checkpoints to be resumable: everything but bookkeeping fields (and where the
    run lives, so a copied or moved output_dir still resumes)."""
    cfg = json.loads(json.dumps(config, default=str))
    train = cfg.get("training", {})
    for key in ("output_dir", "device", "max_steps", "logging_steps", "save_steps", "save_strategy",
                "save_total_limit", "eval_steps", "overwrite_output_dir", "progress_bar", "num_epochs",
                "report_to"):
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
                    tensors: dict[str, Any], keep: int | None = None,
                    adapter_state: dict[str, torch.Tensor] | None = None,
                    write_shards: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-<step>/ atomically (temp dir + rename), then drop all but the newest ``keep``.

    FSDP: ``adapter_state`` is the adapter gathered whole; ``write_shards(tmp)`` has every rank write its shard
    into the temp dir (and waits for them) before the completion mark, so a kill leaves no checkpoint that
    looks complete without every rank's part."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    with atomic_dir(final, f"checkpoint-{step}") as tmp:
        if write_shards is not None:
            write_shards(tmp)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(tensors, tmp / TENSORS_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(train_state, indent=1))  # written last: the completion mark
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            discard(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, tensors) of a complete checkpoint."""
    if not (path / STATE_NAME).is_file() or not (path / TENSORS_NAME).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is missing or incomplete (no {STATE_NAME}); "
                              "resume=True picks the newest complete one")
    try:
        state = json.loads((path / STATE_NAME).read_text())
        tensors = torch.load(path / TENSORS_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupted file: json, pickle and zip errors of many types
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({exc.__class__.__name__}: "
                              f"{str(exc)[:200]}); resume from an older one with resume='checkpoint-N'") from exc
    return state, tensors


def find_resume_checkpoint(output_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: ``resume`` as a path (tried inside output_dir first), else the newest."""
    if isinstance(resume, str):
        given = Path(resume).expanduser()
        inside = output_dir / given
        path = inside if not given.is_absolute() and (inside / STATE_NAME).is_file() else given
        if not (path / STATE_NAME).is_file():
            raise CheckpointError(f"resume={resume!r}: no complete checkpoint there; "
                                  f"complete ones in {str(output_dir)!r}: "
                                  f"{[p.name for p in list_checkpoints(output_dir)]}; pass one of them "
                                  "or resume=True for the newest")
        return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None

"""What phi3tune reads from and writes to disk: artifact names, atomic directory writes, config files, and
whether a string is meant as a path.

Every file name phi3tune writes is defined here once, so that the loop, the checkpoints, the output-dir
protection, inference and the CLI agree on them. Directories are written into a hidden temporary directory
and renamed into place when complete (``atomic_dir``), so a kill at any moment leaves either the old copy or
the new one, never a torn one.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import RESUME, ConfigError, Hint, OutputDirError, Say, hint

# ---------------------------------------------------------------------------------------------- artifact names
CONFIG_NAME = "phi3tune_config.yaml"  # output_dir: the run's FineTuner.to_config()
PLAN_NAME = "phi3tune_plan.json"  # output_dir: the RunPlan the run executed
METRICS_NAME = "metrics.jsonl"  # output_dir: one JSON line per log / eval entry
LOSS_PLOT_NAME = "loss.png"  # output_dir: train and eval loss against step
TRACKER_DIR = "runs"  # output_dir: local experiment-tracker files (TensorBoard events, hparams.yml)
FINAL_DIR = "final_checkpoint"  # output_dir: the trained adapter
STATE_NAME = "trainer_state.json"  # checkpoint-N: the loop's position and history, written last (completion mark)
TENSORS_NAME = "training_state.pt"  # checkpoint-N: optimizer, scheduler, scaler, RNG
META_NAME = "phi3tune.json"  # adapter dir: base model, quantization, trust_remote_code
MERGE_META_NAME = "phi3tune_merge.json"  # merged model dir: where it came from
EXPORT_META_NAME = "phi3tune_export.json"  # exported adapter dir: its source and layout
MANIFEST_NAME = "phi3tune_manifest.json"  # output_dir: what phi3tune wrote there (the only things it deletes)


# ---------------------------------------------------------------------------------------------- atomic writes
def discard(path: Path) -> None:
    """Remove a file or directory without ever leaving a torn copy under its own name: rename aside, delete."""
    trash = Path(tempfile.mkdtemp(prefix=".trash.", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


_FULL_DISK_HINT = hint("; the partial copy was removed and earlier checkpoints are intact. Free some space (or set "
                       "training.save_total_limit, or move output_dir to a larger disk) and resume with {resume}",
                       resume=RESUME)


@contextmanager
def atomic_dir(final: Path, what: str, full_disk_hint: Hint | None = _FULL_DISK_HINT) -> Iterator[Path]:
    """Yield a hidden temp dir next to ``final``; when the block ends, rename it to ``final``.

    On any failure (or Ctrl-C) the temp dir is removed and an existing ``final`` is left as it was. A full disk
    becomes an OutputDirError naming training.output_dir and saying what to do (``full_disk_hint``; None: the
    OSError is raised as it is).
    """
    name = "final" if final.name == FINAL_DIR else final.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            discard(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if full_disk_hint and isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputDirError(f"training.output_dir {str(final.parent)!r}: disk full while saving {what} "
                                 f"({exc.strerror})", full_disk_hint) from exc
        raise


def write_config(config: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """A ``FineTuner.to_config()`` document as YAML (.yaml/.yml) or JSON (.json)."""
    import json

    import yaml

    path = Path(path)
    text = json.dumps(config, indent=2) if path.suffix == ".json" else yaml.safe_dump(config, sort_keys=False)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- reading
def looks_like_path(source: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Hub ids are "name" or "org/name"; anything else with a path shape (or one of ``suffixes``, e.g. a data
    file extension) is meant as a local path, so a missing one is an error, not a hub lookup."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or (bool(suffixes) and Path(source).suffix.lower() in suffixes))


_NO_CONFIG_HINT = hint("; {write}", write=Say(
    "write one with FineTuner(...).save_config(path), or start from a shipped template: "
    "FineTuner.from_config(phi3tune.templates.path('qlora_phi3'))",
    "write one with `phi3tune init PATH` (every field with its default and help; `--template qlora_phi3` copies "
    "the classic recipe), or train without a file: `phi3tune train --model MODEL --data DATA`"))


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``FineTuner.to_config()`` document from a YAML file, or a JSON one (``.json``: read as JSON, since YAML
    1.1 would read a number like ``1e-05`` as a string)."""
    import json

    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist", _NO_CONFIG_HINT)
    try:
        config = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping with model/quant/adapter/data/training keys")
    return config

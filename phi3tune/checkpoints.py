"""Output directory protection, checkpoints that are never half-written (``files.atomic_dir``), and RNG state.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so a
kill at any moment leaves either the previous checkpoints or the new one — never a torn one. Resume loads
only directories with the completion marker; hidden leftovers of a killed save are ignored, then removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import OVERWRITE, RESUME, CheckpointError, ConfigError, OutputDirError, hint, resume_from
from .files import CONFIG_NAME as CONFIG_NAME
from .files import FINAL_DIR as FINAL_DIR
from .files import LOSS_PLOT_NAME, MANIFEST_NAME, METRICS_NAME, atomic_dir, discard
from .files import STATE_NAME as STATE_NAME
from .files import TENSORS_NAME as TENSORS_NAME

_CKPT = re.compile(r"^checkpoint-(\d+)$")
# the temp dirs of an unfinished save or delete, exactly as tempfile.mkdtemp names them (files.atomic_dir, discard)
_PARTIAL = re.compile(r"^\.(checkpoint-\d+|final|trash)\.[a-z0-9_]{8}$")
RUN_MARKERS = (CONFIG_NAME, METRICS_NAME, FINAL_DIR)
_OVERWRITTEN = (METRICS_NAME, LOSS_PLOT_NAME, FINAL_DIR)  # files a run writes over (besides checkpoint-N)


# ---------------------------------------------------------------------------------------------- the manifest
def read_manifest(output_dir: Path) -> dict[str, Any]:
    """phi3tune_manifest.json: ``files`` (names in output_dir that phi3tune wrote: the only ones it deletes) and
    ``fingerprints`` (what the run trained on: resume compares them)."""
    try:
        doc = json.loads((output_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {"files": [], "fingerprints": {}}
    files = doc.get("files") if isinstance(doc, dict) else None
    # plain names only: an edited manifest can never point outside output_dir
    names = [n for n in files or [] if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n]
    prints = doc.get("fingerprints") if isinstance(doc, dict) else None
    return {"files": names, "fingerprints": prints if isinstance(prints, dict) else {}}


def _write_manifest(output_dir: Path, doc: dict[str, Any]) -> None:
    tmp = output_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps({"files": sorted(set(doc["files"])), "fingerprints": doc["fingerprints"]}, indent=1))
    os.replace(tmp, output_dir / MANIFEST_NAME)


def record(output_dir: Path, *names: str, fingerprints: dict[str, str] | None = None) -> None:
    """Add ``names`` to the manifest (before writing them: a kill in between leaves a name with no file, never a
    file of ours that we would not delete)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    doc = read_manifest(output_dir)
    doc["files"] = [*doc["files"], *names, MANIFEST_NAME]
    if fingerprints is not None:
        doc["fingerprints"] = fingerprints
    _write_manifest(output_dir, doc)


def _forget(output_dir: Path, name: str) -> None:
    doc = read_manifest(output_dir)
    doc["files"] = [n for n in doc["files"] if n != name]
    _write_manifest(output_dir, doc)


def foreign_files(output_dir: Path) -> list[str]:
    """Names a run would write over (checkpoint-N, metrics.jsonl, loss.png, final_checkpoint) that phi3tune's
    manifest does not list: another tool's, the user's, or a run of a phi3tune without manifests."""
    if not output_dir.is_dir():
        return []
    ours = set(read_manifest(output_dir)["files"])
    return sorted(p.name for p in output_dir.iterdir()
                  if (p.name in _OVERWRITTEN or _CKPT.match(p.name)) and p.name not in ours)


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
    """Refuse to train into a directory holding another run, unless told to overwrite or resume it; refuse to
    write over files phi3tune did not write, and a request to both resume and overwrite."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"training.output_dir {str(output_dir)!r} is a file; give a directory")
    if resume and overwrite:
        raise OutputDirError(
            f"resume={resume!r} together with overwrite (or training.overwrite_output_dir=true): resuming keeps "
            "the checkpoints, overwriting deletes them",
            hint(f". Pass only {{resume}} to continue the run in {str(output_dir)!r}, or only {{overwrite}} to start "
                 "it over", resume=RESUME, overwrite=OVERWRITE))
    if resume:
        saved = output_dir / CONFIG_NAME
        if saved.is_file() and list_checkpoints(output_dir):  # nothing to resume: any config may start over
            import yaml

            old = yaml.safe_load(saved.read_text())
            diff = config_difference(old if isinstance(old, dict) else {}, config)
            if diff:
                raise OutputDirError(
                    f"training.output_dir {str(output_dir)!r} holds checkpoints of a different configuration "
                    f"({diff})",
                    hint("; resume with the same specs, or use a new output_dir (or run without resume, with "
                         "{overwrite}, to discard them)", overwrite=OVERWRITE))
        if resume is True and (output_dir / FINAL_DIR).exists() and not list_checkpoints(output_dir):
            raise OutputDirError(
                f"training.output_dir {str(output_dir)!r} holds a finished run with no checkpoint to resume from; "
                f"its adapter is in {str(output_dir / FINAL_DIR)!r}",
                hint(". Pass {overwrite} to train it again, or choose another output_dir", overwrite=OVERWRITE))
    elif holds_run(output_dir) and not overwrite:
        raise OutputDirError(
            f"training.output_dir {str(output_dir)!r} already holds a run",
            hint("; pass {resume} to continue it, {overwrite} (or training.overwrite_output_dir) to replace it, "
                 "or choose another output_dir", resume=RESUME, overwrite=OVERWRITE))
    foreign = foreign_files(output_dir)
    if foreign:
        raise OutputDirError(
            f"training.output_dir {str(output_dir)!r} holds {foreign}, which phi3tune did not write (they are not "
            f"in its {MANIFEST_NAME}: another tool's, yours, or a run of a phi3tune without manifests); a run would "
            "write over them. Move them away or choose another output_dir")
    _check_writable(output_dir)


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first field (dotted name) that differs between two run identities, with both values; None if equal."""
    a, b = _flat(_run_identity(old)), _flat(_run_identity(new))
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            return f"{key}: {a.get(key, '<unset>')!r} in the checkpoints' run, {b.get(key, '<unset>')!r} now"
    return None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree} if prefix else {}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


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
    """Remove what phi3tune's manifest says it wrote (only that: never a file of the user's or another tool's),
    and the temp dirs of an interrupted save; for overwrite=True, or a resume with nothing to resume."""
    if not output_dir.is_dir():
        return
    for name in read_manifest(output_dir)["files"]:
        p = output_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    remove_partial(output_dir)


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
    for key in ("num_proc", "cache_dir"):  # how the rows are prepared, not which rows
        cfg.get("data", {}).pop(key, None)
    return cfg


# ---------------------------------------------------------------------------------------------- what a run trained on
_FINGERPRINT_FIELDS = {  # checked in this order: a new tokenizer also changes the tokens, and is the cause to name
    "tokenizer": "the tokenizer (vocabulary and special tokens) of model / the data's tokenizer",
    "chat_template": "the tokenizer's chat template (it renders every data.format but text)",
    "data": "data.source / data.eval_source: the training rows (same config, other content: was the file edited?)",
}


def fingerprints(tokenizer: Any, data: Any) -> dict[str, str]:
    """Short hashes of what a run trains on: the tokenizer, its chat template and the tokenized rows (so a data
    file edited in place under the same path is seen)."""
    from .data.fingerprint import digest

    prints = {"tokenizer": digest(sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map),
              "chat_template": digest(getattr(tokenizer, "chat_template", None) or "")}
    if getattr(data, "fingerprint", None):  # prepared by phi3tune: the cache key of its rows (data/build.py), or
        # a stream's source and options; no pass over a million rows to hash them again
        return {**prints, "data": str(data.fingerprint)}
    rows = hashlib.sha256()
    for split in (data.train, data.eval):
        for column in ("input_ids", "labels"):
            for ids in ([] if split is None else split[column]):
                rows.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        rows.update(b"#")
    return {**prints, "data": rows.hexdigest()[:16]}


def check_fingerprints(output_dir: Path, now: dict[str, str]) -> None:
    """Refuse to resume onto checkpoints made from other data, another tokenizer or chat template, naming it."""
    saved = read_manifest(output_dir)["fingerprints"]
    for key, what in _FINGERPRINT_FIELDS.items():
        if key in saved and saved[key] != now.get(key):
            raise OutputDirError(
                f"resume: {what} differ from the run whose checkpoints are in {str(output_dir)!r} "
                f"(fingerprint {saved[key]} then, {now.get(key)} now). Resume with what the run trained on, or "
                "start a new run (another output_dir, or overwrite=True without resume)")


def check_resume_step(path: Path, max_steps: int | None) -> int:
    """The step of checkpoint ``path``; a max_steps below it is refused (the run would stop before it starts)."""
    try:
        step = int(json.loads((path / STATE_NAME).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: unreadable {STATE_NAME} ({exc}); resume from an older "
                              "one with resume='checkpoint-N'") from exc
    if max_steps is not None and max_steps < step:
        raise ConfigError(f"training.max_steps={max_steps} is below the step of the checkpoint to resume "
                          f"({str(path)!r}, step {step}): nothing would be trained. Set max_steps >= {step}, or "
                          "resume an earlier checkpoint with resume='checkpoint-N'")
    return step


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
    final = output_dir / f"checkpoint-{step}"
    record(output_dir, final.name)
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
            _forget(output_dir, old.name)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, tensors) of a complete checkpoint."""
    if not (path / STATE_NAME).is_file() or not (path / TENSORS_NAME).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is missing or incomplete (no {STATE_NAME})",
                              hint("; {resume} picks the newest complete one", resume=RESUME))
    try:
        state = json.loads((path / STATE_NAME).read_text())
        tensors = torch.load(path / TENSORS_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupted file: json, pickle and zip errors of many types
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({exc.__class__.__name__}: {str(exc)[:200]})",
                              hint("; resume from an older one with {older}", older=resume_from("checkpoint-N"))
                              ) from exc
    return state, tensors


def find_resume_checkpoint(output_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: ``resume`` as a path (tried inside output_dir first), else the newest."""
    if isinstance(resume, str):
        given = Path(resume).expanduser()
        inside = output_dir / given
        path = inside if not given.is_absolute() and (inside / STATE_NAME).is_file() else given
        if not (path / STATE_NAME).is_file():
            raise CheckpointError(f"checkpoint to resume from {resume!r}: no complete checkpoint there; complete "
                                  f"ones in {str(output_dir)!r}: {[p.name for p in list_checkpoints(output_dir)]}",
                                  hint("; pass one of them or {resume} for the newest", resume=RESUME))
        return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None

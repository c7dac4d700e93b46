"""Load raw examples from wherever the user keeps them, with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataFormatError, DataSourceError
from ..files import looks_like_path

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # datasets' save_to_disk marks


def _find_bad_json(path: Path) -> str | None:
    """Locate a malformed line so the error can point at it (datasets' own message does not). JSON lines are
    read one at a time: memory stays flat in the file's size."""
    # utf-8-sig: a BOM (Windows editors) is no JSON error
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        if path.suffix.lower() == ".json" and f.read(4096).lstrip().startswith("["):  # one array: parsed whole
            f.seek(0)
            try:
                rows = json.loads(f.read())
            except json.JSONDecodeError as exc:
                return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
            bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None) \
                if isinstance(rows, list) else None
            return None if bad is None else f"element {bad}: expected a JSON object per example, not {rows[bad]!r:.40}"
        f.seek(0)
        for lineno, line in enumerate(f, start=1):  # unlike str.splitlines, a U+2028 in a string ends no line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {lineno}: {exc.msg}"
            if not isinstance(row, dict):
                return f"line {lineno}: expected a JSON object per line, got {type(row).__name__}"
    return None


def _load_file(path: Path, field: str) -> Any:
    from datasets import load_dataset

    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataSourceError(
            f"{field}: {str(path)!r} has extension {path.suffix!r}; give one of {sorted(_FILE_BUILDERS)} files "
            "or a directory of them (plain text: one JSON object per line in a .jsonl, e.g. {\"text\": ...})"
        )
    if path.stat().st_size == 0:
        raise DataFormatError(f"{field}: file {str(path)!r} is empty; give a file with at least one example")
    if builder == "json":
        bad = _find_bad_json(path)
        if bad:
            raise DataFormatError(f"{field}: {str(path)!r} is not valid JSON at {bad}; fix or remove that line")
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataFormatError(f"{field}: could not read {str(path)!r}: {_reason(exc)}; check that it is a valid "
                              f"{path.suffix} file") from exc


def _load_dir(path: Path, split: str, field: str) -> Any:
    from datasets import load_dataset, load_from_disk

    if any((path / name).exists() for name in SAVED_DATASET_FILES):
        ds = load_from_disk(str(path))
        return ds[split] if hasattr(ds, "keys") else ds
    files = [p for p in sorted(path.iterdir()) if p.suffix.lower() in _FILE_BUILDERS]
    if not files:
        raise DataSourceError(
            f"{field}: directory {str(path)!r} holds no {sorted(_FILE_BUILDERS)} files and no saved dataset; "
            "give a data file, or a directory that holds some"
        )
    for f in files:
        if f.suffix.lower() in (".json", ".jsonl") and (bad := _find_bad_json(f)):
            raise DataFormatError(f"{field}: {str(f)!r} is not valid JSON at {bad}; fix or remove that line")
    try:
        ds = load_dataset(str(path))
    except Exception as exc:
        raise DataFormatError(f"{field}: could not read directory {str(path)!r}: {str(exc)[:300]}") from exc
    if split not in ds:
        raise DataSourceError(f"{field}: directory {str(path)!r} has splits {list(ds)}, not {split!r}")
    return ds[split]


def load_source(source: Any, split: str = "train", field: str = "data.source") -> Any:
    """Return a ``datasets.Dataset`` for any supported source kind."""
    from datasets import Dataset, DatasetDict, load_dataset

    if isinstance(source, Dataset):
        ds = source
    elif isinstance(source, DatasetDict):
        if split not in source:
            raise DataSourceError(f"{field}: the DatasetDict has splits {list(source)}, not {split!r}")
        ds = source[split]
    elif isinstance(source, list):
        try:
            ds = _from_rows(source, field) if source else None
        except DataFormatError:
            raise
        except Exception as exc:  # pyarrow: one column holding values of several types
            raise DataFormatError(f"{field}: the list of rows does not make a table ({_reason(exc)}); give each "
                                  "column one type in every row (e.g. text everywhere, not text in one row and a "
                                  "number in another)") from exc
    elif str(source).startswith("in-memory:"):
        raise DataSourceError(
            f"{field}: {source!r} is the record of rows a run was given in memory (the config keeps only their "
            "fingerprint); give the rows again with .data(source=...), or set a file or hub name")
    else:
        path = Path(str(source)).expanduser()
        if path.is_file():
            ds = _load_file(path, field)
        elif path.is_dir():
            ds = _load_dir(path, split, field)
        elif looks_like_path(str(source), tuple(_FILE_BUILDERS)):
            raise DataSourceError(
                f"{field}: {str(source)!r} does not exist; give an existing .json/.jsonl/.csv/.parquet file, "
                "a directory, a hub dataset name, a datasets.Dataset or a list of dicts"
            )
        else:
            try:
                ds = load_dataset(str(source), split=split)
            except Exception as exc:
                raise DataSourceError(
                    f"{field}: could not load hub dataset {str(source)!r} split {split!r} "
                    f"({exc.__class__.__name__}: {str(exc)[:200]}). Offline, give a local file instead"
                ) from exc
    if ds is None or len(ds) == 0:
        raise DataFormatError(f"{field}: the dataset {_describe(source)} has no rows; give at least one example")
    return ds


# the columns that decide a row's format (formats.detect_format): rows keyed by different ones are different formats
_FORMAT_KEYS = ({"messages"}, {"conversations"}, {"instruction", "output"}, {"prompt", "completion"})


def _row_format(keys: set[str]) -> str:
    found = [k for k in _FORMAT_KEYS if k <= keys]
    return "/".join(sorted(found[0])) if len(found) == 1 else "other"


def _from_rows(rows: list[Any], field: str) -> Any:
    """A Dataset with the columns of *every* row (Dataset.from_list takes the first row's only, so a later row's
    optional field, alpaca's ``input``, would be lost); a missing field is None. Rows of different formats are
    refused, naming the row."""
    from datasets import Dataset

    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataFormatError(f"{field}: row {bad} is a {type(rows[bad]).__name__}, not a dict; give a list of "
                              "dicts such as {'text': ...} or {'instruction': ..., 'output': ...}")
    first = _row_format(set(rows[0]))
    for i, row in enumerate(rows):
        kind = _row_format(set(row))
        if kind != first:
            raise DataFormatError(
                f"{field}: row {i} has the keys {sorted(row)} ({kind} format) but row 0 has {sorted(rows[0])} "
                f"({first}); give every row of one source the same format")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return Dataset.from_dict({c: [r.get(c) for r in rows] for c in columns})


def _reason(exc: BaseException) -> str:
    """The message of the root cause: datasets wraps the useful one ("... while generating the dataset")."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{exc.__class__.__name__}: {str(exc)[:300]}"


def _describe(source: Any) -> str:
    return repr(source) if isinstance(source, (str, Path)) else f"({type(source).__name__})"


def load_stream(source: Any, split: str = "train", field: str = "data.source") -> Any:
    """A ``datasets.IterableDataset`` over any supported source kind, read as it is iterated (never whole)."""
    from datasets import Dataset, DatasetDict, load_dataset

    if isinstance(source, (list, Dataset, DatasetDict)):
        return load_source(source, split, field).to_iterable_dataset()
    if str(source).startswith("in-memory:"):
        load_source(source, split, field)  # raises: the rows are not in the config
    path = Path(str(source)).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None or path.stat().st_size == 0:
            _load_file(path, field)  # raises the same error a map-style run would
        return load_dataset(builder, data_files=str(path), split="train", streaming=True)
    if path.is_dir():
        if any((path / name).exists() for name in SAVED_DATASET_FILES):
            return _load_dir(path, split, field).to_iterable_dataset()  # a save_to_disk dataset: one split of it
        return load_dataset(str(path), split=split, streaming=True)
    if looks_like_path(str(source), tuple(_FILE_BUILDERS)):
        load_source(source, split, field)  # raises: the path does not exist
    try:
        return load_dataset(str(source), split=split, streaming=True)
    except Exception as exc:
        raise DataSourceError(f"{field}: could not stream hub dataset {str(source)!r} split {split!r} "
                              f"({exc.__class__.__name__}: {str(exc)[:200]}). Offline, give a local file instead"
                              ) from exc

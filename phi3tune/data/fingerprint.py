"""Fingerprints: short, stable names for "the same data" and "the same tokens".

One place for them, so the prepared-data cache, the written config and checkpoints agree on what counts as the
same source. A fingerprint never holds the data itself: an in-memory source of a million rows is recorded as a
hash and a row count, never copied into ``phi3tune_config.yaml`` or a tracker's hyperparameters.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import DataSourceError

# Bump when the prepared rows change for the same inputs (a new column, a masking fix): old cache entries are
# then never read again.
LAYOUT_VERSION = "phi3tune-data-2"
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


def digest(*parts: Any) -> str:
    """A 16-hex-digit hash of JSON-able parts (str() for anything else)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


MAX_DIR_FILES = 10_000  # a data directory with more files than this is refused (its fingerprint would walk them all)


def file_fingerprint(path: Path, field: str = "data.source") -> str:
    """A local file or directory by what `make` looks at: each data file's resolved path, size and mtime.
    No file is read, so a cached run decides in milliseconds that it may reuse its tokens. A directory's walk skips
    what it cannot read (e.g. /proc/1/cwd) and stops past ``MAX_DIR_FILES`` files with an error naming ``field``:
    "/" as a source (found by tests/test_errors_property.py) would otherwise be walked for minutes."""
    path = path.expanduser().resolve()
    if path.is_file():
        return digest("file", [(str(path), path.stat().st_size, path.stat().st_mtime_ns)])
    seen: list[tuple[str, int, int]] = []
    for root, _, names in os.walk(path):  # unreadable directories are skipped
        for name in names:
            if name.startswith("."):
                continue
            try:
                st = (Path(root) / name).stat()
            except OSError:  # unreadable, or a broken link: not data the loader could read either
                continue
            if stat.S_ISREG(st.st_mode):
                seen.append((str(Path(root) / name), st.st_size, st.st_mtime_ns))
            if len(seen) > MAX_DIR_FILES:
                raise DataSourceError(f"{field}: directory {str(path)!r} holds more than {MAX_DIR_FILES:,} files; "
                                      "give a data file, or a directory of data files")
    return digest("file", sorted(seen))


def dataset_fingerprint(ds: Any) -> str:
    """A ``datasets`` Dataset: its own fingerprint, which datasets derives from the table's content (in memory)
    or from its files and the transforms applied to them; stable across processes and runs."""
    return digest("dataset", getattr(ds, "_fingerprint", None), len(ds) if hasattr(ds, "__len__") else None)


def source_fingerprint(source: Any, split: str, field: str = "data.source") -> str | None:
    """The fingerprint of a source before it is loaded, where that is cheap: a local file or directory, a
    Dataset or DatasetDict, a list of dicts. None for a hub name (known only once loaded: ``dataset_fingerprint``)."""
    if isinstance(source, list):
        h = hashlib.blake2b(digest_size=16)
        for row in source:  # row by row: never a second copy of the whole list as one string
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
            h.update(b"\n")
        return digest("rows", h.hexdigest(), len(source))
    if hasattr(source, "keys") and type(source).__name__ == "DatasetDict":
        return dataset_fingerprint(source[split]) if split in source else None
    if type(source).__name__ == "Dataset":
        return dataset_fingerprint(source)
    path = Path(str(source)).expanduser()
    if path.exists():
        return digest(file_fingerprint(path, field), split)
    return None


def describe_in_memory(source: Any) -> str:
    """What the written config records for an in-memory source: its kind, row count and fingerprint."""
    if type(source).__name__ == "DatasetDict":
        rows = sum(len(v) for v in source.values())
        fp = digest([dataset_fingerprint(v) for v in source.values()])
        return f"{type(source).__name__}({rows} rows, fingerprint {fp})"
    return f"{type(source).__name__}({len(source)} rows, fingerprint {source_fingerprint(source, 'train')})"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Everything about a tokenizer that changes the tokens: its full definition (vocab, merges, normalizer,
    post-processor), special tokens and chat template; not where it was loaded from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else _pickled(tokenizer)
    return digest("tokenizer", type(tokenizer).__name__, hashlib.blake2b(definition.encode()).hexdigest(),
                  getattr(tokenizer, "chat_template", None), str(getattr(tokenizer, "special_tokens_map", {})),
                  getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None),
                  getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))


def function_fingerprint(fn: Any) -> str:
    """A user format function: its qualified name and source code, so editing it prepares the data again."""
    try:
        code = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(getattr(fn, "__code__", None), "co_code", b"").hex()
    return digest(getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), code)


def _pickled(obj: Any) -> str:
    from datasets.fingerprint import Hasher

    return str(Hasher.hash(obj))

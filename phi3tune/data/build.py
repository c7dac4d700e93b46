"""Tokenize once, with every core, into the datasets cache; every later run memory-maps the result.

A cache entry is a directory named by the hash of everything that changes the tokens (``entry_key``). It is built
under a temporary name and renamed into place when complete, so a killed run never leaves an entry that a later
run would trust, and two processes that build the same entry at once both end up reading one complete copy.
Memory stays flat in the dataset's size: the token columns go from the tokenizer to Arrow files in batches; only
per-example lengths (one int each) are ever held whole, as NumPy arrays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError
from .fingerprint import LAYOUT_VERSION, digest
from .formats import IGNORE
from .packing import best_fit_rows
from .prepared import DataSummary
from .tokenize import token_features

log = logging.getLogger("phi3tune")

MAX_PROCS = 8  # more processes than this rarely pay: the rows are read and written by one parent
MIN_ROWS_PER_PROC = 2000  # below this, starting a process costs more than it saves
PACK_BATCH_ROWS = 2048  # packed rows built and written per Arrow record batch
_SUMMARY = "summary.json"
ROW_COLUMNS = ("input_ids", "labels", "position_ids", "length")  # what the loop's rows carry


def default_num_proc(n_rows: int, asked: int | None) -> int:
    """``asked`` if given, else the cores this process may use (capped), fewer for small datasets."""
    if asked is not None:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_PROCS, n_rows // MIN_ROWS_PER_PROC))


def cache_root(cache_dir: str | None) -> Path:
    """``data.cache_dir``, else ``phi3tune`` under the datasets cache (``HF_DATASETS_CACHE``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "phi3tune"


def entry_key(source_fp: str, part: Any, tokens: dict[str, Any], tokenizer_fp: str) -> str:
    """The cache entry's name: source, which part of it (all, or a seeded train/eval split), how rows become
    tokens (format, template options, max_seq_length, train_on, packing) and the tokenizer."""
    return digest(LAYOUT_VERSION, source_fp, part, tokens, tokenizer_fp)


def load_entry(entry: Path) -> tuple[Any, DataSummary] | None:
    """A complete cache entry, memory-mapped; None if there is none."""
    from datasets import Dataset, concatenate_datasets

    meta = entry / _SUMMARY
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    parts = [Dataset.from_file(str(entry / name)) for name in info["files"]]
    rows = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    rows = rows.select_columns([c for c in ROW_COLUMNS if c in rows.column_names])
    return rows, DataSummary(**info["summary"])


def build_entry(raw: Any, entry: Path, encoder: Any, fmt: str, train_on: str, max_len: int, packing: bool,
                num_proc: int) -> tuple[Any, DataSummary]:
    """Tokenize ``raw`` (``num_proc`` processes) and pack it into ``entry``; the rows, memory-mapped, and their
    summary."""
    tmp = entry.with_name(f"{entry.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        tok = raw.map(encoder, batched=True, remove_columns=raw.column_names, features=token_features(),
                      num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(tmp / "tokens.arrow"),
                      load_from_cache_file=False, new_fingerprint=entry.name, desc="tokenizing")
        columns = tok.with_format("arrow", columns=["length", "trained", "truncated"])[:]  # one Arrow slice
        lengths = columns.column("length").to_numpy().astype(np.int64)
        trained = int(columns.column("trained").to_numpy().astype(np.int64).sum())
        if trained == 0:
            raise DataFormatError(
                f"data: no example has a trained token after masking (format={fmt}, train_on={train_on}); "
                "check the assistant/output columns or raise data.max_seq_length")
        token_files = [Path(f["filename"]).name for f in tok.cache_files]
        if packing:
            n_rows = write_packed(tok, lengths, max_len, tmp / "packed.arrow")
            files = ["packed.arrow"]
        else:
            n_rows, files = len(tok), token_files
        summary = DataSummary(fmt, train_on, len(tok), n_rows, int(lengths.sum()),
                              int(columns.column("truncated").to_numpy(zero_copy_only=False).sum()), trained)
        del tok, columns  # close the memory maps before the token files go
        if packing:
            for name in token_files:
                (tmp / name).unlink()
        (tmp / _SUMMARY).write_text(json.dumps({"summary": summary.to_dict(), "files": files}))
        log.info("data: tokenized %d examples with %d process(es) in %.1f s into %s", summary.examples, num_proc,
                 time.perf_counter() - started, entry)
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first: read that one
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = load_entry(entry)
    assert loaded is not None
    return loaded


def write_packed(tok: Any, lengths: np.ndarray, capacity: int, path: Path) -> int:
    """Best-fit pack the tokenized examples into rows written batch by batch to an Arrow file: per row the
    examples' tokens concatenated (in example order), position_ids restarting at 0 at each example and each
    example's first label IGNORE (as ``pack_examples``). Returns the number of rows."""
    import pyarrow as pa

    row_of = best_fit_rows(lengths, capacity)
    n_rows = int(row_of.max()) + 1
    members = np.argsort(row_of, kind="stable")  # grouped by row, example order inside a row
    per_row = np.bincount(row_of, minlength=n_rows)
    first = np.concatenate([[0], np.cumsum(per_row)])
    table = (tok if tok._indices is None else tok.flatten_indices()).data  # datasets' Table: fast_gather
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("position_ids", pa.list_(pa.int32())), ("length", pa.int32())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for r0 in range(0, n_rows, PACK_BATCH_ROWS):
            r1 = min(n_rows, r0 + PACK_BATCH_ROWS)
            writer.write_batch(_packed_batch(table, members[first[r0]:first[r1]], row_of, r0, r1, schema))
    return n_rows


def _packed_batch(table: Any, take: np.ndarray, row_of: np.ndarray, r0: int, r1: int, schema: Any) -> Any:
    import pyarrow as pa

    # fast_gather slices the record batches that hold the rows: pyarrow's take() would first concatenate each
    # whole column (the whole dataset's tokens in memory, once per batch)
    part = table.fast_gather(take).select(["input_ids", "labels", "length"])
    ex_len = part.column("length").to_numpy().astype(np.int64)
    ids = part.column("input_ids").combine_chunks().flatten().to_numpy()
    labels = part.column("labels").combine_chunks().flatten().to_numpy().copy()
    ex_start = np.concatenate([[0], np.cumsum(ex_len)[:-1]])
    labels[ex_start[ex_len > 0]] = IGNORE  # no target across an example boundary (formats.fence, vectorized)
    positions = (np.arange(len(ids)) - np.repeat(ex_start, ex_len)).astype(np.int32)
    row_len = np.bincount(row_of[take] - r0, weights=ex_len, minlength=r1 - r0).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_len)]).astype(np.int32))
    return pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
                            pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int32())),
                            pa.ListArray.from_arrays(offsets, pa.array(positions)),
                            pa.array(row_len.astype(np.int32))], schema=schema)

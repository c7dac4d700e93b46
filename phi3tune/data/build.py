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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
MAP_CHUNK_ROWS = 100_000  # rows tokenized by one set of processes (each chunk's start costs ~0.5 s)
PACK_BATCH_ROWS = 2048  # packed rows built and written per Arrow record batch
# examples read between two drops of the token files' pages: reading an example maps in the pages around it (the
# kernel's fault-around, or a whole large folio of the page cache: up to ~0.5 MiB per example measured on Linux 6.18),
# so packing holds at most GATHER_EXAMPLES x that of the token files at a time, whatever the dataset's size
GATHER_EXAMPLES = 64
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
        token_files = _tokenize(raw, encoder, tmp, num_proc, entry.name)
        with _mapped(token_files) as (table, drop_pages):
            lengths = table.column("length").to_numpy().astype(np.int64)
            trained = int(table.column("trained").to_numpy().astype(np.int64).sum())
            truncated = int(np.count_nonzero(table.column("truncated").to_numpy()))
            drop_pages()
        del table  # its maps close with it
        if trained == 0:
            raise DataFormatError(
                f"data: no example has a trained token after masking (format={fmt}, train_on={train_on}); "
                "check the assistant/output columns or raise data.max_seq_length")
        if packing:
            n_rows = write_packed(token_files, lengths, max_len, tmp / "packed.arrow")
            files = ["packed.arrow"]
            for path in token_files:
                path.unlink()
        else:
            n_rows, files = len(lengths), [path.name for path in token_files]
        summary = DataSummary(fmt, train_on, len(lengths), n_rows, int(lengths.sum()), truncated, trained)
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


def _tokenize(raw: Any, encoder: Any, tmp: Path, num_proc: int, fingerprint: str) -> list[Path]:
    """Map ``encoder`` over ``raw`` into Arrow files in ``tmp`` (the files, in row order), MAP_CHUNK_ROWS rows at a
    time: the tokenizing processes read rows from a memory map, and the pages they read go when they exit at the
    end of a chunk, so their memory does not grow with the dataset."""
    files: list[Path] = []
    chunks = range(0, len(raw), MAP_CHUNK_ROWS) if len(raw) > MAP_CHUNK_ROWS else [0]
    for i, lo in enumerate(chunks):
        part = raw.select(range(lo, min(len(raw), lo + MAP_CHUNK_ROWS))) if len(chunks) > 1 else raw
        tok = part.map(encoder, batched=True, remove_columns=raw.column_names, features=token_features(),
                       num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(tmp / f"tokens-{i:05d}.arrow"),
                       load_from_cache_file=False, new_fingerprint=f"{fingerprint}-{i}",
                       desc="tokenizing" if len(chunks) == 1 else f"tokenizing {i + 1}/{len(chunks)}")
        files += [Path(f["filename"]) for f in tok.cache_files]
    return files


def write_packed(token_files: list[Path], lengths: np.ndarray, capacity: int, path: Path) -> int:
    """Best-fit pack the tokenized examples (``token_files``, in order) into rows written batch by batch to an
    Arrow file: per row the examples' tokens concatenated (in example order), position_ids restarting at 0 at
    each example and each example's first label IGNORE (as ``pack_examples``). Returns the number of rows."""
    import pyarrow as pa

    row_of = best_fit_rows(lengths, capacity)
    n_rows = int(row_of.max()) + 1
    members = np.argsort(row_of, kind="stable")  # grouped by row, example order inside a row
    per_row = np.bincount(row_of, minlength=n_rows)
    first = np.concatenate([[0], np.cumsum(per_row)])
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("position_ids", pa.list_(pa.int32())), ("length", pa.int32())])
    with _mapped(token_files) as (table, drop_pages), pa.OSFile(str(path), "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as writer:
        for r0 in range(0, n_rows, PACK_BATCH_ROWS):
            r1 = min(n_rows, r0 + PACK_BATCH_ROWS)
            writer.write_batch(_packed_batch(table, members[first[r0]:first[r1]], row_of, r0, r1, schema,
                                             drop_pages))
    return n_rows


@contextmanager
def _mapped(files: list[Path]) -> Iterator[tuple[Any, Callable[[], None]]]:
    """Arrow stream files as one table over memory maps of our own, and a function that drops the pages read so
    far from this process (MADV_DONTNEED: they stay in the page cache). Packing reads examples from all over
    the files; without the drop every page read would stay in this process's memory until the end."""
    import mmap

    import pyarrow as pa
    from datasets.table import InMemoryTable

    maps = []
    for name in files:
        with open(name, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def drop_pages() -> None:
        if hasattr(mmap, "MADV_DONTNEED"):  # not on Windows: there the pages stay until the end
            for m in maps:
                m.madvise(mmap.MADV_DONTNEED)

    tables = [pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(m))).read_all() for m in maps]
    yield InMemoryTable(pa.concat_tables(tables)), drop_pages  # zero-copy: the columns point into the maps


def _packed_batch(table: Any, take: np.ndarray, row_of: np.ndarray, r0: int, r1: int, schema: Any,
                  drop_pages: Callable[[], None]) -> Any:
    import pyarrow as pa

    lens, id_parts, label_parts = [], [], []
    for k in range(0, len(take), GATHER_EXAMPLES):
        # fast_gather slices the record batches that hold the rows: pyarrow's take() would first concatenate each
        # whole column (the whole dataset's tokens in memory, once per batch)
        part = table.fast_gather(take[k:k + GATHER_EXAMPLES])
        lens.append(part.column("length").to_numpy())
        id_parts.append(part.column("input_ids").combine_chunks().flatten().to_numpy())
        label_parts.append(part.column("labels").combine_chunks().flatten().to_numpy())
        drop_pages()
    ex_len = np.concatenate(lens).astype(np.int64)
    ids, labels = np.concatenate(id_parts), np.concatenate(label_parts)  # copies: ours to change
    ex_start = np.concatenate([[0], np.cumsum(ex_len)[:-1]])
    labels[ex_start[ex_len > 0]] = IGNORE  # no target across an example boundary (formats.fence, vectorized)
    positions = (np.arange(len(ids)) - np.repeat(ex_start, ex_len)).astype(np.int32)
    row_len = np.bincount(row_of[take] - r0, weights=ex_len, minlength=r1 - r0).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_len)]).astype(np.int32))
    return pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
                            pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int32())),
                            pa.ListArray.from_arrays(offsets, pa.array(positions)),
                            pa.array(row_len.astype(np.int32))], schema=schema)

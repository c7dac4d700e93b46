"""Memory flat in the dataset's size on a first run (data/build.py, data/sources.py): packing drops the token
files' pages as it goes, tokenizing runs a chunk of rows per set of processes, JSON lines are checked one at a
time."""

from __future__ import annotations

import json
import mmap
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import rows_of_text

from phi3tune import DataSpec
from phi3tune.data import build, prepare_data
from phi3tune.data.sources import _find_bad_json, load_source

linux_only = pytest.mark.skipif(not Path("/proc/self/pagemap").exists() or not hasattr(mmap, "MADV_DONTNEED"),
                                reason="reads page residency from /proc/self/pagemap")


def _token_file(path: Path, n: int, seed: int) -> None:
    """n examples of 2,000-4,000 tokens, as tokenize.py writes them (Arrow stream, 1,000 rows per record batch)."""
    import pyarrow as pa

    from phi3tune.data.tokenize import to_arrow

    rng = np.random.default_rng(seed)
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for lo in range(0, n, 1000):
            ids = [rng.integers(0, 32000, rng.integers(2000, 4000)).astype(np.int32) for _ in range(min(1000, n - lo))]
            table = to_arrow({"input_ids": ids, "labels": ids, "length": [len(x) for x in ids],
                              "trained": [len(x) - 1 for x in ids], "truncated": [False] * len(ids)})
            writer = writer or pa.ipc.new_stream(sink, table.schema)
            writer.write_table(table)
        assert writer is not None
        writer.close()


def _resident(ranges: list[tuple[int, int]]) -> int:
    """Bytes of these address ranges mapped into this process now (bit 63 of /proc/self/pagemap)."""
    page, total = mmap.PAGESIZE, 0
    with open("/proc/self/pagemap", "rb") as f:
        for lo, hi in ranges:
            f.seek(lo // page * 8)
            entries = np.frombuffer(f.read((hi - lo) // page * 8), dtype=np.uint64)
            total += int(np.count_nonzero(entries >> np.uint64(63))) * page
    return total


def _token_pages(monkeypatch, tmp_path: Path, n: int, drop: bool) -> tuple[int, int, int, int]:
    """Pack n synthetic examples (2 files); the most token-file bytes mapped in before a drop and after one, the
    number of drops, and the files' size."""
    files = [tmp_path / f"tokens-{i}.arrow" for i in range(2)]
    for i, f in enumerate(files):
        _token_file(f, n // 2, seed=i)
    real, before, after = build._mapped, [0], [0]

    @contextmanager
    def watched(paths):
        with real(paths) as (table, drop_pages):
            names = {str(p) for p in paths}
            ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                      for line in Path("/proc/self/maps").read_text().splitlines() if line.split()[-1] in names]

            def record_and_drop():
                before.append(_resident(ranges))
                if drop:
                    drop_pages()
                after.append(_resident(ranges))

            yield table, record_and_drop

    monkeypatch.setattr(build, "_mapped", watched)
    monkeypatch.setattr(build, "GATHER_EXAMPLES", 2)
    lengths = np.concatenate([_lengths(f) for f in files]).astype(np.int64)
    build.write_packed(files, lengths, 8192, tmp_path / "packed.arrow")
    return max(before), max(after), len(before) - 1, sum(f.stat().st_size for f in files)


def _lengths(path: Path) -> np.ndarray:
    import pyarrow as pa

    with pa.memory_map(str(path)) as m:
        return pa.ipc.open_stream(m).read_all().column("length").to_numpy()


@linux_only
def test_packing_drops_the_token_pages_it_read_every_few_examples(monkeypatch, tmp_path):
    (tmp_path / "drop").mkdir()
    peak, left, drops, size = _token_pages(monkeypatch, tmp_path / "drop", 800, drop=True)
    assert size > 15 * 2**20 and drops >= 800 // 2
    # after each drop nothing of the files is mapped in: packing holds one gather's pages (2 examples here), not
    # the files; how much that is depends on the kernel (whole page-cache folios, up to 2 MiB, are mapped at once)
    assert left == 0 and 0 < peak < size
    # negative control: without the drops, packing ends up holding (nearly) the whole files
    (tmp_path / "kept").mkdir()
    kept, _, _, _ = _token_pages(monkeypatch, tmp_path / "kept", 800, drop=False)
    assert kept > 0.8 * size


@pytest.mark.parametrize("packing", [False, True])
def test_tokenizing_in_chunks_gives_the_rows_of_one_chunk(tmp_path, monkeypatch, packing):
    from phi3tune.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    spec = {"source": rows_of_text(50, seed=3), "format": "guanaco", "max_seq_length": 48, "packing": packing,
            "num_proc": 1}
    one = prepare_data(DataSpec(**spec, cache_dir=str(tmp_path / "one")), tok)
    monkeypatch.setattr(build, "MAP_CHUNK_ROWS", 7)
    monkeypatch.setattr(build, "GATHER_EXAMPLES", 3)
    chunked = prepare_data(DataSpec(**spec, cache_dir=str(tmp_path / "chunked")), tok)
    assert list(chunked.train) == list(one.train) and chunked.summary == one.summary
    entry = next(p for p in (tmp_path / "chunked").iterdir())
    files = json.loads((entry / "summary.json").read_text())["files"]
    assert len(files) == (1 if packing else 8)  # 50 rows in chunks of 7; packing keeps only its rows
    assert sorted(p.name for p in entry.iterdir()) == sorted([*files, "summary.json"])


def test_json_lines_are_checked_without_reading_the_whole_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": f"{i} " + "word " * 200} for i in range(5000)]
    rows[10]["text"] = "a line separator\u2028inside a string is no line break"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tracemalloc.start()
    try:
        assert _find_bad_json(path) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > 4 * 2**20 and peak < 2**20  # one line at a time, not the file (5 MB)
    assert load_source(str(path), "train", "data.source")[10]["text"] == rows[10]["text"]
    path.write_text(path.read_text() + '{"text": "no end"\n')
    assert _find_bad_json(path) == "line 5001: Expecting ',' delimiter"

"""Data at scale: the prepared-rows cache, parallel tokenization, NumPy best-fit packing written as Arrow,
in-memory sources recorded by fingerprint, and streaming with exact resume."""

from __future__ import annotations

import bisect
import random

import numpy as np
import pytest
from helpers import ROWS, assert_same_run, kill_after, rows_of_text, tiny_tuner
from pydantic import ValidationError

from phi3tune import ConfigError, DataSpec
from phi3tune import checkpoints as ckpt
from phi3tune.data import prepare_data, row_lengths
from phi3tune.data.packing import best_fit_rows, pack_best_fit, pack_examples


def _old_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """The best-fit decreasing packing as it was before NumPy (a sorted list of (free space, row))."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        need = min(lengths[i], capacity)
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_matches_the_old_packing_on_random_lengths(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 512])
    lengths = [rng.randint(0 if seed % 2 else 1, capacity + 8) for _ in range(rng.randint(1, 3000))]
    assert pack_best_fit(lengths, capacity) == _old_best_fit(lengths, capacity)
    row_of = best_fit_rows(np.asarray(lengths), capacity)
    totals = np.bincount(row_of, weights=np.minimum(lengths, capacity))
    assert totals.max() <= capacity
    # negative control: the comparison can fail (a first-fit packing is a different result)
    assert pack_best_fit(lengths, capacity) != _old_best_fit(lengths[::-1], capacity) or len(set(lengths)) == 1


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from phi3tune.tiny import build_char_tokenizer

    return build_char_tokenizer()


def _spec(tmp_path, **kw):
    """Guanaco rows rendered with the chat template, completion-only labels: every part of the key matters."""
    return DataSpec(**{"source": rows_of_text(300, seed=1), "format": "guanaco", "max_seq_length": 48,
                       "cache_dir": str(tmp_path), **kw})


def _rows(ds):
    return [{k: list(v) if isinstance(v, list) else v for k, v in r.items() if k != "length"} for r in ds]


def test_packed_arrow_rows_equal_pack_examples(tmp_path, tiny_tokenizer):
    plain = prepare_data(_spec(tmp_path), tiny_tokenizer)
    packed = prepare_data(_spec(tmp_path, packing=True), tiny_tokenizer)
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in plain.train]
    assert _rows(packed.train) == pack_examples(examples, 48)
    assert packed.summary.rows == len(packed.train) < plain.summary.rows
    assert packed.summary.tokens == plain.summary.tokens == sum(row_lengths(packed.train))


def test_second_prepare_reuses_the_cache_and_any_token_change_does_not(tmp_path, tiny_tokenizer, caplog):
    first = prepare_data(_spec(tmp_path, eval_fraction=0.1), tiny_tokenizer)
    assert "data: tokenized" in caplog.text and "reusing" not in caplog.text
    caplog.clear()
    again = prepare_data(_spec(tmp_path, eval_fraction=0.1), tiny_tokenizer)
    assert "reusing" in caplog.text and "data: tokenized" not in caplog.text
    assert _rows(again.train) == _rows(first.train) and _rows(again.eval) == _rows(first.eval)
    assert again.summary == first.summary
    entries = {p.name for p in tmp_path.iterdir()}
    for change in [{"max_seq_length": 32}, {"train_on": "all"}, {"packing": True}, {"system_prompt": "be brief"},
                   {"eval_fraction": 0.2}, {"source": rows_of_text(300, seed=2)}]:
        caplog.clear()
        prepare_data(_spec(tmp_path, **{"eval_fraction": 0.1, **change}), tiny_tokenizer)
        assert "tokenized" in caplog.text, change
    template = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = "x" + template  # renders an x before every conversation
        caplog.clear()
        prepare_data(_spec(tmp_path, eval_fraction=0.1), tiny_tokenizer)
        assert "tokenized" in caplog.text
    finally:
        tiny_tokenizer.chat_template = template
    assert len({p.name for p in tmp_path.iterdir()} - entries) == 2 * 7
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_parallel_tokenization_equals_one_process(tmp_path, tiny_tokenizer, caplog):
    one = prepare_data(_spec(tmp_path / "a", num_proc=1), tiny_tokenizer)
    two = prepare_data(_spec(tmp_path / "b", num_proc=2), tiny_tokenizer)
    assert "with 2 process(es)" in caplog.text
    assert _rows(one.train) == _rows(two.train) and one.summary == two.summary


def test_a_failed_build_leaves_no_entry(tmp_path, tiny_tokenizer):
    from phi3tune.errors import DataFormatError

    bad_last = [*rows_of_text(2500), {"text": "no turns at all"}]  # fails in the map's third batch
    with pytest.raises(DataFormatError, match="no '### Assistant:' turn"):
        prepare_data(_spec(tmp_path, source=bad_last), tiny_tokenizer)
    assert not list(tmp_path.iterdir())


def test_in_memory_rows_are_recorded_by_fingerprint(tiny_model):
    from phi3tune import FineTuner

    rows = rows_of_text(50)
    cfg = FineTuner(str(tiny_model)).data(source=rows).to_config()
    recorded = cfg["data"]["source"]
    assert recorded.startswith("in-memory:list(50 rows, fingerprint ") and len(str(cfg)) < 2000
    assert FineTuner(str(tiny_model)).data(source=list(rows)).to_config()["data"]["source"] == recorded
    assert FineTuner(str(tiny_model)).data(source=rows[:-1]).to_config()["data"]["source"] != recorded


# ------------------------------------------------------------------------------------------------ streaming
def test_streamed_rows_equal_map_style_rows(tmp_path, tiny_tokenizer, monkeypatch):
    from phi3tune.data import stream

    for packing in (False, True):
        mapped = prepare_data(_spec(tmp_path, packing=packing), tiny_tokenizer)
        streamed = prepare_data(_spec(tmp_path, packing=packing, streaming=True), tiny_tokenizer)
        assert streamed.streaming and streamed.summary.format == mapped.summary.format
        got = [{k: v for k, v in r.items() if k != "length"} for r in streamed.train]
        if not packing:
            assert got == _rows(mapped.train)
        else:  # one window holds all 300 examples: the same best-fit rows
            assert got == _rows(mapped.train)
    monkeypatch.setattr(stream, "WINDOW", 7)  # windows of 7 examples: each packed on its own, in stream order
    windows = prepare_data(_spec(tmp_path, streaming=True, packing=True), tiny_tokenizer).train
    unpacked = _rows(prepare_data(_spec(tmp_path), tiny_tokenizer).train)
    expected = [row for i in range(0, len(unpacked), 7) for row in pack_examples(unpacked[i:i + 7], 48)]
    assert [{k: v for k, v in r.items() if k != "length"} for r in windows] == expected


def test_streaming_refuses_what_it_cannot_do(tiny_model, tmp_path):
    with pytest.raises(ValidationError, match="eval_fraction"):
        DataSpec(source=ROWS, streaming=True, eval_fraction=0.1)
    ft = tiny_tuner(tiny_model, tmp_path / "out", ROWS, max_steps=None, num_epochs=1).data(streaming=True)
    with pytest.raises(ConfigError, match="max_steps"):
        ft.run()
    assert not (tmp_path / "out").exists()


def _stream_tuner(tiny_model, out):
    ft = tiny_tuner(tiny_model, out, rows_of_text(14, seed=4), batch_size=2, grad_accum=2, max_steps=7,
                    save_strategy="steps", save_steps=1, learning_rate=5e-3, logging_steps=1)
    ft.training(eval_steps=3)  # the eval source is streamed too, from its start at every evaluation
    return ft.adapter(dropout=0.1).data(streaming=True, packing=True, eval_source=rows_of_text(5, seed=9))


def test_streaming_resume_after_kill_equals_an_unbroken_run(tiny_model, tmp_path, monkeypatch):
    """Killed mid-way through the second pass over the stream, inside a packing window: the resumed run
    re-reads that window from the stored position and trains exactly what the unbroken run trained."""
    from phi3tune.data import stream

    monkeypatch.setattr(stream, "WINDOW", 3)  # windows of 3 rows, loader batches of 2: a cut inside a window
    ref = _stream_tuner(tiny_model, tmp_path / "ref").run()
    state = ckpt.load_checkpoint(ref.output_dir / "checkpoint-6")[0]["stream"]
    assert (state["epoch"], state["first_row"], state["skip"]) == (1, 6, 2)  # 14 rows a pass; 8 of pass 2 used
    assert state["position"]["examples_iterable"]["batch_idx"] == 6
    out = kill_after(ref.output_dir, tmp_path / "run", 6)
    res = _stream_tuner(tiny_model, out).run(resume=True)
    assert_same_run(res, ref)


@pytest.mark.parametrize("fmt", ["text", "guanaco"])
def test_batched_encoding_equals_the_one_row_reference(fmt, tiny_tokenizer, phi3_or_none):
    """encode_batch (one Rust call per batch, NumPy labels) gives encode()'s tokens and labels, row by row."""
    from phi3tune.data.formats import encode, resolve_train_on
    from phi3tune.data.tokenize import make_encoder

    rows = [*rows_of_text(40, seed=5), {"text": "### Human: é ✓ tabs\tand  spaces ### Assistant: ok"}]
    seen = set()
    for tok in [tiny_tokenizer, *([phi3_or_none] if phi3_or_none is not None else [])]:
        for max_len in (24, 4096):
            train_on = resolve_train_on(fmt, "auto")
            out = make_encoder(tok, fmt, train_on, "text", max_len, None)({"text": [r["text"] for r in rows]})
            for i, row in enumerate(rows):
                ref = encode(row, tok, fmt, train_on, "text", max_len)
                assert list(out["input_ids"][i]) == ref["input_ids"] and list(out["labels"][i]) == ref["labels"]
                assert out["truncated"][i] == ref["truncated"] and out["length"][i] == len(ref["input_ids"])
                seen.add(ref["truncated"])
    assert seen == {True, False}  # cut and whole examples both compared


@pytest.fixture(scope="module")
def phi3_or_none():
    from helpers import PHI3_DIR

    if not PHI3_DIR.is_dir():
        return None
    from phi3tune.model import load_tokenizer

    return load_tokenizer(str(PHI3_DIR))


def test_a_cached_file_is_not_read_again_until_it_changes(tmp_path, tiny_tokenizer, monkeypatch, caplog):
    import json
    import os

    import phi3tune.data as data

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of_text(50)))
    spec = DataSpec(source=str(path), format="guanaco", max_seq_length=48, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(spec, tiny_tokenizer)

    def never(*a, **k):
        raise AssertionError("the source was loaded although its rows are cached")

    monkeypatch.setattr(data, "load_source", never)
    assert _rows(prepare_data(spec, tiny_tokenizer).train) == _rows(first.train)  # by path, size and mtime only
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: maybe new rows
    with pytest.raises(AssertionError, match="was loaded"):
        prepare_data(spec, tiny_tokenizer)


def test_processes_and_cache_dir_do_not_change_what_a_resume_accepts(tiny_model):
    from phi3tune import FineTuner

    base = FineTuner(str(tiny_model)).data(source="rows.jsonl")
    same = FineTuner(str(tiny_model)).data(source="rows.jsonl", num_proc=3, cache_dir="/elsewhere")
    other = FineTuner(str(tiny_model)).data(source="rows.jsonl", max_seq_length=256)
    identity = ckpt._run_identity
    assert identity(same.to_config()) == identity(base.to_config()) != identity(other.to_config())

"""Bad input: a named, helpful error before any weights load."""

from __future__ import annotations

import json
import time

import pytest
from helpers import tiny_tuner

from phi3tune import ConfigError, DataFormatError, DataSourceError, FineTuner, ModelSourceError, OutputDirError
from phi3tune.data import load_source


def test_missing_text_field_names_it_and_the_columns(tiny_model, tmp_path):
    ft = tiny_tuner(tiny_model, tmp_path / "o", [{"body": "hello"}]).data(format="text")
    with pytest.raises(DataFormatError) as err:
        ft.run()
    assert "'text'" in str(err.value) and "body" in str(err.value) and "text_field" in str(err.value)
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_empty_dataset_and_empty_file(tiny_model, tmp_path):
    with pytest.raises(DataFormatError, match="no rows"):
        load_source([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        load_source(str(empty))


def test_missing_data_file(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist") as err:
        load_source(str(tmp_path / "train.jsonl"))
    assert isinstance(err.value, FileNotFoundError)


def test_bad_json_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": "broken\n' + json.dumps({"text": "ok"}) + "\n")
    with pytest.raises(DataFormatError, match="line 2"):
        load_source(str(f))


def test_unsupported_extension(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("hello")
    with pytest.raises(DataSourceError, match=r"\.txt"):
        load_source(str(f))


def test_max_seq_length_above_context(tiny_model, tmp_path):
    ft = tiny_tuner(tiny_model, tmp_path / "o", [{"text": "a"}]).data(max_seq_length=100_000)
    with pytest.raises(ConfigError, match="max_seq_length"):
        ft.run()


def test_missing_model_dir_fails_fast(tmp_path):
    ft = FineTuner(tmp_path / "nope").data(source=[{"text": "a"}]).training(output_dir=str(tmp_path / "o"))
    t = time.perf_counter()
    with pytest.raises(ModelSourceError):
        ft.run()
    assert time.perf_counter() - t < 3


def test_output_dir_is_a_file(tiny_model, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        tiny_tuner(tiny_model, f, [{"text": "a"}]).run()

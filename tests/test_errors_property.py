"""The guarantee, not the cases: whatever bad config, file or path a user gives a public entry point, what leaves
it is a phi3tune error (errors.py; for spec values, pydantic's ValidationError naming the field: errors.py says
so) whose message names the setting, file or path at fault, raised before any weights load.

Hypothesis draws the bad input; few examples, the tiny model, mostly failures found before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import rows_of_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from phi3tune import FineTuner, Phi3TuneError, export_adapter, load_finetuned, merge_adapter, push_to_hub

FAST = settings(max_examples=int(__import__("os").environ.get("PROP_N", 15)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, -1.0, 1e9, float("nan")]),
                       st.text(max_size=6), st.lists(st.integers(-1, 2), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                       st.sampled_from(["~/nowhere", "/", "a/b/c", "module:Nope", "checkpoint-7", "auto"]))
FIELDS = [("model", None), ("trust_remote_code", None), ("attn_implementation", None),
          *[("quant", f) for f in ("bits", "quant_type", "compute_dtype", "quant_storage")],
          *[("adapter", f) for f in ("r", "alpha", "dropout", "target_modules", "bias", "modules_to_save", "use_dora",
                                     "init")],
          *[("data", f) for f in ("source", "format", "train_on", "max_seq_length", "text_field", "eval_fraction",
                                  "eval_source", "split")],
          *[("training", f) for f in ("batch_size", "optimizer", "optimizer_kwargs", "weight_decay", "lr_scheduler",
                                      "max_steps", "precision", "save_strategy", "report_to", "output_dir",
                                      "micro_batch_tokens", "device", "optimize_for")]]


def _names_something(exc: BaseException, *names: str) -> None:
    """The message names one of ``names`` (the setting, file or path given) or a spec field."""
    if isinstance(exc, ValidationError):
        assert exc.errors() and exc.errors()[0]["loc"] is not None, exc
        return
    assert isinstance(exc, Phi3TuneError), f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    text = str(exc)
    assert any(n and n in text for n in names), f"names none of {names}: {text}"


def _no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*_: Any, **__: Any) -> None:
        raise _Accepted

    monkeypatch.setattr("phi3tune.model.load_base_model", reached)


class _Accepted(Exception):
    """Every check passed: the run went on to load weights (the drawn value was a valid one)."""


def _config(tiny_model: Path, out: Path) -> dict[str, Any]:
    cfg = FineTuner(str(tiny_model)).adapter(r=4).data(source=rows_of_text(4), max_seq_length=64).training(
        output_dir=str(out), batch_size=2, max_steps=1, optimizer="adamw_torch", progress_bar=False,
        save_strategy="no").to_config()
    cfg["data"]["source"] = str(out.parent / "train.jsonl")
    return cfg


@FAST
@given(field=st.sampled_from(FIELDS), value=ODD_VALUES)
def test_a_bad_config_value_fails_as_a_phi3tune_error_naming_it(tiny_model, tmp_path_factory, monkeypatch, field,
                                                               value):
    root = tmp_path_factory.mktemp("cfg")
    monkeypatch.chdir(root)  # a drawn relative output_dir ("auto", "a/b/c") lands here, not in the checkout
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of_text(4)))
    cfg = _config(tiny_model, root / "run")
    section, key = field
    if key is None:
        cfg[section] = value
    else:
        cfg[section][key] = value
    _no_weights(monkeypatch)
    try:
        FineTuner.from_config(cfg).run()
    except _Accepted:
        return
    except Exception as exc:  # the property is about every exception
        _names_something(exc, section, str(key), str(value), "data.", "training.", "model", "adapter.", "quant")


FILE_BODIES = st.one_of(st.binary(max_size=40), st.sampled_from([
    b"", b"\xef\xbb\xbf", b"[1, 2]", b'{"text": 5}\n', b'{"nope": "x"}\n', b"a,b\n1,2\n", b"{bad json\n",
    b'{"messages": "not a list"}\n', b'{"instruction": "i"}\n', b'\xff\xfe{"text": "x"}\n']))


@FAST
@given(body=FILE_BODIES, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".parquet"]))
def test_a_bad_data_file_fails_as_a_phi3tune_error_naming_it(tiny_model, tmp_path_factory, monkeypatch, body,
                                                            suffix):
    root = tmp_path_factory.mktemp("data")
    monkeypatch.chdir(root)
    data = root / f"train{suffix}"
    data.write_bytes(body)
    cfg = _config(tiny_model, root / "run")
    cfg["data"]["source"] = str(data)
    _no_weights(monkeypatch)
    try:
        FineTuner.from_config(cfg).run()
    except _Accepted:
        return
    except Exception as exc:
        _names_something(exc, str(data), "data.")


def _bad_dir(kind: str, root: Path) -> Path:
    path = root / "thing"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty dir":
        path.mkdir()
    elif kind == "bad adapter_config":
        path.mkdir()
        (path / "adapter_config.json").write_text("{not json")
    elif kind == "adapter of a missing base":
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["qkv_proj"],
                                                             "base_model_name_or_path": str(root / "gone")}))
        (path / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return path


@FAST
@given(kind=st.sampled_from(["missing", "file", "empty dir", "bad adapter_config", "adapter of a missing base"]),
       entry=st.sampled_from(["load_finetuned", "merge_adapter", "export_adapter", "push_to_hub"]))
def test_a_bad_adapter_path_fails_as_a_phi3tune_error_naming_it(tmp_path_factory, kind, entry):
    root = tmp_path_factory.mktemp("adapter")
    path = _bad_dir(kind, root)
    calls = {"load_finetuned": lambda: load_finetuned(path, device="cpu"),
             "merge_adapter": lambda: merge_adapter(path, root / "merged"),
             "export_adapter": lambda: export_adapter(path, root / "exported"),
             "push_to_hub": lambda: push_to_hub(path, "user/name")}
    with pytest.raises(Exception) as err:  # any exception: the property checks its kind
        calls[entry]()
    _names_something(err.value, str(path), str(root / "gone"))
    assert not (root / "merged").exists() and not (root / "exported").exists()


@FAST
@given(args=st.lists(st.sampled_from(["train", "merge", "export", "bench", "--resume", "--overwrite",
                                      "~/nowhere.yaml", "/", "x.json", "--set", "training.batch_size=0", "-q"]),
                     min_size=1, max_size=4))
def test_the_cli_never_lets_a_raw_exception_out(args, capsys):
    from phi3tune.cli import main

    try:
        status = main(args)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    assert status != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


# ------------------------------------------------------------------------------------------- the cases of the issue
def test_tilde_in_output_dir_is_the_home_directory(monkeypatch, tmp_path):
    from phi3tune import TrainSpec

    monkeypatch.setenv("HOME", str(tmp_path))
    assert TrainSpec(output_dir="~/runs/a").output_dir == str(tmp_path / "runs" / "a")


def test_a_jsonl_with_a_utf8_bom_loads(tmp_path):
    from phi3tune.data import load_source

    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')  # what Windows editors write
    assert load_source(str(path))["text"] == ["a", "b"]


def test_an_optimizer_without_weight_decay_trains_or_is_refused_at_spec_time(tiny_model, tmp_path):
    from phi3tune import TrainSpec

    with pytest.raises(ValidationError, match=r"training\.weight_decay=0\.1: Rprop"):
        TrainSpec(optimizer="Rprop", weight_decay=0.1)
    with pytest.raises(ValidationError, match=r"training\.optimizer='LBFGS'.*closure"):
        TrainSpec(optimizer="LBFGS")
    res = FineTuner(str(tiny_model)).adapter(r=4).data(source=rows_of_text(4), max_seq_length=64).training(
        output_dir=str(tmp_path / "run"), optimizer="Rprop", max_steps=1, progress_bar=False,
        save_strategy="no").run()
    assert res.metrics["steps"] == 1


def test_dora_on_an_8bit_base_on_the_cpu_is_refused_before_weights_load(tiny_model, tmp_path, monkeypatch):
    from phi3tune import ConfigError

    _no_weights(monkeypatch)
    ft = FineTuner(str(tiny_model)).quantize(bits=8).adapter(r=4, use_dora=True).data(
        source=rows_of_text(4)).training(output_dir=str(tmp_path / "run"), device="cpu", progress_bar=False)
    with pytest.raises(ConfigError, match=r"adapter\.use_dora=True on an 8-bit base \(quant\.bits=8\) needs CUDA"):
        ft.run()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_hub_id_without_network_fails_fast_and_whole(tmp_path, monkeypatch, offline):
    """No 30 s of retries, no message cut mid-URL, no trust_remote_code hint that has nothing to do with it."""
    import time

    from huggingface_hub import constants

    from phi3tune import ModelSourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    ft = FineTuner("someorg/some-model").data(source=rows_of_text(4)).training(output_dir=str(tmp_path / "run"))
    started = time.perf_counter()
    with pytest.raises(ModelSourceError) as err:
        ft.run()
    assert time.perf_counter() - started < 5
    msg = str(err.value)
    assert "model 'someorg/some-model' is not a local directory nor in the Hugging Face cache" in msg
    assert ("HF_HUB_OFFLINE is set" if offline == "1" else "127.0.0.1:9") in msg
    assert "trust_remote_code" not in msg and not (tmp_path / "run").exists()

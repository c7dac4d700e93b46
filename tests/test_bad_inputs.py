"""Bad input: each case raises a named error that says which field or path is wrong and what would work,
before any model weights load (load_base_model is replaced by a tripwire) and before output_dir is created.

Spec values are checked by pydantic as the spec is built (more cases in test_specs.py); everything else by
FineTuner.run()'s preflight. Disk full while saving is simulated by making phi3tune's own save calls fail.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import rows_of_text, tiny_tuner
from pydantic import ValidationError

import phi3tune.model
import phi3tune.pipeline
import phi3tune.precision
from phi3tune import (
    AdapterSpec,
    ConfigError,
    DataFormatError,
    DataSourceError,
    DataSpec,
    FineTuner,
    ModelSourceError,
    OutputDirError,
    QuantSpec,
    TargetModulesError,
    TrainSpec,
)
from phi3tune import checkpoints as ckpt

# Every message says what would work: one of these verbs (pydantic's own messages say "should be ...").
FIX = re.compile(r"\b(use|give|set|choose|pass|fix|free|check|raise|re-save|should|must|needs)\b", re.IGNORECASE)
TEXT = [{"text": "### Human: hi ### Assistant: hello"}]


def assert_helpful(err: BaseException, *names: str) -> None:
    msg = str(err)
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    assert FIX.search(msg), f"no fix suggested in {msg!r}"


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*_: Any, **__: Any) -> None:
        raise AssertionError("model weights were loaded before the bad input was noticed")

    monkeypatch.setattr(phi3tune.model, "load_base_model", tripwire)


# ------------------------------------------------------------------------------------------- spec values
@pytest.mark.parametrize("build,field,hint", [
    (lambda: TrainSpec(learning_rate=0), "learning_rate", "greater than 0"),
    (lambda: TrainSpec(warmup_ratio=1.0), "warmup_ratio", "less than 1"),
    (lambda: TrainSpec(optimizer="sgdd"), "optimizer", "paged_adamw_32bit"),
    (lambda: TrainSpec(precision="fp8"), "precision", "'bf16'"),
    (lambda: TrainSpec(save_total_limit=0), "save_total_limit", "greater than 0"),
    (lambda: AdapterSpec(alpha=-1), "alpha", "greater than 0"),
    (lambda: AdapterSpec(target_modules=["qkv_proj", ""]), "target_modules", '"auto"'),
    (lambda: QuantSpec(compute_dtype="int8"), "compute_dtype", "'bfloat16'"),
    (lambda: DataSpec(source=""), "source", "give a file"),
    (lambda: DataSpec(source=["a", "b"]), "source", "must hold dicts"),
    (lambda: DataSpec(max_seq_length=4), "max_seq_length", "greater than or equal to 8"),
    (lambda: DataSpec(eval_fraction=0.1, eval_source=TEXT), "eval_fraction or eval_source", "not both"),
], ids=["lr-zero", "warmup-1", "optimizer", "precision", "save-limit-0", "alpha-negative", "empty-module-name",
        "compute-dtype", "empty-source", "list-of-strings", "seq-too-short", "eval-twice"])
def test_invalid_spec_value(build: Callable[[], Any], field: str, hint: str):
    with pytest.raises(ValidationError) as err:
        build()
    assert_helpful(err.value, field, hint)


def test_invalid_value_through_the_builder_fails_at_once():
    ft = FineTuner("org/model")
    with pytest.raises(ValidationError) as err:
        ft.training(batch_size=0)
    assert_helpful(err.value, "batch_size", "greater than 0")
    assert ft.train_spec.batch_size == 4  # the builder keeps its last valid spec


# ------------------------------------------------------------------------------------------- run() preflight
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _model_without_weights(tiny_model: Path, tmp: Path) -> str:
    d = tmp / "no-weights"
    d.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    return str(d)


def _adapter_dir(tmp: Path) -> str:
    d = tmp / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    return str(d)


def _empty_dir(tmp: Path) -> str:
    (tmp / "data-dir").mkdir()
    return str(tmp / "data-dir")


# Each case: (tuner built from (tiny_model, tmp, out), expected error, strings the message must contain).
# "{tmp}" in a string stands for the test's tmp_path.
CASES: dict[str, tuple[Callable[[Path, Path, Path], FineTuner], type[Exception], list[str]]] = {
    "model-path-missing": (lambda m, t, o: tiny_tuner(t / "no-such-model", o, TEXT),
                           ModelSourceError, ["{tmp}/no-such-model", "does not exist", "hub id"]),
    "model-path-is-a-file": (lambda m, t, o: tiny_tuner(Path(_write(t / "model.bin", "x")), o, TEXT),
                             ModelSourceError, ["{tmp}/model.bin", "is a file", "config.json"]),
    "dir-is-not-a-model": (lambda m, t, o: tiny_tuner(Path(_empty_dir(t)), o, TEXT),
                           ModelSourceError, ["{tmp}/data-dir", "no config.json", "save_pretrained"]),
    "dir-is-an-adapter": (lambda m, t, o: tiny_tuner(Path(_adapter_dir(t)), o, TEXT),
                          ModelSourceError, ["{tmp}/adapter", "load_finetuned"]),
    "model-config-malformed": (lambda m, t, o: tiny_tuner(_config_only(t, "{not json"), o, TEXT),
                               ModelSourceError, ["{tmp}/bad-config", "config"]),
    "model-without-weights": (lambda m, t, o: tiny_tuner(Path(_model_without_weights(m, t)), o, TEXT),
                              ModelSourceError, ["{tmp}/no-weights", ".safetensors", "safe_serialization=True"]),
    "data-file-missing": (lambda m, t, o: tiny_tuner(m, o, str(t / "train.jsonl")),
                          DataSourceError, ["data.source", "{tmp}/train.jsonl", "does not exist"]),
    "data-file-empty": (lambda m, t, o: tiny_tuner(m, o, _write(t / "e.jsonl", "")),
                        DataFormatError, ["data.source", "{tmp}/e.jsonl", "is empty", "at least one example"]),
    "no-rows": (lambda m, t, o: tiny_tuner(m, o, []), DataFormatError, ["data.source", "no rows"]),
    "bad-json-line": (lambda m, t, o: tiny_tuner(m, o, _write(t / "d.jsonl", '{"text": "ok"}\n{"text": "broken\n')),
                      DataFormatError, ["{tmp}/d.jsonl", "line 2", "fix or remove that line"]),
    "bad-json-array": (lambda m, t, o: tiny_tuner(m, o, _write(t / "d.json", '[{"text": "a"},\n\n {"text": }]')),
                       DataFormatError, ["{tmp}/d.json", "line 3", "fix or remove"]),
    "jsonl-line-not-an-object": (lambda m, t, o: tiny_tuner(m, o, _write(t / "d.jsonl", '{"text": "a"}\n[1, 2]\n')),
                                 DataFormatError, ["{tmp}/d.jsonl", "line 2", "JSON object"]),
    "unsupported-extension": (lambda m, t, o: tiny_tuner(m, o, _write(t / "d.txt", "hello")),
                              DataSourceError, ["{tmp}/d.txt", "'.txt'", ".jsonl"]),
    "dir-without-data": (lambda m, t, o: tiny_tuner(m, o, _empty_dir(t)),
                         DataSourceError, ["{tmp}/data-dir", "no [", ".parquet"]),
    "malformed-csv": (lambda m, t, o: tiny_tuner(m, o, _write(t / "d.csv", 'text\n"unterminated\n')),
                      DataFormatError, ["{tmp}/d.csv", "valid .csv"]),
    "missing-text-column": (lambda m, t, o: tiny_tuner(m, o, [{"body": "hello"}]).data(format="text"),
                            DataFormatError, ["'text'", "body", "data.text_field"]),
    "missing-alpaca-column": (lambda m, t, o: tiny_tuner(m, o, [{"instruction": "a"}]).data(format="alpaca"),
                              DataFormatError, ["data.format='alpaca'", "['output']", "instruction"]),
    "no-format-fits": (lambda m, t, o: tiny_tuner(m, o, [{"foo": "a"}]),
                       DataFormatError, ["data.format", "['foo']", "prompt/completion"]),
    "mixed-column-types": (lambda m, t, o: tiny_tuner(m, o, [{"text": "a"}, {"text": 3}]),
                           DataFormatError, ["data.source", "one type"]),
    "number-as-text": (lambda m, t, o: tiny_tuner(m, o, [{"text": 3}]), DataFormatError, ["'text'", "must hold text"]),
    "nothing-to-train": (lambda m, t, o: tiny_tuner(m, o, [{"instruction": "a" * 99, "output": "b"}])
                         .data(max_seq_length=16), DataFormatError, ["no example has a trained token",
                                                                      "max_seq_length"]),
    "eval-source-missing": (lambda m, t, o: tiny_tuner(m, o, TEXT).data(eval_source=str(t / "eval.jsonl")),
                            DataSourceError, ["data.eval_source", "{tmp}/eval.jsonl"]),
    "eval-fraction-of-one-row": (lambda m, t, o: tiny_tuner(m, o, TEXT).data(eval_fraction=0.5),
                                 DataFormatError, ["data.eval_fraction", "at least 2 examples"]),
    "max-seq-length-above-context": (lambda m, t, o: tiny_tuner(m, o, TEXT).data(max_seq_length=100_000),
                                     ConfigError, ["data.max_seq_length=100000", "4096", "<= 4096"]),
    "target-modules-match-nothing": (lambda m, t, o: tiny_tuner(m, o, TEXT).adapter(target_modules=["attn"]),
                                     TargetModulesError, ["adapter.target_modules", "['attn']", "qkv_proj"]),
    "modules-to-save-match-nothing": (lambda m, t, o: tiny_tuner(m, o, TEXT).adapter(modules_to_save=["head"]),
                                      TargetModulesError, ["adapter.modules_to_save", "['head']", "lm_head"]),
    "fp16-on-cpu": (lambda m, t, o: tiny_tuner(m, o, TEXT, precision="fp16"),
                    ConfigError, ["training.precision", "fp16", "fp32"]),
    "cuda-without-gpu": (lambda m, t, o: tiny_tuner(m, o, TEXT, device="cuda"),
                         ConfigError, ["training.device", "cuda", '"cpu"']),
    "completion-only-on-plain-text": (lambda m, t, o: tiny_tuner(m, o, TEXT).data(train_on="completion"),
                                      ConfigError, ["data.train_on", "guanaco"]),
    "output-dir-is-a-file": (lambda m, t, o: tiny_tuner(m, Path(_write(t / "out-file", "x")), TEXT),
                             OutputDirError, ["training.output_dir", "{tmp}/out-file", "is a file"]),
    "output-dir-under-a-file": (lambda m, t, o: tiny_tuner(m, Path(_write(t / "f", "x")) / "out", TEXT),
                                OutputDirError, ["training.output_dir", "{tmp}/f/out", "is a file"]),
}


def _config_only(tmp: Path, text: str) -> Path:
    d = tmp / "bad-config"
    d.mkdir()
    (d / "config.json").write_text(text)
    (d / "model.safetensors").write_bytes(b"")
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_weights_load(case, tiny_model, tmp_path, no_weights):
    if case == "cuda-without-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible")
    build, exc, names = CASES[case]
    out = tmp_path / "out"
    with pytest.raises(exc) as err:
        build(tiny_model, tmp_path, out).run()
    assert_helpful(err.value, *(n.replace("{tmp}", str(tmp_path)) for n in names))
    assert isinstance(err.value, (ValueError, FileNotFoundError))  # what a caller would already catch
    assert not out.exists(), "nothing is written before the inputs are checked"


@pytest.mark.parametrize("where", ["precision", "compute_dtype"])
def test_bf16_on_a_device_without_it(tiny_model, tmp_path, monkeypatch, no_weights, where):
    monkeypatch.setattr(phi3tune.precision, "bf16_supported", lambda device: False)
    ft = tiny_tuner(tiny_model, tmp_path / "out", TEXT)
    if where == "precision":
        ft.training(precision="bf16")
    else:
        ft.quantize(compute_dtype="bfloat16")
    with pytest.raises(ConfigError) as err:
        ft.run()
    field = 'training.precision="bf16"' if where == "precision" else 'quant.compute_dtype="bfloat16"'
    assert_helpful(err.value, field, "no bf16 support", '"auto"')
    assert not (tmp_path / "out").exists()


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create anything in. Root ignores permission bits, so as root use a
    filesystem that refuses new directories (sysfs); check that it really refuses."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d
    for candidate in (Path("/sys/kernel"), Path("/sys"), Path("/proc/self")):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return candidate
    pytest.skip("running as root and no filesystem here refuses writes")


def test_unwritable_output_dir(tiny_model, tmp_path, no_weights):
    parent = _read_only_dir(tmp_path)
    out = parent / "phi3tune-out"
    try:
        with pytest.raises(OutputDirError) as err:
            tiny_tuner(tiny_model, out, TEXT).run()
    finally:
        parent.chmod(0o755) if parent.is_relative_to(tmp_path) else None
    assert_helpful(err.value, "training.output_dir", str(out), "not writable", str(parent))
    assert not out.exists()


# ------------------------------------------------------------------------------------------- disk full
def _enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_a_checkpoint(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = ckpt.torch.save
    calls: list[Any] = []

    def second_save_fails(obj: Any, path: Any, *a: Any, **k: Any) -> None:
        calls.append(path)
        if len(calls) == 2:
            _enospc()
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", second_save_fails)
    ft = tiny_tuner(tiny_model, out, rows_of_text(8), batch_size=2, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(OutputDirError) as err:
        ft.run()
    assert_helpful(err.value, "training.output_dir", str(out), "disk full", "checkpoint-2", "resume=True")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]  # the previous one survives...
    assert ckpt.load_checkpoint(out / "checkpoint-1")[0]["step"] == 1  # ...complete and loadable
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "the partial copy is removed"
    monkeypatch.undo()  # space freed: the run resumes and finishes
    assert ft.run(resume=True).metrics["steps"] == 3


def test_disk_full_while_saving_the_final_adapter(tiny_model, tmp_path, monkeypatch):
    class FullDisk:  # phi3tune.pipeline writes the adapter's metadata with json.dumps: make that write fail
        @staticmethod
        def dumps(obj: Any, *a: Any, **k: Any) -> str:
            if isinstance(obj, dict) and "base_model" in obj:  # the adapter's phi3tune.json, not the plan
                _enospc()
            return json.dumps(obj, *a, **k)

    monkeypatch.setattr(phi3tune.pipeline, "json", FullDisk)
    out = tmp_path / "out"
    with pytest.raises(OutputDirError) as err:
        tiny_tuner(tiny_model, out, TEXT, save_strategy="steps", save_steps=1).run()
    assert_helpful(err.value, str(out), "disk full", "the final adapter")
    assert not (out / ckpt.FINAL_DIR).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    monkeypatch.undo()
    res = tiny_tuner(tiny_model, out, TEXT, save_strategy="steps", save_steps=1).run(resume=True)
    assert json.loads((res.adapter_dir / "phi3tune.json").read_text())["base_model"]

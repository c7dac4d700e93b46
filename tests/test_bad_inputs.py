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
    (lambda: DataSpec(source=None), "source", "give a data source"),
], ids=["lr-zero", "warmup-1", "optimizer", "precision", "save-limit-0", "alpha-negative", "empty-module-name",
        "compute-dtype", "empty-source", "list-of-strings", "seq-too-short", "eval-twice", "source-none"])
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
    # found by test_errors_property.py: "/" was walked file by file for its fingerprint, up to an unreadable entry
    "eval-source-root-dir": (lambda m, t, o: tiny_tuner(m, o, TEXT).data(eval_source="/"),
                             DataSourceError, ["data.eval_source", "'/'", "10,000 files", "give a data file"]),
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
    # issue 11: these used to fail after output_dir was claimed (a raw error, then the retry refused)
    "attn-implementation-misspelt": (lambda m, t, o: _with_attn(tiny_tuner(m, o, TEXT), "sdpaa"),
                                     ConfigError, ["attn_implementation='sdpaa'", "sdpa", "eager"]),
    "attn-implementation-not-installed": (lambda m, t, o: _with_attn(tiny_tuner(m, o, TEXT), "flash_attention_2"),
                                          ConfigError, ["attn_implementation='flash_attention_2'", "sdpa"]),
    "weights-truncated": (lambda m, t, o: tiny_tuner(_damaged_copy(m, t, "truncate"), o, TEXT),
                          ModelSourceError, ["{tmp}/damaged/model.safetensors", "damaged or incomplete", "again"]),
    "weights-of-another-config": (lambda m, t, o: tiny_tuner(_damaged_copy(m, t, "config"), o, TEXT),
                                  ModelSourceError, ["{tmp}/damaged/model.safetensors", "shape", "config.json"]),
    "shard-missing": (lambda m, t, o: tiny_tuner(_damaged_copy(m, t, "index"), o, TEXT),
                      ModelSourceError, ["{tmp}/damaged", "model-00002-of-00002.safetensors", "again"]),
    "eval-steps-without-eval-data": (lambda m, t, o: tiny_tuner(m, o, TEXT, eval_steps=2),
                                     ConfigError, ["training.eval_steps=2", "data.eval_fraction", "data.eval_source"]),
}


def _with_attn(ft: FineTuner, attn: str) -> FineTuner:
    ft.attn_implementation = attn
    return ft


def _damaged_copy(model: Path, tmp: Path, how: str) -> Path:
    """A copy of the tiny model with a truncated weight file, a config of another shape, or a missing shard."""
    import shutil

    d = tmp / "damaged"
    shutil.copytree(model, d)
    weights = d / "model.safetensors"
    if how == "truncate":  # an interrupted download
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "config":  # config.json of another size
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = cfg["intermediate_size"] * 2
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


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
    # the disk fills up while the final adapter's metadata is written (after the adapter weights)
    monkeypatch.setattr(phi3tune.pipeline, "write_adapter_meta", lambda *a, **k: _enospc())
    out = tmp_path / "out"
    with pytest.raises(OutputDirError) as err:
        tiny_tuner(tiny_model, out, TEXT, save_strategy="steps", save_steps=1).run()
    assert_helpful(err.value, str(out), "disk full", "the final adapter")
    assert not (out / ckpt.FINAL_DIR).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    monkeypatch.undo()
    res = tiny_tuner(tiny_model, out, TEXT, save_strategy="steps", save_steps=1).run(resume=True)
    assert json.loads((res.adapter_dir / "phi3tune.json").read_text())["base_model"]


# ------------------------------------------------------------------------------------------- issue 11
def test_a_run_that_failed_before_training_does_not_block_its_retry(tiny_model, tmp_path, monkeypatch):
    """Killed or failed while loading weights (after output_dir holds the run's config): the corrected retry,
    and a retry with resume=True and another configuration, both run."""
    out = tmp_path / "out"

    def fails(*_: Any, **__: Any) -> None:
        raise MemoryError("out of memory while loading")

    monkeypatch.setattr(phi3tune.model, "load_base_model", fails)
    with pytest.raises(MemoryError):
        tiny_tuner(tiny_model, out, TEXT).run()
    assert (out / ckpt.CONFIG_NAME).is_file()  # the claim is there...
    monkeypatch.undo()
    assert tiny_tuner(tiny_model, out, TEXT).adapter(r=4).run(resume=True).metrics["steps"] == 1  # ...and no block
    with pytest.raises(OutputDirError, match="already holds a run"):  # a run that trained is still protected
        tiny_tuner(tiny_model, out, TEXT).run()


@pytest.mark.parametrize("value,expected", [("false", False), ("False", False), ("no", False), (0, False),
                                            ("true", True), (True, True)])
def test_string_booleans_in_a_config_are_read_as_pydantic_reads_spec_fields(tiny_model, value, expected):
    assert FineTuner.from_config({"model": str(tiny_model), "trust_remote_code": value}).trust_remote_code is expected
    assert (FineTuner(tiny_model, quantized=value).quant is None) is not expected


@pytest.mark.parametrize("field", ["trust_remote_code", "quantized"])
def test_a_boolean_that_is_not_one_is_refused(tiny_model, field):
    with pytest.raises(ConfigError) as err:
        FineTuner(tiny_model, **{field: "maybe"})
    assert_helpful(err.value, field, "'maybe'", "true or false")


@pytest.mark.parametrize("section", ["training", "adapter", "data", "quant"])
def test_cli_set_of_a_whole_section_to_a_scalar(tiny_model, tmp_path, capsys, section):
    from phi3tune.cli import main

    config = FineTuner(tiny_model).training(output_dir=str(tmp_path / "o")).save_config(tmp_path / "run.yaml")
    assert main(["train", str(config), "--set", f"{section}=5"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config {section}:" in err and f"--set {section}.FIELD=VALUE" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config", [{"attn_implementation": 5}, {"model": None}, {"model": 3}, {1: 2, "x": 3}])
def test_config_values_of_the_wrong_type(config):
    with pytest.raises(ConfigError) as err:
        FineTuner.from_config(config)
    assert_helpful(err.value, str(next(iter(config))))


def test_demo_data_of_another_format_names_the_missing_column(tiny_model, tmp_path):
    from phi3tune.demo import run_demo

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    with pytest.raises(DataFormatError) as err:
        run_demo(tmp_path / "out", model=str(tiny_model), data=str(data), data_format="messages", say=lambda s: None)
    assert_helpful(err.value, "data.format='messages'", "messages|conversations", "prompt")


def test_a_loaded_model_object_is_refused_in_one_line(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(ConfigError) as err:
        FineTuner(model)
    msg = str(err.value)
    assert_helpful(err.value, "Phi3ForCausalLM", str(tiny_model), "save_pretrained")
    assert "\n" not in msg and len(msg) < 400


def test_builder_takes_what_dataspec_takes(tiny_model):
    from datasets import Dataset, DatasetDict

    dd = DatasetDict(train=Dataset.from_list(TEXT), test=Dataset.from_list(TEXT))
    ft = FineTuner(tiny_model).data(DataSpec(source=dd, eval_source=dd["test"])).data(max_seq_length=64)
    assert ft.data_spec.source is dd and ft.data_spec.eval_source is dd["test"]
    assert FineTuner(tiny_model, data=DataSpec(source=dd)).data_spec.source is dd
    assert FineTuner(tiny_model).data({"source": "d.jsonl"}).data_spec.source == "d.jsonl"  # a dict of fields


@pytest.mark.parametrize("call", ["data", "training", "adapter", "quantize"])
def test_builder_refuses_the_wrong_spec_in_one_line(tiny_model, call):
    with pytest.raises(ConfigError) as err:
        getattr(FineTuner(tiny_model), call)(TrainSpec() if call != "training" else DataSpec())
    assert_helpful(err.value, f".{call}()", "takes a")


# ---- chat messages: values silently misread
def _encode(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, str]:
    from phi3tune.data.formats import encode

    enc = encode({"messages": messages}, tokenizer, "messages", "completion", "text", 512)
    return tokenizer.decode(enc["input_ids"]), tokenizer.decode([t for t in enc["labels"] if t != -100])


@pytest.fixture(scope="module")
def char_tokenizer(tiny_model):
    from phi3tune.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


def test_openai_content_parts_are_trained_as_their_text(char_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}, {"role": "assistant", "content": "Hi"}]
    assert _encode(char_tokenizer, parts) == _encode(char_tokenizer, plain)
    assert "type" not in _encode(char_tokenizer, parts)[0]


@pytest.mark.parametrize("turn,names", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, ["'image_url' part",
                                                                                         "text only"]),
    ({"role": "user", "content": ["plain string part"]}, ["plain string part", '"type": "text"']),
    ({"role": "user", "content": {"text": "hi"}}, ["content must be text", "dict"]),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, ["tool and function calls"]),
    ({"role": "tool", "content": "42", "tool_call_id": "1"}, ["tool and function calls"]),
], ids=["image-part", "string-part", "dict-content", "tool-call", "tool-role"])
def test_message_shapes_that_are_not_text_are_refused(char_tokenizer, turn, names):
    messages = [turn, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataFormatError) as err:
        _encode(char_tokenizer, messages)
    assert_helpful(err.value, *names)


def test_a_conversation_opening_with_the_assistant_trains_no_role_marker(char_tokenizer):
    text, trained = _encode(char_tokenizer, [{"role": "assistant", "content": "Hi there"},
                                             {"role": "user", "content": "yo"},
                                             {"role": "assistant", "content": "ok"}])
    assert text.startswith("<|assistant|>\nHi there")
    assert trained == "Hi there<|end|>ok<|end|>"

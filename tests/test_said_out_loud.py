"""Nothing silently wrong: a run records what it trained on and refuses (naming the field) or says out loud
anything that changes what is trained."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import ROWS, kill_after, no_weights, resume_tuner, rows_of_text, tiny_tuner

from phi3tune import ConfigError, DataFormatError, OutputDirError
from phi3tune.data import load_source


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------------------------- resume
@pytest.fixture
def run_on_a_file(tiny_model, tmp_path):
    """A 2-step run (checkpoints 1, 2) on a .jsonl file and a copy of the tiny model."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"

    def tuner(**train: Any) -> Any:
        return tiny_tuner(model, out, str(data), **{"save_strategy": "steps", "save_steps": 1, "max_steps": 2,
                                                    **train})

    tuner().run()
    return tuner, model, data, out


def _edit_template(model: Path) -> None:
    jinja = model / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(jinja.read_text() + "{# edited #}")
    else:
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        cfg["chat_template"] += "{# edited #}"
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change", ["data", "chat_template", "none"])
def test_resume_refuses_other_data_or_template_naming_it(run_on_a_file, monkeypatch, change):
    tuner, model, data, out = run_on_a_file
    if change == "data":  # same path, same config: one row edited in place
        data.write_text(data.read_text().replace("copy", "kopy", 1))
    elif change == "chat_template":
        _edit_template(model)
    no_weights(monkeypatch)
    if change == "none":  # negative control: the check passes and the run goes on to load weights
        with pytest.raises(AssertionError, match="model weights were loaded"):
            tuner(max_steps=3).run(resume=True)
        return
    with pytest.raises(OutputDirError, match="differ from the run whose checkpoints") as err:
        tuner(max_steps=3).run(resume=True)
    named = {"data": "data.source", "chat_template": "chat template"}[change]
    assert named in str(err.value)
    assert json.loads((out / "phi3tune_manifest.json").read_text())["fingerprints"][change] in str(err.value)


def test_a_refused_resume_names_the_field_that_differs(reference, tiny_model, tmp_path, monkeypatch):
    out = kill_after(reference.output_dir, tmp_path / "run", 2)
    no_weights(monkeypatch)
    with pytest.raises(OutputDirError, match=r"adapter\.r: 8 in the checkpoints' run, 4 now"):
        resume_tuner(tiny_model, out).adapter(r=4).run(resume=True)


def test_resume_with_no_checkpoint_says_so(tiny_model, tmp_path, caplog):
    tiny_tuner(tiny_model, tmp_path / "new", rows_of_text(4)).run(resume=True)
    assert "resume=True: no complete checkpoint" in _warnings(caplog) and "step 0" in _warnings(caplog)


def test_resume_with_max_steps_below_the_checkpoint_is_refused(reference, tiny_model, tmp_path, monkeypatch):
    out = kill_after(reference.output_dir, tmp_path / "run", 4)
    no_weights(monkeypatch)
    with pytest.raises(ConfigError, match=r"training\.max_steps=2 is below the step of the checkpoint") as err:
        resume_tuner(tiny_model, out, max_steps=2).run(resume=True)
    assert "step 4" in str(err.value)


def test_extending_max_steps_follows_the_new_schedule_and_says_so(reference, tiny_model, tmp_path, caplog):
    def lrs(into: dict[int, float]) -> Any:
        return lambda e: into.__setitem__(e["step"], e["lr"])

    fresh: dict[int, float] = {}
    resume_tuner(tiny_model, tmp_path / "fresh", max_steps=12, save_strategy="no").run(callbacks=[lrs(fresh)])
    out = kill_after(reference.output_dir, tmp_path / "run", 4)
    resumed: dict[int, float] = {}
    resume_tuner(tiny_model, out, max_steps=12, save_strategy="no").run(resume=True, callbacks=[lrs(resumed)])
    said = _warnings(caplog)
    assert "now 12 steps (training.max_steps" in said and "checkpoint's was 8" in said and "at step 5" in said
    assert list(resumed) == list(range(5, 13))
    for step in resumed:  # the 12-step schedule from the first resumed step on: no step on the old one
        assert math.isclose(resumed[step], fresh[step], rel_tol=1e-9), step


# ------------------------------------------------------------------------------------------- data
def test_rows_with_different_keys_keep_every_field():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "context", "output": "d"}]
    ds = load_source(rows)
    assert ds[1]["input"] == "context" and ds[0]["input"] is None


def test_rows_of_different_formats_are_refused_naming_the_row():
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(DataFormatError, match=r"data\.source: row 2 has the keys \['messages'\]"):
        load_source(rows)


def test_many_truncated_examples_warn_naming_max_seq_length(tiny_model, tmp_path, monkeypatch, caplog):
    no_weights(monkeypatch)
    for length, warned in ((8, True), (128, False)):
        caplog.clear()
        with pytest.raises(AssertionError, match="model weights were loaded"):
            tiny_tuner(tiny_model, tmp_path / str(length), rows_of_text(20)).data(max_seq_length=length).run()
        assert ("data.max_seq_length=8" in _warnings(caplog)) is warned


def test_a_tokenizer_without_chat_template_is_a_data_format_error(tmp_path, monkeypatch):
    from phi3tune.tiny import build_char_tokenizer, write_tiny_phi3

    tok = build_char_tokenizer()
    tok.chat_template = None
    model = write_tiny_phi3(tmp_path / "m", tokenizer=tok)
    no_weights(monkeypatch)
    rows = [{"instruction": "say a", "output": "a"}] * 4
    with pytest.raises(DataFormatError, match=r"data\.format='alpaca' .* chat template") as err:
        tiny_tuner(model, tmp_path / "run", rows).run()
    assert 'data.format="text"' in str(err.value)


def test_a_step_without_trained_tokens_logs_no_loss(tiny_model, tmp_path, caplog):
    """An answer cut off by max_seq_length leaves its example nothing to train: such a step logs no loss of 0."""
    long = {"prompt": "p" * 80, "completion": "c"}
    short = {"prompt": "p", "completion": "cc"}
    res = tiny_tuner(tiny_model, tmp_path / "run", [long, short, long, short], batch_size=1, max_steps=4,
                     logging_steps=1).data(max_seq_length=32).run()
    empty = [h for h in res.history if h.get("trained_tokens") == 0]
    assert len(empty) == 2 and all("loss" not in h and "no trained tokens" in h["note"] for h in empty)
    assert len(res.losses) == 2 and all(x > 0 for x in res.losses)
    assert _warnings(caplog).count("no trained tokens") == 2


# ------------------------------------------------------------------------------------------- using an adapter
def test_a_checkpoint_loads_like_the_final_adapter_and_the_load_says_what(reference, caplog):
    import bitsandbytes as bnb

    from phi3tune import load_finetuned

    loaded = load_finetuned(reference.output_dir / "checkpoint-4", device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())  # 4-bit, as it was trained
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "(checkpoint of step 4)" in said and "quantized 4-bit as trained" in said


@pytest.mark.parametrize("init", ["olora", "pissa_niter_4"])
def test_split_export_of_an_adapter_whose_init_rewrote_the_base_is_refused(tmp_path, init):
    from phi3tune import export_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "init_lora_weights": init, "base_model_name_or_path": str(tmp_path / "nowhere"),
         "target_modules": ["qkv_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"init_lora_weights='{init}': that init rewrites the base"):
        export_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- the plan
def _micro_batches(plan: Any, lengths: list[list[int]]) -> list[Any]:
    """The micro-batches the plan's ``MicroBatcher`` makes of steps whose loader batches hold examples of these
    lengths."""
    import torch

    from phi3tune.batching import Collator, MicroBatcher

    flat = Collator(0, padding_free=True)
    out = []
    for step in lengths:
        rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in step]
        out += MicroBatcher.of(plan, pad_id=0)([flat(rows)])
    assert all(isinstance(b["input_ids"], torch.Tensor) for b in out)
    return out


def test_a_small_step_is_not_padded_up_to_the_budget(tiny_model):
    from phi3tune.bench import plan_for
    from phi3tune.plan import token_buckets

    assert token_buckets(4096, 64, 64) == (16, 32, 48, 64)  # 1 sequence of <= 64 tokens a step
    assert token_buckets(4096, 512, 16 * 512) == (1024, 2048, 3072, 4096)  # a step that can fill the budget
    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4), batch_size=1, grad_accum=1, optimize_for="speed")
    plan = plan_for(ft.data(max_seq_length=64), "cpu")
    widths = [int(b["input_ids"].shape[1]) for b in _micro_batches(plan, [[30], [5], [64]])]
    assert widths == [32, 16, 64] and plan.micro_batch_tokens == 4096 and "<= 64 tokens" in plan.describe()


def test_the_plan_states_the_micro_batch_sizes_the_run_makes(tiny_model):
    """micro_batch_tokens below max_seq_length: a longer example is a micro-batch of its own, and the plan says
    so (line and phi3tune_plan.json), instead of promising micro-batches it does not make."""
    from phi3tune.bench import plan_for

    ft = tiny_tuner(tiny_model, "unused", rows_of_text(4), optimize_for="speed", micro_batch_tokens=128)
    plan = plan_for(ft.data(max_seq_length=512), "cpu")
    widths = [int(b["input_ids"].shape[1]) for b in _micro_batches(plan, [[300, 20], [500], [60, 60]])]
    assert max(widths) > 128 and max(widths) <= plan.peak_micro_batch_tokens == plan.to_dict()["token_buckets"][-1]
    assert "<= 128 tokens (training.micro_batch_tokens), or one example of up to 512 (data.max_seq_length)" in \
        plan.to_dict()["summary"]

"""Saves: checkpoints, the final adapter in plain-PEFT format, load_finetuned, output-dir protection."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import rows_of_text, tiny_tuner

from phi3tune import FineTuner, OutputDirError, load_finetuned


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "results"
    ft = tiny_tuner(tiny_model, out, rows_of_text(24), batch_size=2, grad_accum=2, max_steps=4,
                    save_strategy="steps", save_steps=2, learning_rate=5e-3)
    ft.adapter(dropout=0.1).data(eval_fraction=0.25)
    return ft, ft.run()


def _probe(tokenizer):
    return tokenizer(["### Human: copy abc ### Assistant: abc"], return_tensors="pt").input_ids


def test_layout_of_outputs(run):
    _, res = run
    out = res.output_dir
    assert res.adapter_dir == out / "final_checkpoint"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "phi3tune.json"):
        assert (res.adapter_dir / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ck in out.glob("checkpoint-*"):
        assert (ck / "adapter_model.safetensors").is_file() and (ck / "trainer_state.json").is_file()
    assert (out / "phi3tune_config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    assert not list(out.glob(".*"))  # no temporary directories left behind


def test_written_config_rebuilds_the_run(run):
    ft, res = run
    back = FineTuner.from_config(res.output_dir / "phi3tune_config.yaml")
    assert back.adapter_spec == ft.adapter_spec and back.train_spec == ft.train_spec


def test_eval_metrics_in_history_and_result(run):
    _, res = run
    evals = [h for h in res.history if "eval_loss" in h]
    assert evals and evals[-1]["step"] == 4
    assert res.metrics["eval_perplexity"] == pytest.approx(torch.exp(torch.tensor(res.metrics["eval_loss"])).item())


def test_plain_peft_round_trip_gives_identical_logits(run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from phi3tune.model import pin_4bit_cpu_kernel

    _, res = run
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], quantization_config=bnb,
                                                dtype=torch.float32)
    # On AVX512-BF16 CPUs bitsandbytes switches 4-bit layers to another kernel in eval mode (~1e-2 apart);
    # the same switch turned off as in training, so the comparison is about the adapter (tests/test_cpu_kernel.py)
    pin_4bit_cpu_kernel(base)
    plain = PeftModel.from_pretrained(base, str(res.adapter_dir)).eval()
    ids = _probe(res.tokenizer)
    with torch.no_grad():
        ours = res.model(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with plain.disable_adapter(), torch.no_grad():
        bare = plain(input_ids=ids).logits
    assert (bare - ours).abs().max() > 1e-4  # the adapter really changed the model


def test_load_finetuned_matches(run):
    _, res = run
    loaded = load_finetuned(res.adapter_dir)
    ids = _probe(loaded.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, res.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert loaded.tokenizer.eos_token == res.tokenizer.eos_token


def test_refuses_to_overwrite_a_run_before_loading_anything(run, tiny_model):
    ft, res = run
    before = (res.adapter_dir / "adapter_model.safetensors").read_bytes()
    t = time.perf_counter()
    with pytest.raises(OutputDirError, match="already holds a run") as err:
        ft.run()
    assert time.perf_counter() - t < 5 and "overwrite" in str(err.value) and "resume" in str(err.value)
    assert (res.adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_replaces_only_run_artifacts(tiny_model, tmp_path):
    out = tmp_path / "o"
    tiny_tuner(tiny_model, out, rows_of_text(4), save_strategy="steps", save_steps=1, max_steps=2).run()
    (out / "notes.txt").write_text("mine")
    res = tiny_tuner(tiny_model, out, rows_of_text(4), max_steps=1).run(overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob("checkpoint-*"))  # the old run's checkpoints are gone with it
    assert len(res.history) == 1

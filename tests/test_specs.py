"""Specs: classic-recipe defaults, validation, builder, config round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from phi3tune import AdapterSpec, ConfigError, DataSpec, FineTuner, QuantSpec, TrainSpec
from phi3tune.data import load_source
from phi3tune.errors import DataSourceError


def test_defaults_are_the_classic_recipe():
    q, a, d, t = QuantSpec(), AdapterSpec(), DataSpec(), TrainSpec()
    assert (q.bits, q.quant_type, q.double_quant) == (4, "nf4", False)
    assert (a.r, a.alpha, a.dropout, a.target_modules, a.bias) == (64, 16, 0.1, "auto", "none")
    assert (d.source, d.text_field, d.max_seq_length, d.packing) == (
        "timdettmers/openassistant-guanaco", "text", 512, False)
    assert (t.batch_size, t.grad_accum, t.optimizer, t.learning_rate, t.lr_scheduler, t.max_steps) == (
        4, 4, "paged_adamw_32bit", 2e-4, "cosine", 100)
    assert t.output_dir == "./results"
    assert FineTuner().model == "microsoft/Phi-3-mini-4k-instruct"


@pytest.mark.parametrize("cls,kwargs,field", [
    (QuantSpec, {"bits": 3}, "bits"),
    (QuantSpec, {"quant_type": "int4"}, "quant_type"),
    (AdapterSpec, {"dropout": 1.5}, "dropout"),
    (AdapterSpec, {"r": 0}, "r"),
    (AdapterSpec, {"target_modules": []}, "target_modules"),
    (DataSpec, {"max_seq_length": 0}, "max_seq_length"),
    (DataSpec, {"eval_fraction": 1.0}, "eval_fraction"),
    (DataSpec, {"source": 3.5}, "source"),
    (TrainSpec, {"batch_size": 0}, "batch_size"),
    (TrainSpec, {"lr_scheduler": "exp"}, "lr_scheduler"),
    (TrainSpec, {"learnig_rate": 1e-4}, "learnig_rate"),
])
def test_invalid_values_raise_validation_error_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert field in str(info.value)


def test_save_steps_required_for_steps_strategy():
    with pytest.raises(ValidationError, match="save_steps"):
        TrainSpec(save_strategy="steps")


def test_builder_validates_at_once_and_chains():
    ft = FineTuner("some/model")
    assert ft.adapter(r=16) is ft
    assert ft.adapter_spec.r == 16 and ft.adapter_spec.alpha == 16
    ft.adapter(alpha=32)
    assert (ft.adapter_spec.r, ft.adapter_spec.alpha) == (16, 32)  # kwargs update the current spec
    with pytest.raises(ValidationError):
        ft.training(batch_size=-1)
    assert ft.quantize(None).quant is None
    assert ft.quantize(bits=8).quant == QuantSpec(bits=8)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    ft = (FineTuner("org/model").quantize(QuantSpec(compute_dtype="float16"))
          .adapter(target_modules=["qkv_proj"]).data(source="x.jsonl", packing=True)
          .training(max_steps=7, save_strategy="no"))
    path = ft.save_config(tmp_path / f"run{suffix}")
    back = FineTuner.from_config(path)
    assert back.to_config() == ft.to_config()
    assert FineTuner.from_config(ft.to_config()).to_config() == ft.to_config()
    plain = FineTuner("org/model").quantize(None)
    assert FineTuner.from_config(plain.to_config()).quant is None


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        FineTuner.from_config({"model": "m", "trainig": {}})
    with pytest.raises(ConfigError, match="does not exist"):
        FineTuner.from_config(tmp_path / "nope.yaml")
    # rows given in memory are recorded by fingerprint; the config loads, and preparing it says to give them again
    back = FineTuner.from_config(FineTuner().data(source=[{"text": "a"}]).to_config())
    with pytest.raises(DataSourceError, match=r"in memory.*\.data\(source=\.\.\.\)"):
        load_source(back.data_spec.source)

"""Specs are protocols: user specs plug into FineTuner, round-trip through config files by import path, and
optimizers / schedules are named freely but checked at once."""

from __future__ import annotations

import json

import plugin_specs
import pytest
import torch
from helpers import rows_of_text, tiny_tuner
from plugin_specs import FP4Quant, QkvOnlyAdapter
from pydantic import ValidationError

from phi3tune import AdapterSpec, ConfigError, FineTuner, QuantSpec, TrainSpec


def test_user_quant_and_adapter_specs_drive_the_run(tiny_model, tmp_path):
    plugin_specs.CALLS.clear()
    ft = tiny_tuner(tiny_model, tmp_path / "out", rows_of_text(8)).quantize(FP4Quant()).adapter(QkvOnlyAdapter(r=4))
    res = ft.run()
    assert plugin_specs.CALLS.count("quantization_config") == 1 and "peft_config" in plugin_specs.CALLS
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["r"]) == (["qkv_proj"], 4)  # built-in "auto" would target all four
    layer = res.model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer
    assert layer.weight.quant_type == "fp4"  # the built-in QuantSpec default is nf4
    meta = json.loads((res.adapter_dir / "phi3tune.json").read_text())
    assert meta["quant"]["class"] == "plugin_specs:FP4Quant"
    from phi3tune import load_finetuned

    loaded = load_finetuned(res.adapter_dir)  # rebuilds the plugin quant spec from its import path
    assert loaded.model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer.weight.quant_type == "fp4"


def test_builder_keeps_a_subclass_and_keywords_update_it():
    ft = FineTuner().quantize(FP4Quant(bits=4)).quantize(double_quant=True)
    assert type(ft.quant) is FP4Quant and ft.quant.double_quant
    ft.quantize(QuantSpec())
    assert type(ft.quant) is QuantSpec
    with pytest.raises(ConfigError, match="keyword arguments need a pydantic spec"):
        FineTuner().adapter(QkvOnlyAdapter()).adapter(r=8)


def test_plugin_specs_round_trip_through_a_config_file(tmp_path):
    ft = FineTuner("some/model").quantize(FP4Quant(double_quant=True)).adapter(QkvOnlyAdapter(r=2))
    cfg = ft.to_config()
    assert cfg["quant"]["class"] == "plugin_specs:FP4Quant" and cfg["adapter"]["class"] == "plugin_specs:QkvOnlyAdapter"
    assert "class" not in FineTuner().to_config()["quant"]  # built-in specs are written as before
    back = FineTuner.from_config(ft.save_config(tmp_path / "run.yaml"))
    assert back.quant == ft.quant and type(back.quant) is FP4Quant
    assert back.adapter_spec == QkvOnlyAdapter(r=2)


@pytest.mark.parametrize(("path", "says"), [
    ("no_such_pkg.specs:Q", "cannot import module 'no_such_pkg.specs'"),
    ("plugin_specs:Missing", "module 'plugin_specs' has no attribute 'Missing'"),
    ("plugin_specs:CALLS", "is not a class"),
    ("plugin_specs:NotASpec", "NotASpec is not a QuantizationSpec"),
    ("plugin_specs:QkvOnlyAdapter", "is not a QuantizationSpec"),
    ("no-colon", "is not an import path"),
])
def test_a_wrong_plugin_path_is_one_clear_config_error(path, says):
    with pytest.raises(ConfigError, match=r"quant\.class") as info:
        FineTuner.from_config({"model": "m", "quant": {"class": path}})
    assert says in str(info.value)


def test_an_object_that_is_no_spec_is_refused_at_once():
    with pytest.raises(ConfigError, match=r"adapter: NotASpec is not a AdapterConfigSpec \(missing \['peft_config', "
                                          r"'target_modules'\]\)"):
        FineTuner().adapter(plugin_specs.NotASpec())  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "cls"), [
    ("adamw_torch", "AdamW"), ("SGD", "SGD"), ("adagrad", "Adagrad"), ("Lion8bit", "Lion8bit"),
    ("paged_adamw_8bit", "AdamW8bit"), ("torch.optim:RMSprop", "RMSprop"),
])
def test_any_torch_or_bitsandbytes_optimizer_by_name(name, cls):
    spec = TrainSpec(optimizer=name, learning_rate=0.1)
    opt = spec.create_optimizer(None, [torch.nn.Parameter(torch.ones(4))], torch.device("cpu"))
    assert type(opt).__name__ == cls and opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"optimizer": "adamw_trch"}, "training.optimizer='adamw_trch' is no optimizer; use"),
    ({"optimizer": "SGD", "optimizer_kwargs": {"momentun": 0.9}}, "SGD takes no ['momentun']; it takes"),
    ({"lr_scheduler": "cosine_min"}, "is no transformers schedule; use"),
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "needs an evaluation metric"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "needs lr_scheduler_kwargs ['min_lr or min_lr_rate']"),
    ({"lr_scheduler": "warmup_stable_decay"}, "needs lr_scheduler_kwargs ['num_decay_steps']"),
    ({"lr_scheduler": "cosine", "lr_scheduler_kwargs": {"min_lr": 0.1}}, "'cosine' takes no ['min_lr']"),
    ({"loraplus_lr_ratio": 0.5}, "loraplus_lr_ratio"),
])
def test_bad_optimizer_or_schedule_fails_when_the_spec_is_built(kwargs, says):
    with pytest.raises(ValidationError) as info:
        TrainSpec(**kwargs)
    assert says in str(info.value)


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}, [1.0, 0.868, 0.55, 0.232, 0.1]),  # plain cosine ends at 0
    ("warmup_stable_decay", {"num_decay_steps": 2, "min_lr_ratio": 0.2}, [1.0, 1.0, 1.0, 0.6, 0.2]),
])
def test_schedules_users_reach_for(name, kwargs, expected):
    spec = TrainSpec(lr_scheduler=name, lr_scheduler_kwargs=kwargs, learning_rate=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = spec.create_scheduler(opt, 0, 4)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected, abs=1e-3)


def test_optimizer_kwargs_reach_the_run_and_the_config(tiny_model, tmp_path):
    ft = tiny_tuner(tiny_model, tmp_path / "out", rows_of_text(8), optimizer="SGD",
                    optimizer_kwargs={"momentum": 0.9}, lr_scheduler="warmup_stable_decay",
                    lr_scheduler_kwargs={"num_decay_steps": 1}, max_steps=2)
    res = ft.run()
    assert [h["lr"] for h in res.history] == pytest.approx([1e-3, 1e-3])
    back = FineTuner.from_config(res.output_dir / "phi3tune_config.yaml")
    assert back.train_spec.optimizer_kwargs == {"momentum": 0.9} and back.train_spec == ft.train_spec


def test_adapter_spec_yields_the_peft_config():
    cfg = AdapterSpec(r=8, use_dora=True, init="gaussian").peft_config(["qkv_proj"])
    assert (cfg.r, cfg.use_dora, cfg.init_lora_weights, sorted(cfg.target_modules)) == (8, True, "gaussian",
                                                                                         ["qkv_proj"])

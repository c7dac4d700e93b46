"""Model loading (4/8-bit, unquantized), target-module resolution, preflight errors."""

from __future__ import annotations

import logging

import pytest
import torch

from phi3tune import AdapterSpec, ConfigError, ModelSourceError, QuantSpec, TargetModulesError
from phi3tune.model import attach_adapter, load_base_model, preflight_model, resolve_precision, resolve_target_modules

PHI3_LAYERS = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_auto_targets_phi3_fused_layers(tiny_model):
    info = preflight_model(tiny_model)
    assert sorted(info.linear_layers) == PHI3_LAYERS  # lm_head excluded
    assert sorted(resolve_target_modules(AdapterSpec(), info.linear_layers)) == PHI3_LAYERS


def test_classic_names_map_to_fused_layers_with_warning(tiny_model, caplog):
    info = preflight_model(tiny_model)
    classic = AdapterSpec(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    with caplog.at_level(logging.WARNING, logger="phi3tune"):
        got = resolve_target_modules(classic, info.linear_layers)
    assert got == ["qkv_proj", "o_proj", "gate_up_proj"]
    assert "q_proj" in caplog.text and "qkv_proj" in caplog.text


def test_unknown_target_lists_the_models_linear_layers(tiny_model):
    info = preflight_model(tiny_model)
    with pytest.raises(TargetModulesError) as err:
        resolve_target_modules(AdapterSpec(target_modules=["query_key_value"]), info.linear_layers)
    msg = str(err.value)
    assert "query_key_value" in msg and all(name in msg for name in PHI3_LAYERS)
    assert isinstance(err.value, ValueError)


def test_missing_model_path_and_non_model_dir(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist") as err:
        preflight_model(tmp_path / "no-such-model")
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        preflight_model(tmp_path / "empty")


def test_unreachable_hub_id_says_to_use_a_local_dir():
    with pytest.raises(ModelSourceError, match="local directory"):
        preflight_model("nobody-here/phi3-does-not-exist")


def test_precision_resolution_and_errors():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_load_is_kbit_and_adapters_are_fp32(tiny_model, bits):
    import bitsandbytes as bnb

    info = preflight_model(tiny_model)
    model = load_base_model(info, QuantSpec(bits=bits), torch.float32, torch.device("cpu"))
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    peft_model = attach_adapter(model, AdapterSpec(r=4), ["qkv_proj", "o_proj"])
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())


def test_unquantized_base_trains_plain_lora(tiny_model):
    info = preflight_model(tiny_model)
    model = load_base_model(info, None, torch.float16, torch.device("cpu"))
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    peft_model = attach_adapter(model, AdapterSpec(r=4), ["down_proj"])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    # fp16 base, fp32 adapters: what a grad scaler needs (the classic recipe crashes here)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.float16

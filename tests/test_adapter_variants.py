"""Adapter variants through PEFT: DoRA, OLoRA / PiSSA inits, LoRA+. Each trains, saves, and reloads in plain PEFT
with equal logits; inits PEFT cannot do on the base are refused before any weights load."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapter_tensors, rows_of_text, tiny_tuner

from phi3tune import ConfigError


def _plain_base(path: str, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
    from phi3tune.model import pin_4bit_cpu_kernel

    # as phi3tune pins its own models: no AVX512-BF16 repack on the first eval forward
    return pin_4bit_cpu_kernel(AutoModelForCausalLM.from_pretrained(path, **kwargs)).eval()


def _round_trip(res, quantized: bool) -> None:
    """Plain PEFT on a freshly loaded base gives our trained model's logits; and the adapter changed the model."""
    from peft import PeftModel

    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    ids = res.tokenizer(["### Human: copy abc ### Assistant: abc"], return_tensors="pt").input_ids
    plain = PeftModel.from_pretrained(_plain_base(cfg["base_model_name_or_path"], quantized),
                                      str(res.adapter_dir)).eval()
    res.model.eval()
    with torch.no_grad():
        ours, theirs = res.model(input_ids=ids).logits, plain(input_ids=ids).logits
        bare = _plain_base(cfg["base_model_name_or_path"], quantized)(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (bare - ours).abs().max() > 1e-4  # negative control: the adapter (and its init) changed the model


@pytest.mark.parametrize(("adapter", "quantized", "config_key", "config_value"), [
    ({"use_dora": True}, True, "use_dora", True),
    ({"init": "olora"}, True, "init_lora_weights", "olora"),
    ({"init": "pissa"}, False, "init_lora_weights", "pissa"),
])
def test_variant_trains_saves_and_reloads_in_plain_peft(tiny_model, tmp_path, adapter, quantized, config_key,
                                                        config_value):
    ft = tiny_tuner(tiny_model, tmp_path / "out", rows_of_text(12), max_steps=2, learning_rate=5e-3).adapter(**adapter)
    if not quantized:
        ft.quantize(None)
    res = ft.run()
    assert all(torch.isfinite(torch.tensor(res.losses)))
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert cfg[config_key] == config_value
    if adapter.get("use_dora"):
        assert any("lora_magnitude_vector" in k for k in adapter_tensors(res))
    _round_trip(res, quantized)


def test_loraplus_gives_lora_b_a_higher_learning_rate(tiny_model, tmp_path):
    """Adam's first step moves each weight by ~lr: lora_B (zero at init) ends at ~ratio x lr, lora_A moves ~lr."""
    lr, ratio = 1e-3, 16.0
    res = tiny_tuner(tiny_model, tmp_path / "out", rows_of_text(8), learning_rate=lr, loraplus_lr_ratio=ratio,
                     lr_scheduler="constant").run()
    b = max(float(t.abs().max()) for k, t in adapter_tensors(res).items() if "lora_B" in k)
    assert b == pytest.approx(ratio * lr, rel=0.1)  # plain LoRA would give ~lr (1e-3)
    _round_trip(res, quantized=True)


@pytest.mark.parametrize(("init", "quantized", "says"), [
    ("pissa", True, "unquantized base"),
    ("orthogonal", True, "unquantized base"),
    ("loftq", True, "CUDA"),
    ("loftq", False, "4-bit base"),
])
def test_init_the_base_cannot_take_is_refused_before_weights_load(tiny_model, tmp_path, monkeypatch, init,
                                                                  quantized, says):
    import phi3tune.model

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(phi3tune.model, "load_base_model", no_weights)
    ft = tiny_tuner(tiny_model, tmp_path / "out", rows_of_text(4)).adapter(init=init)
    if not quantized:
        ft.quantize(None)
    with pytest.raises(ConfigError, match=rf"adapter\.init='{init}' needs .*{says}.*use one of \["):
        ft.run()


def test_dora_with_loftq_is_refused(tiny_model, tmp_path):
    from phi3tune.adapters import check_init
    from phi3tune.specs import AdapterSpec, QuantSpec

    with pytest.raises(ConfigError, match="use_dora"):
        check_init(AdapterSpec(init="loftq", use_dora=True), QuantSpec(), "cuda")
    check_init(AdapterSpec(init="olora", use_dora=True), QuantSpec(), "cpu")  # a combination that works

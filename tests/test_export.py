"""phi3tune export --layout split: an equivalent adapter for engines with separate q/k/v and gate/up layers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from split_layout import to_llama, to_split_phi3

from phi3tune import ConfigError, ModelSourceError, OutputDirError, export_adapter
from phi3tune.cli import main
from phi3tune.export import _rename

LAYERS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SPLIT = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def fused_base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def strong_adapter(tiny_model, tmp_path_factory):
    """Random A and B (far from zero) on every fused layer, with a per-layer rank: its effect is large."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LAYERS, init_lora_weights=False,
                     rank_pattern={"qkv_proj": 4}, alpha_pattern={"gate_up_proj": 32})
    out = tmp_path_factory.mktemp("strong") / "adapter"
    get_peft_model(base, cfg).save_pretrained(out)
    from phi3tune.model import load_tokenizer

    load_tokenizer(str(tiny_model)).save_pretrained(out)
    (out / "phi3tune.json").write_text(json.dumps({"base_model": str(tiny_model), "quant": None}))
    return out


def _logits(base, adapter, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
    model.unload()  # the base module back as it was, for the next comparison
    return adapted, bare


IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 12, 7, 33]])


@pytest.mark.parametrize("engine", ["llama", "split_phi3"])
def test_split_adapter_on_a_split_base_gives_the_fused_logits(fused_base, strong_adapter, tmp_path, engine):
    out = export_adapter(strong_adapter, tmp_path / "split", layout="split", served_base="me/phi3-llamafied")
    want, bare = _logits(fused_base, strong_adapter, IDS)
    split_base = to_llama(fused_base) if engine == "llama" else to_split_phi3(fused_base)
    assert not any("qkv_proj" in n or "gate_up" in n for n, _ in split_base.named_modules())
    got, split_bare = _logits(split_base, out, IDS)
    torch.testing.assert_close(split_bare, bare, rtol=1e-5, atol=1e-5)  # the split base is the same model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - bare).abs().max() > 0.1  # the adapter matters, so the comparison can fail


def test_exported_files_and_config(strong_adapter, tmp_path):
    from safetensors.torch import load_file

    out = export_adapter(strong_adapter, tmp_path / "split", layout="split", served_base="me/phi3-llamafied")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == SPLIT and cfg["base_model_name_or_path"] == "me/phi3-llamafied"
    assert cfg["rank_pattern"] == {"q_proj": 4, "k_proj": 4, "v_proj": 4}
    assert cfg["alpha_pattern"] == {"gate_proj": 32, "up_proj": 32}
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "tokenizer_config.json", "phi3tune_export.json"} <= files
    assert "phi3tune.json" not in files  # it names the fused base, which load_finetuned would pick
    old = load_file(str(strong_adapter / "adapter_model.safetensors"))
    new = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
    for part in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(new[key.format(part, "A")], old[key.format("qkv_proj", "A")])  # A shared
    b = torch.cat([new[key.format(p, "B")] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(b, old[key.format("qkv_proj", "B")])  # B cut by rows, in q, k, v order
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in new)
    assert len(new) == len(old) + 2 * (4 + 2)  # per layer: qkv's A/B pair becomes 3 pairs, gate_up's 2 pairs
    assert json.loads((out / "phi3tune_export.json").read_text())["split"]["gate_up_proj"] == ["gate_proj", "up_proj"]


def test_a_wrong_slice_order_would_be_caught(fused_base, strong_adapter, tmp_path):
    """Negative control: swap k and v of one layer in the exported file; the logits must then differ."""
    from safetensors.torch import load_file, save_file

    out = export_adapter(strong_adapter, tmp_path / "split", layout="split")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    k, v = (f"base_model.model.model.layers.0.self_attn.{p}.lora_B.weight" for p in ("k_proj", "v_proj"))
    tensors[k], tensors[v] = tensors[v], tensors[k]
    save_file(tensors, str(out / "adapter_model.safetensors"))
    want, _ = _logits(fused_base, strong_adapter, IDS)
    got, _ = _logits(to_llama(fused_base), out, IDS)
    assert (got - want).abs().max() > 1e-3


def _edited(adapter, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["qkv_proj"]}, r"modules_to_save \['qkv_proj'\] are fused layers"),
    ({"target_modules": r".*\.(qkv_proj|o_proj)"}, "regular expression"),
    ({"peft_type": "IA3"}, "only LoRA"),
])
def test_refuses_what_cannot_be_split(strong_adapter, tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        export_adapter(_edited(strong_adapter, tmp_path, **changes), tmp_path / "out", layout="split")
    assert not (tmp_path / "out").exists()


def test_errors_name_what_to_change(strong_adapter, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"layout='fused'; use one of \['split'\]"):
        export_adapter(strong_adapter, tmp_path / "o", layout="fused")
    with pytest.raises(ModelSourceError, match=r"no adapter_config\.json"):
        export_adapter(tiny_model, tmp_path / "o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(OutputDirError, match="overwrite=True"):
        export_adapter(strong_adapter, tmp_path / "full")
    other = tmp_path / "wider-base"  # a base of another shape: the B rows do not add up
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="output rows but the base config gives gate_up_proj"):
        export_adapter(strong_adapter, tmp_path / "o2", base_model=str(other))


def test_rename_keeps_other_names():
    assert _rename(["qkv_proj", "o_proj"], "t") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert _rename({"model.layers.0.mlp.gate_up_proj": 2, "o_proj": 3}, "r") == {
        "model.layers.0.mlp.gate_proj": 2, "model.layers.0.mlp.up_proj": 2, "o_proj": 3}
    assert _rename("all-linear", "t") == "all-linear"


def test_cli_export(strong_adapter, tiny_model, tmp_path, capsys):
    assert main(["export", str(strong_adapter), str(tmp_path / "s"), "--layout", "split"]) == 0
    assert "exported adapter (split layout)" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == SPLIT and cfg["base_model_name_or_path"] == str(tiny_model)
    assert main(["export", str(strong_adapter), str(tmp_path / "s"), "--layout", "split"]) == 1  # not empty
    assert main(["export", str(strong_adapter), str(tmp_path / "t")]) == 2  # --layout (or --format gguf) is required
    assert not (tmp_path / "t").exists()

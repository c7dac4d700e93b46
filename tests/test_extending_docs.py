"""docs/extending.md runs: its plugin code becomes a module, its usage block trains a tiny Phi-3 with every plugin,
its YAML loads them back by import path."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from phi3tune import FineTuner, PreparedData, prepare_dataset
from phi3tune.data.registry import unregister_format

DOC = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
BLOCKS = re.findall(r"```(python|yaml)\n(.*?)```", DOC, re.S)
USAGE = [code for lang, code in BLOCKS if lang == "python" and code.startswith("from my_plugins")]
DEFINITIONS = [code for lang, code in BLOCKS if lang == "python" and not code.startswith("from my_plugins")]
CONFIG = next(code for lang, code in BLOCKS if lang == "yaml")


@pytest.fixture(scope="module")
def my_plugins(tmp_path_factory):
    """The page's plugin code as an importable module, as a user's package would be."""
    where = tmp_path_factory.mktemp("plugins")
    (where / "my_plugins.py").write_text("\n\n".join(DEFINITIONS))
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("my_plugins")
    finally:
        sys.path.remove(str(where))
        sys.modules.pop("my_plugins", None)
        for name in ("qa", "my_plugins:qa"):
            unregister_format(name)


@pytest.fixture(scope="module")
def usage_run(my_plugins, tiny_model, tmp_path_factory):
    assert len(USAGE) == 1 and len(DEFINITIONS) == 5
    namespace = {"base": str(tiny_model), "out": str(tmp_path_factory.mktemp("usage") / "out")}
    exec(compile(USAGE[0], "extending.md", "exec"), namespace)
    return namespace["result"]


def test_usage_block_trains_with_every_plugin(usage_run):
    res = usage_run
    assert res.metrics["steps"] == 2 and all(loss == loss for loss in res.losses)  # finite, not NaN
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3"  # the adapter plugin, not LoRA
    layer = res.model.get_base_model().model.layers[0].self_attn
    assert type(layer.o_proj.base_layer).__name__ == "Linear"  # kept unquantized by PartlyQuantized
    assert type(layer.qkv_proj.base_layer).__name__ == "Linear4bit"
    assert res.config["training"]["class"] == "my_plugins:NesterovSGD"
    assert res.config["data"]["format"] == "qa"


def test_optimizer_plugin_builds_its_groups(my_plugins):
    import torch

    spec = my_plugins.NesterovSGD(weight_decay=0.1)
    params = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]
    opt = spec.create_optimizer(None, params, torch.device("cpu"))
    assert opt.defaults["nesterov"] and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_format_plugin_masks_like_prompt_completion(my_plugins, tiny_model):
    from phi3tune import DataSpec
    from phi3tune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    rows = [{"question": "copy ab", "answer": "ab"}]
    ours = prepare_dataset(DataSpec(source=rows, format="qa"), tok)[0]
    builtin = prepare_dataset(DataSpec(source=[{"prompt": "copy ab", "completion": "ab"}]), tok)[0]
    assert ours == builtin


def test_data_spec_plugin_trains_on_its_examples(my_plugins, tiny_model, tmp_path):
    from phi3tune import DataSpec
    from phi3tune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    examples = [dict(r) for r in prepare_dataset(DataSpec(source=[{"prompt": "copy ab", "completion": "ab"}] * 4),
                                                 tok)]
    data = my_plugins.PreTokenized(examples=examples, max_seq_length=64)
    assert isinstance(data.prepare(tok, 0), PreparedData)
    res = (FineTuner(tiny_model).data(data)
           .training(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=4, grad_accum=1,
                     optimizer="adamw_torch", save_strategy="no", progress_bar=False).run())
    assert res.metrics["steps"] == 1 and res.config["data"]["class"] == "my_plugins:PreTokenized"


def test_yaml_names_the_plugins_by_import_path(my_plugins, usage_run, tiny_model, tmp_path):
    config = yaml.safe_load(CONFIG)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"copy {w}", "answer": w}) + "\n"
                                               for w in ["ab", "cd", "ef", "gh"]))
    config["model"] = str(tiny_model)
    config["data"]["source"] = str(tmp_path / "qa.jsonl")
    config["training"].update(output_dir=str(tmp_path / "out"), batch_size=4, grad_accum=1, save_strategy="no",
                              progress_bar=False)
    ft = FineTuner.from_config(config)
    assert type(ft.quant).__name__ == "PartlyQuantized" and ft.quant.keep_full == ["o_proj"]
    assert type(ft.adapter_spec).__name__ == "IA3Adapter" and ft.train_spec.momentum == 0.8
    res = ft.run()
    assert res.metrics["steps"] == 2 and res.config["data"]["format"] == "my_plugins:qa"
    # the usage run's written config loads back to the same plugin classes
    back = FineTuner.from_config(usage_run.output_dir / "phi3tune_config.yaml")
    assert type(back.train_spec).__name__ == "NesterovSGD" and back.quant.keep_full == ["o_proj"]


def _examples(tok):
    from phi3tune import DataSpec

    rows = [{"question": f"copy {w}", "answer": w} for w in ["ab", "cde", "fgh", "abcd", "efg", "hab"] * 2]
    return [dict(r) for r in prepare_dataset(DataSpec(source=rows, format="qa", max_seq_length=64), tok)]


@pytest.mark.parametrize("data", ["PreTokenized", "qa format"])
def test_every_plugin_trains_with_eval_and_fsdp_settings(my_plugins, tiny_model, tmp_path, data):
    """All the page's plugins in one run that evaluates every step, with the settings FSDP needs (one process here:
    the checks before weights load are what a plugin can get wrong). Was: AttributeError on data.eval_source."""
    from phi3tune import DataSpec
    from phi3tune.model import load_tokenizer

    examples = _examples(load_tokenizer(str(tiny_model)))
    spec = (my_plugins.PreTokenized(examples=examples[:8], eval_examples=examples[8:], max_seq_length=64)
            if data == "PreTokenized" else DataSpec(source=[{"question": "copy ab", "answer": "ab"}] * 12,
                                                    format="qa", max_seq_length=64, eval_fraction=0.25))
    res = (FineTuner(tiny_model)
           .quantize(my_plugins.PartlyQuantized(keep_full=["o_proj"], compute_dtype="float32",
                                                quant_storage="float32"))
           .adapter(my_plugins.IA3Adapter()).data(spec)
           .training(my_plugins.NesterovSGD(output_dir=str(tmp_path / "out"), max_steps=2, learning_rate=1e-2,
                                            batch_size=4, grad_accum=1, eval_steps=1, save_strategy="no",
                                            progress_bar=False, device="cpu", distributed="fsdp"))
           .run())
    evals = [h["eval_loss"] for h in res.history if "eval_loss" in h]
    # eval_steps=1: at step 1, and the step-0 and final evals fit() runs anyway (issue 27)
    assert res.metrics["steps"] == 2 and len(evals) == 3 and all(e == e and e > 0 for e in evals)


def test_data_plugin_without_eval_data_refuses_eval_steps(my_plugins, tiny_model, tmp_path):
    from phi3tune import ConfigError
    from phi3tune.model import load_tokenizer

    data = my_plugins.PreTokenized(examples=_examples(load_tokenizer(str(tiny_model))), max_seq_length=64)
    ft = FineTuner(tiny_model).data(data).training(output_dir=str(tmp_path / "out"), max_steps=1, eval_steps=1,
                                                  save_strategy="no", progress_bar=False)
    with pytest.raises(ConfigError, match=r"eval_steps=1 but PreTokenized.prepare returned no eval data"):
        ft.run()
    assert not (tmp_path / "out").exists()  # refused before the output dir was claimed


def test_fsdp_checks_read_only_what_a_quant_plugin_declares(my_plugins):
    """FSDP needs 4-bit weights stored in the compute dtype: a subclass is held to its fields, a protocol-only
    plugin that declares no quant_storage is refused naming it (was: AttributeError formatting quant.bits)."""
    import torch

    from phi3tune import ConfigError, TrainSpec
    from phi3tune.pipeline import check_distributed

    class BareQuant:  # the QuantizationSpec protocol and nothing more
        compute_dtype = "auto"

        def quantization_config(self, compute_dtype):
            return None

    fsdp = TrainSpec(distributed="fsdp", save_strategy="no")
    with pytest.raises(ConfigError, match=r'got bits=4, quant_storage "uint8"\. Set quant_storage="float32"'):
        check_distributed(fsdp, my_plugins.PartlyQuantized(), torch.float32)
    with pytest.raises(ConfigError, match="quant_storage not declared by BareQuant"):
        check_distributed(fsdp, BareQuant(), torch.float32)
    check_distributed(fsdp, my_plugins.PartlyQuantized(quant_storage="float32"), torch.float32)  # accepted
    # FSDP checkpoints are sharded (issue 21): saving is no longer refused
    check_distributed(TrainSpec(distributed="fsdp"), my_plugins.PartlyQuantized(quant_storage="float32"),
                      torch.float32)

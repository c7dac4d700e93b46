"""Using what was trained: generate (chat template, stops, new text only), merge (never into 4-bit), push."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from helpers import PHI3_DIR, needs_shared, rows_of_text, tiny_tuner

from phi3tune import ConfigError, HubError, ModelSourceError, OutputDirError, load_finetuned, merge_adapter, push_to_hub
from phi3tune.inference import as_messages, generate_text, stop_token_ids

LAYERS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model, tmp_path_factory):
    """An adapter trained by phi3tune on the 4-bit tiny base (as every real run does)."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    return tiny_tuner(tiny_model, out, rows_of_text(8), max_steps=3, learning_rate=2e-2).run().adapter_dir


@pytest.fixture(scope="module")
def strong_adapter(tiny_model, tmp_path_factory):
    """A plain PEFT adapter with large random A and B: its effect on the logits is far above bf16 rounding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LAYERS, init_lora_weights=False))
    out = tmp_path_factory.mktemp("strong") / "adapter"
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(qlora_adapter):
    return load_finetuned(qlora_adapter)


class ForceTokens:
    """A logits processor that makes generation emit exactly ``ids`` and records the prompt it saw."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.prompt = ids, None

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = input_ids[0].tolist()
        step = input_ids.shape[1] - len(self.prompt)
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced


def _force(tok, text: str, stop: str) -> ForceTokens:
    ids = [tok.convert_tokens_to_ids(c) for c in text]
    return ForceTokens([*ids, tok.convert_tokens_to_ids(stop), *ids])  # anything after the stop must not appear


# ---------------------------------------------------------------------------------------------- generate
def test_generate_applies_chat_template_and_returns_only_new_text(loaded):
    from transformers import LogitsProcessorList

    tok = loaded.tokenizer
    force = _force(tok, "ok", "<|end|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    answer = loaded.generate(messages, max_new_tokens=10, logits_processor=LogitsProcessorList([force]))
    assert answer == "ok"  # stopped at <|end|>: the "ok" forced after it never came out
    assert tok.decode(force.prompt) == "<|system|>\nBe brief.<|end|>\n<|user|>\nhi there<|end|>\n<|assistant|>\n"


def test_generate_stops_at_every_eos_of_the_generation_config(loaded):
    from transformers import LogitsProcessorList

    tok, model = loaded.tokenizer, loaded.model
    # Phi-3's generation_config lists 32000, 32001, 32007; here: a config listing "<|user|>" as eos too.
    user_id = tok.convert_tokens_to_ids("<|user|>")
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, user_id]
    try:
        assert set(stop_token_ids(model, tok)) == {tok.eos_token_id, user_id, tok.convert_tokens_to_ids("<|end|>")}
        force = _force(tok, "abc", "<|user|>")
        assert loaded.generate("x", max_new_tokens=12, logits_processor=LogitsProcessorList([force])) == "abc"
    finally:
        model.generation_config.eos_token_id = saved
    force = _force(tok, "abc", "<|user|>")  # without it in the config, generation runs on past it
    assert loaded.generate("x", max_new_tokens=7, logits_processor=LogitsProcessorList([force])) == "abcabc"


@needs_shared
def test_stop_ids_of_real_phi3_generation_config(tiny_model_phi3_tok, phi3_tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_phi3_tok)
    model.generation_config = GenerationConfig.from_pretrained(PHI3_DIR)
    assert stop_token_ids(model, phi3_tokenizer) == [32000, 32001, 32007]


def test_generate_is_greedy_unless_sampling_is_asked(loaded):
    torch.manual_seed(1)
    a = loaded.generate("hello", max_new_tokens=16)
    torch.manual_seed(2)
    b = loaded.generate("hello", max_new_tokens=16)
    assert a == b
    samples = set()
    for seed in range(3):
        torch.manual_seed(seed)
        samples.add(loaded.generate("hello", max_new_tokens=16, temperature=5.0))
    assert len(samples) > 1  # temperature alone switches sampling on


def test_generate_rejects_bad_messages(loaded):
    with pytest.raises(ConfigError, match="role"):
        loaded.generate([{"role": "user"}])
    with pytest.raises(ConfigError, match="role"):
        loaded.generate([])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        loaded.generate("hi", max_new_tokens=0)
    assert as_messages("hi", "sys") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


def test_generate_text_works_on_a_plain_base_model(tiny_model, loaded):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.train()
    out = generate_text(base, loaded.tokenizer, "hi", max_new_tokens=5)
    assert isinstance(out, str) and len(out) <= 5 * 13  # at most 5 tokens (the longest is a 13-char special)
    assert base.training  # mode restored


def test_base_model_from_adapter_config_unless_given(qlora_adapter, tiny_model, tmp_path):
    cfg = json.loads((qlora_adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model.resolve())
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_model, moved)
    ft = load_finetuned(qlora_adapter, base_model=str(moved), quant=None)
    assert ft.model.get_base_model().name_or_path == str(moved)
    with pytest.raises(ModelSourceError, match="base_model="):
        load_finetuned(qlora_adapter, base_model=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="QuantSpec"):
        load_finetuned(qlora_adapter, quant="4bit")


# ---------------------------------------------------------------------------------------------- merge
def _peft_logits(base_dir, adapter, ids, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            bare = model(input_ids=ids).logits.float()
    return adapted, bare


def _merge_vs_peft(tiny_model, adapter, out, **kwargs):
    """Merge; return the merged model and its logits, the PeftModel's (fp32, unquantized) and the bare base's."""
    from transformers import AutoModelForCausalLM

    from phi3tune.model import load_tokenizer

    ids = load_tokenizer(str(tiny_model))(["### Human: copy abcdef ### Assistant: abcdef"],
                                          return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, out, **kwargs)).eval()
    assert type(merged).__name__ == "Phi3ForCausalLM"  # plain transformers: no peft, no phi3tune needed
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    want, bare = _peft_logits(tiny_model, adapter, ids)
    return merged, got, want, bare


def test_merge_fp32_equals_base_plus_adapter(tiny_model, strong_adapter, tmp_path):
    out = tmp_path / "merged"
    merged, got, want, bare = _merge_vs_peft(tiny_model, strong_adapter, out, dtype="float32")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - bare).abs().max() > 0.1  # the adapter matters, so the comparison can fail
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"} <= files
    assert "adapter_config.json" not in files and not list(out.glob(".*"))
    assert merged.generation_config.eos_token_id == [100, 103]  # the base's eos + <|end|>, kept


def test_merge_bf16_is_within_bf16_rounding(tiny_model, strong_adapter, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "merged16"
    _, got, want, bare = _merge_vs_peft(tiny_model, strong_adapter, out)  # default dtype: bfloat16
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err < 0.03 * scale, (err, scale)  # bf16 keeps ~3 significant digits; errors add up over the layers
    assert (want - bare).abs().max() > 5 * err  # well above the rounding: a wrong merge would show


def test_merge_of_a_qlora_adapter_into_the_unquantized_base(tiny_model, qlora_adapter, tmp_path):
    _, got, want, _ = _merge_vs_peft(tiny_model, qlora_adapter, tmp_path / "m", dtype="float32")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "m" / "phi3tune_merge.json").read_text())
    assert meta["dtype"] == "float32" and meta["adapter_trained_with_quant"]["bits"] == 4


@pytest.mark.parametrize("dtype", ["nf4", "4bit", "int8"])
def test_merge_never_into_a_4bit_base(strong_adapter, tmp_path, dtype):
    with pytest.raises(ConfigError, match="never merges into a quantized base"):
        merge_adapter(strong_adapter, tmp_path / "m", dtype=dtype)
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_prequantized_base_before_loading_weights(tiny_model, strong_adapter, tmp_path):
    base = tmp_path / "bnb-4bit-base"
    shutil.copytree(tiny_model, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "model.safetensors").write_bytes(b"not weights")  # loading them would fail differently
    with pytest.raises(ConfigError, match="quantized checkpoint"):
        merge_adapter(strong_adapter, tmp_path / "m", base_model=str(base))


def test_merge_keeps_an_existing_directory_unless_overwrite(strong_adapter, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="overwrite"):
        merge_adapter(strong_adapter, out, dtype="float32")
    assert (out / "mine.txt").read_text() == "keep"
    merge_adapter(strong_adapter, out, dtype="float32", overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()


# ---------------------------------------------------------------------------------------------- push
def test_push_offline_fails_fast_with_a_clear_message(qlora_adapter, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(HubError, match="no model hub reachable") as err:
        push_to_hub(qlora_adapter, "someone/phi3-adapter")
    assert time.perf_counter() - t < 10
    assert isinstance(err.value, ConnectionError)


def test_push_maps_network_and_auth_failures(qlora_adapter, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    class ConnectError(Exception):  # the name httpx gives a refused connection
        pass

    def no_network(self, *a, **k):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    with pytest.raises(HubError, match="no model hub reachable"):
        push_to_hub(qlora_adapter, "someone/x")

    class Denied(Exception):
        response = type("R", (), {"status_code": 403})()

    def denied(self, *a, **k):
        raise Denied("forbidden")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", denied)
    with pytest.raises(HubError, match="HTTP 403"):
        push_to_hub(qlora_adapter, "someone/x")


def test_push_uploads_the_folder_privately_by_default(qlora_adapter, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = push_to_hub(qlora_adapter, "me/adapter")
    assert url == "https://huggingface.co/me/adapter"
    assert calls["create"] == ("me/adapter", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"]["folder_path"] == str(qlora_adapter) and calls["upload"]["repo_id"] == "me/adapter"


def test_push_checks_the_folder_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="adapter_config"):
        push_to_hub(tmp_path, "me/x")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(HubError, match="repo_id"):
        push_to_hub(tmp_path, "a/b/c")

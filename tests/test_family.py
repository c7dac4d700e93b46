"""The Phi family on the CPU: Phi-3-mini-4k, Phi-3.5-mini (= Phi-3-mini-128k, LongRoPE), Phi-3-medium (grouped KV
heads), Phi-4-mini (200,064 vocabulary, tied embeddings, partial rotary, LongRoPE).

Tiny random weights of each real shape (tests/family.py): QLoRA trains, "auto" finds the fused layers, the
adapter round-trips through plain PEFT, generate works, merge keeps tied embeddings tied, the split export is
exact. estimate_memory is checked on the real full-size configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family import MEMBERS, PUBLISHED_PARAMS, full_config, write_config_dir, write_tiny
from helpers import PHI3_DIR, needs_shared
from split_layout import to_split_phi3

from phi3tune import FineTuner, estimate_memory, export_adapter, load_finetuned, merge_adapter

pytestmark = needs_shared
FUSED = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def _rows(n: int) -> list[dict[str, str]]:
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano"]
    return [{"prompt": f"Repeat: {w}", "completion": f"{w} {w}"} for w in words[:n]]


def _tiny_base(member: str, tmp_path_factory) -> Path:
    from phi3tune.model import load_tokenizer
    from phi3tune.tiny import build_char_tokenizer

    # Phi-4-mini ships no tokenizer: a character tokenizer (ids < 200,064) with Phi-3's chat template
    tok = build_char_tokenizer() if member == "phi-4-mini" else load_tokenizer(str(PHI3_DIR))
    return write_tiny(member, tmp_path_factory.mktemp(member) / "base", tok)


# Phi-3-mini-4k itself is what the rest of the suite trains (tiny.py): here only the members that differ from it
@pytest.fixture(scope="module", params=[m for m in MEMBERS if m != "phi-3-mini-4k"])
def trained(request, tmp_path_factory):
    """(member, tiny base dir, RunResult) of a 4-bit QLoRA run on the member's tiny shape."""
    member = request.param
    base = _tiny_base(member, tmp_path_factory)
    result = (FineTuner(base).adapter(r=8, alpha=16, dropout=0.0)
              .data(source=_rows(8), max_seq_length=32)
              .training(output_dir=str(base.parent / "run"), batch_size=8, grad_accum=1, max_steps=6,
                        logging_steps=1, save_strategy="no", progress_bar=False, learning_rate=3e-2,
                        optimizer="adamw_torch", lr_scheduler="constant")
              .run())
    return member, base, result


def _peft(base, adapter, dtype=torch.float32, **kwargs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kwargs),
                                     str(adapter)).eval()


def _ids(base) -> torch.Tensor:
    from phi3tune.model import load_tokenizer

    return load_tokenizer(str(base))(["Repeat: apple and river"], return_tensors="pt").input_ids


def test_qlora_trains_the_fused_layers(trained):
    from safetensors.torch import load_file

    _, base, result = trained
    assert result.losses[-1] < 0.75 * result.losses[0], result.losses  # it learns (the same 8 rows every step)
    assert result.model.get_base_model().model.layers[0].self_attn.qkv_proj.base_layer.weight.dtype == torch.uint8
    tensors = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    found = {k.split(".")[-3] for k in tensors}
    assert sorted(found) == FUSED  # "auto" = every linear layer of the decoder, output head excluded
    cfg = json.loads(base.joinpath("config.json").read_text())
    assert len(tensors) == 2 * len(FUSED) * cfg["num_hidden_layers"]
    assert not any("lm_head" in k or "embed_tokens" in k for k in tensors)


def test_adapter_round_trips_through_plain_peft(trained):
    from transformers import BitsAndBytesConfig

    from phi3tune.model import pin_4bit_cpu_kernel

    _, base, result = trained
    ids = _ids(base)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    reloaded = _peft(base, result.adapter_dir, quantization_config=q, device_map={"": "cpu"})
    pin_4bit_cpu_kernel(reloaded)  # the CPU kernel training used (AVX512-BF16 CPUs would switch after an eval)
    with torch.no_grad():
        want = result.model.eval()(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            bare = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - bare).abs().max() > 1e-2  # the trained adapter matters


def test_generate(trained):
    _, base, result = trained
    ft = load_finetuned(result.adapter_dir)
    assert isinstance(ft.generate("Repeat: apple", max_new_tokens=4), str)
    out = ft.model.generate(input_ids=_ids(base), max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == _ids(base).shape[1] + 3


def test_merge_keeps_tied_embeddings_tied(trained, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    member, base, result = trained
    tied = full_config(member).get("tie_word_embeddings", False)
    out = merge_adapter(result.adapter_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.tie_word_embeddings is tied
    same = merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert same is tied
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) is not tied  # stored once when tied
    ids = _ids(base)
    peft = _peft(base, result.adapter_dir)
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, peft(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))  # fp32 rounding


def test_split_export_gives_the_same_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base, result = trained
    out = export_adapter(result.adapter_dir, tmp_path / "split", layout="split")
    fused = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = _ids(base)
    with torch.no_grad():
        want = _peft(base, result.adapter_dir)(input_ids=ids).logits
        got = _peft_on(to_split_phi3(fused), out)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _peft_on(model, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


@pytest.mark.parametrize("member", MEMBERS)
def test_longrope_switches_to_long_factors_past_the_original_context(member, tmp_path_factory):
    """LongRoPE members change every position's rotation once a sequence passes 4,096 tokens; others do not."""
    from transformers import AutoModelForCausalLM

    base = _tiny_base(member, tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cfg = full_config(member)
    ids = torch.randint(10, 90, (1, cfg["original_max_position_embeddings"] + 8))
    with torch.no_grad():
        short = model.model(input_ids=ids[:, :16]).last_hidden_state
        long = model.model(input_ids=ids).last_hidden_state[:, :16]
    changed = bool((short - long).abs().max() > 1e-4)
    assert changed is bool(cfg.get("rope_scaling")), (member, (short - long).abs().max())


# ---------------------------------------------------------------------------------------------- estimate
def _shape_counts(cfg: dict) -> tuple[int, int, int]:
    """(decoder linear params, embedding + head params, norm params) from the config's numbers alone."""
    h, layers, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    linear = layers * (h * (q + 2 * kv) + q * h + h * 2 * ff + ff * h)
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return linear, embed, (2 * layers + 1) * h


@pytest.mark.parametrize("member", MEMBERS)
def test_estimate_memory_knows_the_real_shape(member, tmp_path):
    cfg = full_config(member)
    linear, embed, norms = _shape_counts(cfg)
    assert linear + embed + norms == pytest.approx(PUBLISHED_PARAMS[member], rel=0.005)  # the shape is right
    ft = (FineTuner(write_config_dir(member, tmp_path / member)).quantize(double_quant=True)
          .data(max_seq_length=512).training(batch_size=4, precision="bf16", optimize_for="balanced"))
    est = estimate_memory(ft, device="cuda")
    assert 1.0 < est["quantized_weights"] / (linear / 2) < 1.04  # NF4: half a byte per weight + block scales
    assert est["other_weights"] == 4 * (embed + norms)  # fp32-upcast embeddings; a tied head counted once
    assert est["logits_chunk"] == 2048 * cfg["vocab_size"] * (2 + 4 + 4)
    h, r = cfg["hidden_size"], 64
    head_dim = h // cfg["num_attention_heads"]
    qkv_out = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    per_layer = r * ((h + qkv_out) + (h + h) + (h + 2 * cfg["intermediate_size"]) + (cfg["intermediate_size"] + h))
    assert est["lora_params"] == cfg["num_hidden_layers"] * per_layer
    assert 2 < est["total_gib"] < 50  # Phi-3-medium under the classic layout: 42.7 (fp32 residual stream, session 16)

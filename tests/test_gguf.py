"""GGUF export, verified by reading the file back: transformers' own GGUF reader rebuilds the model and the
tokenizer from it, and llama.cpp itself runs it where llama-cpp-python is installed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import PHI3_DIR, needs_shared

from phi3tune import ConfigError, ModelSourceError, OutputDirError, export_gguf, merge_adapter
from phi3tune.cli import main

gguf = pytest.importorskip("gguf")
LAYERS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 12, 7, 33, 50, 2, 90, 14], list(range(1, 15))])
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world  x\nline two"},
        {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "Uppercase: apple"}]
Q8_BOUND = 0.05  # q8_0: max |logit difference| / max |logit|, on the strong adapter (measured 0.032)


@pytest.fixture(scope="module")
def strong_adapter(tiny_model, tmp_path_factory):
    """Random A and B far from zero on every linear layer: the merge changes the logits a lot."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phi3tune.model import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    out = tmp_path_factory.mktemp("strong") / "adapter"
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LAYERS, init_lora_weights=False)) \
        .save_pretrained(out)
    load_tokenizer(str(tiny_model)).save_pretrained(out)
    (out / "phi3tune.json").write_text(json.dumps({"base_model": str(tiny_model), "quant": None}))
    return out


@pytest.fixture(scope="module")
def merged(strong_adapter, tmp_path_factory):
    """The adapter merged by merge_adapter in float32 and in bfloat16: {"float32": dir, "bfloat16": dir}."""
    root = tmp_path_factory.mktemp("merged")
    return {dt: merge_adapter(strong_adapter, root / dt, dtype=dt) for dt in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def exported(strong_adapter, tmp_path_factory):
    """The adapter exported in each dtype: {"f32": file, …}."""
    root = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(strong_adapter, root / f"model-{dt}.gguf", dtype=dt)
            for dt in ("f32", "f16", "bf16", "q8_0")}


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _from_gguf(file, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32, **kwargs).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _fields(file):
    reader = gguf.GGUFReader(str(file))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---------------------------------------------------------------------------------------------- weights and logits
def test_f32_gives_the_merged_models_logits_exactly(exported, merged, tiny_model):
    ref, got = _hf(merged["float32"]), _from_gguf(exported["f32"])
    assert torch.equal(_logits(got), _logits(ref))
    assert not torch.allclose(_logits(got), _logits(_hf(tiny_model)), atol=0.1)  # negative control: the adapter is in


@pytest.mark.parametrize("dtype, merged_in, torch_dtype", [("f16", "float32", torch.float16),
                                                          ("bf16", "bfloat16", torch.bfloat16)])
def test_16_bit_files_hold_the_merged_weights_rounded_once(exported, merged, dtype, merged_in, torch_dtype):
    """Every matrix is the merged one rounded to the file's type, nothing more; norms stay float32."""
    ref, got = _hf(merged[merged_in]).state_dict(), _from_gguf(exported[dtype]).state_dict()
    assert ref.keys() == got.keys()
    for name, w in ref.items():
        want = w if w.dim() == 1 else w.to(torch_dtype).float()
        assert torch.equal(got[name], want), name
    rounding = _logits(_from_gguf(exported[dtype])) - _logits(_hf(merged["float32"]))
    assert 0 < rounding.abs().max() < 0.05 * _logits(_hf(merged["float32"])).abs().max()


def test_q8_0_is_the_merged_weights_in_8_bit_blocks_within_the_stated_bound(exported, merged):
    from gguf.quants import dequantize, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    ref, got = _hf(merged["bfloat16"]).state_dict(), _from_gguf(exported["q8_0"]).state_dict()
    for name, w in ref.items():
        want = w if w.dim() == 1 else torch.from_numpy(dequantize(quantize(w.numpy(), q8), q8))
        assert torch.equal(got[name], want), name
    exact = _logits(_hf(merged["float32"]))
    err = (_logits(_from_gguf(exported["q8_0"])) - exact).abs().max() / exact.abs().max()
    assert 0 < err < Q8_BOUND
    assert exported["q8_0"].stat().st_size < 0.6 * exported["f16"].stat().st_size


def test_a_merged_model_directory_exports_the_same_file(exported, merged, tmp_path):
    again = export_gguf(merged["float32"], tmp_path / "m.gguf", dtype="f32")
    assert torch.equal(_logits(_from_gguf(again)), _logits(_from_gguf(exported["f32"])))


# ---------------------------------------------------------------------------------------------- metadata
PHI3_TENSORS = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
    f"blk.{i}.{t}.weight" for i in range(2)
    for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")}


def test_phi3_metadata_and_tensor_names_as_llama_cpp_reads_them(exported, tiny_model):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model)
    fields, tensors = _fields(exported["q8_0"])
    assert fields["general.architecture"] == "phi3" and fields["general.name"] == "model-q8_0"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    want = {"context_length": 4096, "embedding_length": 64, "feed_forward_length": 128, "block_count": 2,
            "attention.head_count": 4, "attention.head_count_kv": 4, "rope.dimension_count": 16,
            "rope.freq_base": 10000.0, "attention.sliding_window": 0, "rope.scaling.original_context_length": 4096}
    assert {k: fields[f"phi3.{k}"] for k in want} == want
    assert math.isclose(fields["phi3.attention.layer_norm_rms_epsilon"], cfg.rms_norm_eps, rel_tol=1e-6)
    assert set(tensors) == PHI3_TENSORS  # no rope factors: this config has no rope_scaling
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert [int(x) for x in tensors["blk.0.attn_qkv.weight"].shape] == [64, 3 * 64]  # ggml order: (in, out)


def test_tokenizer_metadata_and_chat_template(exported, tiny_model):
    from phi3tune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    fields, _ = _fields(exported["f32"])
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.chat_template"] == tok.chat_template
    ids = {k: fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding", "eot")}
    assert ids == {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unknown": tok.unk_token_id,
                   "padding": tok.pad_token_id, "eot": tok.convert_tokens_to_ids("<|end|>")}
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_space_prefix"] is False
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    for special in ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"):
        assert types[tokens.index(special)] == gguf.TokenType.CONTROL
        assert tokens.index(special) == tok.convert_tokens_to_ids(special)
    assert tokens[tok.convert_tokens_to_ids(" ")] == "\u2581"  # SentencePiece spells the space "▁"


def _without_space_after_specials(ids, tok, space_id):
    """transformers' GGUF reader gives Phi-3 a Prepend("▁") normalizer whatever the file says, so its tokenizer
    puts one "▁" after every special token; llama.cpp follows the file's add_space_prefix=false and does not."""
    special = set(tok.all_special_ids)
    return [t for i, t in enumerate(ids) if not (t == space_id and (i == 0 or ids[i - 1] in special))]


def _assert_tokenizer_round_trip(file, tok):
    from transformers import AutoTokenizer

    read = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    assert read.chat_template == tok.chat_template
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert read.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == text
    ours = tok(text, add_special_tokens=False)["input_ids"]
    theirs = read(text, add_special_tokens=False)["input_ids"]
    space = read.convert_tokens_to_ids("\u2581")  # the same id in our vocabulary
    assert _without_space_after_specials(ours, tok, space) == ours  # ours never has one there
    assert theirs != ours and _without_space_after_specials(theirs, tok, space) == ours
    assert read.convert_ids_to_tokens(ours) == [t.replace(" ", "\u2581") for t in tok.convert_ids_to_tokens(ours)]


def test_tokenizer_read_from_the_file_encodes_a_chat_as_ours(exported, tiny_model):
    from phi3tune.model import load_tokenizer

    _assert_tokenizer_round_trip(exported["f32"], load_tokenizer(str(tiny_model)))


@needs_shared
def test_real_phi3_tokenizer_round_trip(tiny_model_phi3_tok, phi3_tokenizer, tmp_path):
    file = export_gguf(tiny_model_phi3_tok, tmp_path / "phi3.gguf", dtype="f16")
    _assert_tokenizer_round_trip(file, phi3_tokenizer)


@needs_shared
def test_real_phi3_vocab_types_scores_and_padding():
    from phi3tune.gguf_vocab import BYTE, CONTROL, NORMAL, UNUSED, read_vocab

    vocab = read_vocab(PHI3_DIR, 32064)  # config.json's vocab_size: 53 rows past the tokenizer's 32011
    assert (vocab.model, vocab.pre, vocab.add_space_prefix) == ("llama", "default", False)
    assert len(vocab.tokens) == len(vocab.types) == len(vocab.scores) == 32064
    assert vocab.tokens[13] == "<0x0A>" and vocab.types[13] == BYTE
    assert vocab.tokens[32007] == "<|end|>" and vocab.types[32007] == CONTROL
    assert vocab.tokens[32063] == "[PAD32063]" and vocab.types[32063] == UNUSED
    # "▁▁" is the first merge, so it outranks "▁t" (second); a token no merge makes scores 0
    assert vocab.scores[vocab.tokens.index("\u2581\u2581")] > vocab.scores[vocab.tokens.index("\u2581t")]
    assert vocab.types[vocab.tokens.index("\u2581t")] == NORMAL


# ---------------------------------------------------------------------------------------------- Phi-4-mini's shape
LONG, SHORT = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0], [1.0, 1.0, 1.1, 1.2, 1.3, 1.4]


def _byte_level_tokenizer():
    """A small byte-level BPE with Phi-4-mini's kind of pre-tokenizer (the GPT-4o split regex) and Phi-3's
    chat tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from phi3tune.tiny import PHI3_CHAT_TEMPLATE, PHI3_SPECIALS

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["gpt-4o"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    text = [f"{m['content']} The secret is 42. Uppercase: apple -> APPLE. hello world line two" for m in CHAT] * 20
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=PHI3_SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=PHI3_SPECIALS[1:])
    tok.chat_template = PHI3_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def phi4_shaped(tmp_path_factory):
    """A merged model with Phi-4-mini's features: tied embeddings, 0.75 partial RoPE, LongRoPE to 131072,
    grouped KV heads, a sliding window, a byte-level BPE tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = _byte_level_tokenizer()
    config = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                        original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                        rope_scaling={"type": "longrope", "long_factor": LONG, "short_factor": SHORT},
                        sliding_window=262144, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("phi4") / "merged"
    Phi3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_phi4_mini_shape_metadata_rope_factors_and_tied_output(phi4_shaped, tmp_path):
    file = export_gguf(phi4_shaped, tmp_path / "p4.gguf", dtype="f32")
    fields, tensors = _fields(file)
    assert fields["phi3.rope.dimension_count"] == 12  # 0.75 of the 16-wide heads
    assert fields["phi3.attention.head_count_kv"] == 2 and fields["phi3.attention.sliding_window"] == 262144
    assert fields["phi3.context_length"] == 131072 and fields["phi3.rope.scaling.original_context_length"] == 4096
    assert math.isclose(fields["phi3.rope.scaling.attn_factor"], math.sqrt(1 + math.log(32) / math.log(4096)),
                        rel_tol=1e-6)  # how transformers' LongRoPE scales attention past 4096 positions
    assert np.array_equal(tensors["rope_factors_long.weight"].data, np.array(LONG, np.float32))
    assert np.array_equal(tensors["rope_factors_short.weight"].data, np.array(SHORT, np.float32))
    assert "output.weight" not in tensors  # tied: llama.cpp and transformers reuse token_embd
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-4o"
    assert fields["tokenizer.ggml.merges"]


def test_phi4_mini_shape_round_trip(phi4_shaped, tmp_path):
    """transformers' reader does not rebuild partial RoPE or LongRoPE from a phi3 GGUF, so the weights are
    checked under our config: same logits to the last bit. Its byte-level tokenizer matches ours exactly."""
    from transformers import AutoConfig, AutoTokenizer

    from phi3tune.model import load_tokenizer

    file = export_gguf(phi4_shaped, tmp_path / "p4.gguf", dtype="f32")
    got = _from_gguf(file, config=AutoConfig.from_pretrained(phi4_shaped))
    assert got.config.tie_word_embeddings
    assert torch.equal(_logits(got), _logits(_hf(phi4_shaped)))
    tok, read = load_tokenizer(str(phi4_shaped)), AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert read(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text) / 2  # the merges were used


@needs_shared
def test_real_phi4_mini_config_metadata():
    from transformers import AutoConfig

    from phi3tune.gguf_export import longrope, rope_dims

    config = AutoConfig.from_pretrained(PHI3_DIR.parent / "phi4-mini-instruct")
    long, short, attn = longrope(config)
    assert rope_dims(config) == 96 and len(long) == len(short) == 48
    assert math.isclose(attn, math.sqrt(1 + math.log(32) / math.log(4096)))
    assert longrope(AutoConfig.from_pretrained(PHI3_DIR)) is None  # Phi-3-mini-4k: no scaling


# ---------------------------------------------------------------------------------------------- bad input
def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_refuses_bad_input_before_any_work(strong_adapter, tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="neither an adapter directory"):
        export_gguf(tmp_path / "empty", tmp_path / "a.gguf")
    with pytest.raises(ConfigError, match=r"dtype='q4_k_m'.*llama-quantize"):
        export_gguf(strong_adapter, tmp_path / "a.gguf", dtype="q4_k_m")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="which is a file"):
        export_gguf(strong_adapter, tmp_path / "file" / "a.gguf")
    (tmp_path / "old.gguf").write_text("keep me")
    with pytest.raises(OutputDirError, match="exists; choose a new file name or pass overwrite=True"):
        export_gguf(strong_adapter, tmp_path / "old.gguf")
    assert (tmp_path / "old.gguf").read_text() == "keep me"
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="'llama' model; GGUF export writes the Phi-3 architecture"):
        export_gguf(tmp_path / "llama", tmp_path / "a.gguf")
    assert _leftovers(tmp_path) == ["empty", "file", "llama", "old.gguf"]


@pytest.mark.parametrize("edit, match", [
    (lambda tj: tj["model"].update(type="Unigram"), "a Unigram tokenizer"),
    (lambda tj: tj.update(normalizer={"type": "NFC"}), "neither SentencePiece-style"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}),
     "no llama.cpp name"),
])
def test_refuses_tokenizers_llama_cpp_cannot_reproduce(tiny_model, tmp_path, edit, match):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tj = json.loads((model / "tokenizer.json").read_text())
    edit(tj)
    (model / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError, match=match):
        export_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_errors_are_one_line_each(strong_adapter, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "old.gguf").write_text("keep me")
    cases = [([str(tmp_path), str(tmp_path / "a.gguf")], "neither an adapter"),
             ([str(strong_adapter), str(tmp_path / "a.gguf"), "--dtype", "q4_0"], "dtype='q4_0'; use one of"),
             ([str(strong_adapter), str(tmp_path / "file" / "a.gguf")], "which is a file"),
             ([str(strong_adapter), str(tmp_path / "old.gguf")], "exists")]
    for args, message in cases:
        assert main(["export", *args, "--format", "gguf"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("phi3tune export: error:") and message in err and "\n" not in err
    assert main(["export", str(strong_adapter), str(tmp_path / "a.gguf"), "--format", "gguf", "--layout", "split"]) == 2
    assert "not both" in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["file", "old.gguf"]


def test_cli_export_gguf(strong_adapter, exported, tmp_path, capsys):
    out = tmp_path / "model-f32.gguf"  # the API's file name: general.name is the file's stem
    assert main(["export", str(strong_adapter), str(out), "--format", "gguf", "--dtype", "f32"]) == 0
    said = capsys.readouterr().out
    assert f"GGUF (f32): {out}" in said and "ollama create" in said and "llama-cli" in said
    assert out.read_bytes() == exported["f32"].read_bytes()  # the same bytes as the API wrote
    assert main(["export", str(strong_adapter), str(out), "--format", "gguf", "--dtype", "bf16",
                 "--overwrite"]) == 0
    assert _fields(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_mid_write_leaves_nothing_half_written(strong_adapter, tmp_path, monkeypatch, existing):
    """Ctrl-C after the first tensor: no file under the name, no temporary file or merge left beside it,
    and a file being replaced (overwrite=True) is still the old one."""
    from gguf import GGUFWriter

    real, calls = GGUFWriter.write_tensor_data, []

    def interrupted(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, tensor, *args, **kwargs)

    out = tmp_path / "model.gguf"
    if existing:
        out.write_text("the old file")
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(strong_adapter, out, dtype="f16", overwrite=existing)
    assert len(calls) == 2
    assert _leftovers(tmp_path) == (["model.gguf"] if existing else [])
    if existing:
        assert out.read_text() == "the old file"


# ---------------------------------------------------------------------------------------------- llama.cpp itself
def test_runs_in_llama_cpp(tiny_model, exported):
    """llama.cpp tokenizes our chat exactly as we do and continues it with the same greedy tokens as the
    GGUF model in transformers (f32 file)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from phi3tune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ours = tok(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(exported["f32"]), n_ctx=256, verbose=False)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours
    with torch.no_grad():
        want = _from_gguf(exported["f32"]).generate(torch.tensor([ours]), max_new_tokens=8, do_sample=False,
                                                    eos_token_id=None)[0, len(ours):].tolist()
    got = []
    for token in llm.generate(ours, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want

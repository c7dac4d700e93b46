"""A tiny Phi-3 with random weights and a character tokenizer, built offline in seconds.

Used by the offline demo and the test-suite: same architecture class (Phi3ForCausalLM with fused qkv_proj /
gate_up_proj), same special tokens and chat template as Phi-3-mini, so the whole QLoRA path runs on a CPU.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_char_tokenizer() -> Any:
    """One token per printable ASCII character, plus Phi-3's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *chars])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t in ["<unk>", "<s>", "</s>", *PHI3_SPECIALS]])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|endoftext|>",
                                  unk_token="<unk>", pad_token="<|endoftext|>",
                                  additional_special_tokens=PHI3_SPECIALS[1:])
    tok.chat_template = PHI3_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def write_tiny_phi3(out_dir: str | os.PathLike[str], tokenizer: Any = None, hidden_size: int = 64,
                    layers: int = 2, heads: int = 4, seed: int = 0, init_std: float = 0.02) -> Path:
    """Save a random tiny Phi3ForCausalLM (+ tokenizer + generation config) to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    end_id = tok.convert_tokens_to_ids("<|end|>")
    config = Phi3Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, original_max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, end_id],
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out

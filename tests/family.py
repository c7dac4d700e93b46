"""The Phi-3 family's real configs, and tiny random-weight models that keep each one's structural features.

Real configs come from ../shared (Phi-3-mini-4k, Phi-4-mini); Phi-3.5-mini / Phi-3-mini-128k and Phi-3-medium are
Phi-3-mini's file with their published dimensions. Their LongRoPE factor *values* here are smooth stand-ins of
the right length (the real lists only change numbers, not shapes, memory or code paths).
The tiny versions shrink sizes but keep: the vocabulary size (Phi-4-mini's 200,064 too), tied embeddings,
grouped KV heads, partial rotary, LongRoPE (factor lists of the right length for the tiny head), the
context length and sliding window.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from helpers import SHARED

PHI3_CONFIG = SHARED / "models" / "phi3-mini-4k-instruct" / "config.json"
PHI4_CONFIG = SHARED / "models" / "phi4-mini-instruct" / "config.json"
MEMBERS = ["phi-3-mini-4k", "phi-3.5-mini", "phi-3-medium-4k", "phi-4-mini"]
# total parameters from the model cards / the safetensors index of each hub repo
PUBLISHED_PARAMS = {"phi-3-mini-4k": 3.821e9, "phi-3.5-mini": 3.821e9, "phi-3-medium-4k": 13.96e9,
                    "phi-4-mini": 3.836e9}


def _ramp(n: int, lo: float, hi: float) -> list[float]:
    return [round(lo * (hi / lo) ** (i / (n - 1)), 4) for i in range(n)]


def full_config(member: str) -> dict[str, Any]:
    """The member's config.json as a dict (the real file where ../shared has it)."""
    if member == "phi-4-mini":
        return json.loads(PHI4_CONFIG.read_text())
    cfg = json.loads(PHI3_CONFIG.read_text())
    if member == "phi-3.5-mini":  # = Phi-3-mini-128k's shape: LongRoPE to 131,072 positions
        cfg.update(max_position_embeddings=131072, sliding_window=262144,
                   rope_scaling={"type": "longrope", "short_factor": _ramp(48, 1.0, 2.9),
                                 "long_factor": _ramp(48, 1.08, 64.0)})
    elif member == "phi-3-medium-4k":
        cfg.update(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=10)
    return cfg


def _subsample(values: list[float], n: int) -> list[float]:
    """n of the real factors, evenly spaced, first and last kept: the same rising profile on a tiny head."""
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def tiny_config(member: str, tokenizer: Any) -> dict[str, Any]:
    """Small sizes, the member's structure; token ids follow the tokenizer the test brings."""
    cfg = copy.deepcopy(full_config(member))
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    kv = 2 if group == 1 else 1
    heads = group * kv
    # bitsandbytes' CPU 4-bit inference kernel needs in_features % 64 == 0 and out_features % 32 == 0
    head_dim = next(d for d in (16, 32, 64) if heads * d % 64 == 0 and (heads + 2 * kv) * d % 32 == 0)
    cfg.update(hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
               num_key_value_heads=kv, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id,
               initializer_range=0.2)  # big enough weights that a rank-8 adapter can move the loss in 6 steps
    rope = cfg.get("rope_scaling")
    if rope:
        n = int(head_dim * cfg.get("partial_rotary_factor", 1.0)) // 2
        cfg["rope_scaling"] = {**rope, "short_factor": _subsample(rope["short_factor"], n),
                               "long_factor": _subsample(rope["long_factor"], n)}
    return cfg


def write_config_dir(member: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(full_config(member)))
    return out


def write_tiny(member: str, out: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Random weights of the tiny shape, the tokenizer and a generation config (eos + <|end|>)."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    config = Phi3Config.from_dict(tiny_config(member, tokenizer))
    torch.manual_seed(seed)
    Phi3ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end],
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return out

"""Split-layout copies of a Phi-3 base (separate q/k/v and gate/up projections), for the export tests.

Serving engines that do not know Phi-3's fused layers load it as a Llama-style model. ``to_llama`` builds a
real ``LlamaForCausalLM`` with the same weights (exact for members without partial rotary embeddings);
``to_split_phi3`` keeps Phi-3's attention code (partial rotary, LongRoPE, sliding window) but gives it split
projections under the module names Llama uses, so every family member has a split-layout twin.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3ForCausalLM, Phi3MLP


def _dims(config: Any) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size


def split_state_dict(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """qkv_proj -> q/k/v_proj and gate_up_proj -> gate/up_proj, by output rows; other tensors as they are."""
    q, kv, ff = _dims(config)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if ".qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                out[key.replace("qkv_proj", name)] = part.clone()
        elif ".gate_up_proj." in key:
            for name, part in zip(("gate_proj", "up_proj"), t.split([ff, ff])):
                out[key.replace("gate_up_proj", name)] = part.clone()
        else:
            out[key] = t
    return out


class SplitAttention(Phi3Attention):
    """Phi-3 attention with separate q/k/v projections; the fused output is their concatenation."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self._modules["qkv_proj"]
        q, kv, _ = _dims(config)
        self.q_proj = nn.Linear(config.hidden_size, q, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv, bias=False)

    @property
    def qkv_proj(self) -> Any:  # what Phi3Attention.forward calls
        return lambda x: torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class SplitMLP(Phi3MLP):
    """Phi-3 MLP with separate gate/up projections."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        del self._modules["gate_up_proj"]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    @property
    def gate_up_proj(self) -> Any:
        return lambda x: torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)


def to_split_phi3(fused: Phi3ForCausalLM) -> Phi3ForCausalLM:
    """A Phi-3 with split projections and the same weights (tied embeddings stay tied)."""
    config = fused.config
    model = Phi3ForCausalLM(config).to(fused.dtype)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = SplitAttention(config, i).to(fused.dtype)
        layer.mlp = SplitMLP(config).to(fused.dtype)
    model.load_state_dict(split_state_dict(fused.state_dict(), config), strict=True)
    return model.eval()


def to_llama(fused: Phi3ForCausalLM) -> Any:
    """The same weights as a LlamaForCausalLM: how Llama-style engines load a Phi-3 without rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = fused.config
    assert c.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0, "Llama rotates the whole head"
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                         rope_parameters=dict(c.rope_parameters), hidden_act=c.hidden_act,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    model = LlamaForCausalLM(config).to(fused.dtype)
    model.load_state_dict(split_state_dict(fused.state_dict(), c), strict=True)
    return model.eval()

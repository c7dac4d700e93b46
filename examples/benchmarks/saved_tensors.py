"""What one compiled decoder layer saves for backward, grouped by shape and dtype: the quickstart's layer (NF4, LoRA
r=64 on every linear with hashed dropout 0.1, bf16 autocast, varlen attention over 512-token examples) compiled as
the plans compile it, at each activation budget, with fixed and with symbolic lengths. It asks why session 13's
20 GiB card kept 4.5 GiB less with symbolic lengths at the middle budget (docs/performance.md). One JSON line per
(budget, lengths): the bytes saved, per token, and the largest groups. ``--dequantized``: the layer's 4-bit base
dequantized once first (dequantized.py), as the plans that hold it compile it.

    python examples/benchmarks/saved_tensors.py MODEL [--tokens 4864] [--budgets 1.0 0.6 0.5 0.3] [--dequantized]
    (on the GPU: cards.sh run "saved@full")
"""

from __future__ import annotations

import argparse
import collections
import json
from typing import Any

import torch

from phi3tune import compiled_layers as cl
from phi3tune import varlen_attention
from phi3tune.dequantized import dequantize_base
from phi3tune.knobs import compile_settings
from phi3tune.lora_dropout import make_recomputable
from phi3tune.model import attach_adapter, load_weights
from phi3tune.specs import AdapterSpec, QuantSpec

EXAMPLE = 512  # tokens an example holds (the quickstart's max_seq_length)


def decoder(model_dir: str, device: torch.device) -> Any:
    """The LoRA'd model's decoder (its layers and rotary embedding), as a speed plan builds it."""
    base = load_weights(model_dir, QuantSpec(compute_dtype="bfloat16"), torch.bfloat16, device,
                        attn_implementation=varlen_attention.register())
    model = attach_adapter(base, AdapterSpec(r=64, alpha=16, dropout=0.1),
                           ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    make_recomputable(model, device)
    model.train()
    return model.get_base_model().model


def saved(inner: Any, budget: float, symbolic: bool, tokens: int, device: torch.device,
          dequantized: bool = False) -> dict[str, Any]:
    torch._dynamo.reset()
    layer = torch.compile(inner.layers[0], backend=cl.backend(compile_settings(budget)),
                          dynamic=None if symbolic else False)

    def call(n: int) -> Any:
        x = torch.randn(1, n, inner.config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        pos = (torch.arange(n, device=device) % EXAMPLE)[None]
        bounds = varlen_attention.document_bounds(pos.cpu()).to(device)
        torch._dynamo.maybe_mark_dynamic(bounds, 0)  # as TokenLoss passes them
        emb = inner.rotary_emb(x, pos)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return layer(x, position_embeddings=emb, position_ids=pos, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                         max_length_q=EXAMPLE, max_length_k=EXAMPLE)

    if symbolic:  # two lengths first: dynamo makes the token dimension symbolic, as the warm-up does
        call(tokens - 256)
        call(tokens - 128)
    else:
        call(tokens)  # compiled outside the hooks
    groups: collections.Counter[str] = collections.Counter()
    # the layer's own weights (a dequantized base's bf16 values, the 4-bit bytes) are saved too, but hold no memory
    # of their own: counted apart
    weights = {w.untyped_storage().data_ptr() for w in (*inner.layers[0].parameters(), *inner.layers[0].buffers())}
    held_weights = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal held_weights
        if t.untyped_storage().data_ptr() in weights:
            held_weights += t.numel() * t.element_size()
        else:
            groups[f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(tokens)
    total = sum(groups.values())
    return {"label": "saved_tensors", "budget": budget, "lengths": "symbolic" if symbolic else "fixed",
            "dequantized": dequantized,
            "tokens": tokens, "bytes": total, "bytes_per_token": round(total / tokens, 1),
            "hiddens_per_token": round(total / tokens / (2 * inner.config.hidden_size), 2),
            "weights_saved_bytes": held_weights, "largest": groups.most_common(12)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4864)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.6, 0.5, 0.3])
    ap.add_argument("--dequantized", action="store_true")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inner = decoder(a.model, device)
    if a.dequantized:
        dequantize_base(inner.layers[0], torch.bfloat16)
    for budget in a.budgets:
        for symbolic in (False, True):
            print(json.dumps(saved(inner, budget, symbolic, a.tokens, device, a.dequantized)), flush=True)


if __name__ == "__main__":
    main()

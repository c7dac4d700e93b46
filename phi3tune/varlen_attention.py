"""Attention over examples laid end to end, each its own sequence: torch's variable-length flash attention.

A padding-free micro-batch holds many examples in one row. FlexAttention's document mask works in 128 x 128 blocks:
a block that straddles two examples is computed whole and then masked, and the block mask is rebuilt from the
position ids at every forward. The flash kernel's variable-length form (``torch.nn.attention.varlen``) takes the
examples' cumulative lengths instead and computes each example's causal triangle only. The lengths come from the
CPU with the batch (``document_bounds``, next to ``trained_idx``), so nothing is read back from the GPU.

It is registered with transformers' ``AttentionInterface`` under ``NAME``, that library's extension point for
attention kernels; no mask function is registered for it, so transformers builds no mask. ``TokenLoss`` passes
the bounds as ``cu_seq_lens_q`` / ``max_length_q``, transformers' own names for them, which every decoder layer
hands to its attention. The same math as the document mask: tests compare losses and gradients with SDPA's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

NAME = "phi3tune_varlen"
_HALF = (torch.bfloat16, torch.float16)


def document_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative lengths of the examples in a (rows, length) CPU batch read as one sequence: an example
    starts at each row's start and wherever a position does not follow the one before it (the rule transformers
    uses to find packed examples)."""
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[:: position_ids.shape[-1]] = True
    return torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)


def _find_kernel() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """torch's varlen_attn and the keywords this torch's version takes (2.10: ``is_causal``; later: a window)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_KERNEL = _find_kernel()  # looked up once, outside any compiled graph


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """The flash kernel runs here: a CUDA device of compute capability 8.0 or more, a 16-bit compute dtype."""
    return (device.type == "cuda" and dtype in _HALF and _KERNEL is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 8)


def _autocast_half(device: torch.device) -> torch.dtype | None:
    """The 16-bit dtype autocast runs attention in on ``device`` while it is on, else None. Measured without it
    (session 16, H200, the balanced plan with packed rows): fp32 q / k / v took the dense reference, 33.8 GiB at
    peak where the plan then predicted 15.5, and 1.59 s a step."""
    if not torch.is_autocast_enabled(device.type):
        return None
    dtype = torch.get_autocast_dtype(device.type)
    return dtype if dtype in _HALF else None


def register() -> str:
    """Make ``NAME`` an attention implementation transformers can load a model with; returns ``NAME``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    return NAME


def registered(attn: str | None) -> str | None:
    """``attn`` as given, registered with transformers first where it is ``NAME``."""
    return register() if attn == NAME else attn


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
              max_length_q: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, length, dim) in, (batch, length, heads, dim)
    out. Without bounds (a call that is not TokenLoss's, e.g. generation) it is transformers' SDPA attention."""
    if cu_seq_lens_q is None or max_length_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # under autocast, in its 16-bit dtype as SDPA would be: the classic layout's fp32 norms make q / k / v fp32
    # here (bitsandbytes casts its output back to its input's dtype), which would take the dense reference. Only
    # fp32 asks: the compiled layers' q / k / v are 16-bit, so their graphs never read the autocast state
    if query.dtype == torch.float32 and (half := _autocast_half(query.device)) is not None:
        query, key, value = (t.to(half) for t in (query, key, value))
    b, h, s, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    if k.shape[1] != h:  # grouped-query attention (e.g. Phi-4-mini): each key/value head serves h // kv heads
        k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    scale = d ** -0.5 if scaling is None else scaling
    # Phi-3's window: a query sees the keys (q - window, q]; it binds only on examples longer than the window
    window = sliding_window if sliding_window and sliding_window < max_length_q else None
    kernel = _KERNEL
    fast = (q.is_cuda and q.dtype in _HALF and kernel is not None and not dropout
            and (window is None or "window_size" in kernel[1])
            and (scale == d ** -0.5 or "scale" in kernel[1]))
    if fast and kernel is not None:
        fn, params = kernel
        extra: dict[str, Any] = {"scale": scale} if "scale" in params else {}
        if "window_size" in params:
            extra["window_size"] = (window - 1 if window else -1, 0)
        else:
            extra["is_causal"] = True
        out = fn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **extra)
    else:
        out = reference(q, k, v, cu_seq_lens_q, scale, window, dropout)
    return out.view(b, s, h, d), None


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, scale: float,
              window: int | None = None, dropout: float = 0.0) -> torch.Tensor:
    """The same attention with a dense document mask and SDPA, (tokens, heads, dim) in and out: where the flash
    kernel does not run (the CPU, fp32, attention dropout) and as the tests' reference."""
    n = q.shape[0]
    lengths = bounds.diff().to(q.device)
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths, output_size=n)
    i = torch.arange(n, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         dropout_p=dropout, scale=scale)
    return out.transpose(0, 1)

"""The shapes compiled decoder layers see, and the attention kernel over them: a plan's few fixed micro-batch
lengths or one symbolic length, and which attention runs padding-free rows. plan.py decides with these."""

from __future__ import annotations

import importlib.util

import torch

from . import varlen_attention
from .memory import budget_tier

BUCKETS = 4  # fixed micro-batch lengths per plan: each is one compiled shape
LENGTH_GRANULE = 128  # FlexAttention's block: a length of whole blocks; symbolic lengths are its multiples


def token_buckets(budget: int, longest: int, step_tokens: int | None = None, count: int = BUCKETS) -> tuple[int, ...]:
    """``count`` evenly spaced lengths, multiples of 8, up to the largest micro-batch a step can make: the budget,
    capped by what a whole step holds (``step_tokens``: sequences_per_step x max_seq_length, so a small step is
    not padded up to a budget it can never fill), and at least the longest example (which gets a micro-batch of
    its own when it is longer than the budget)."""
    top = max(min(budget, step_tokens or budget), longest)
    step = max(8, -(-top // count // 8) * 8)
    return tuple(range(step, -(-top // step) * step + 1, step))


def granule_lengths(top: int) -> tuple[int, ...]:
    """Every multiple of the granule up to ``top`` (rounded up to one): ``LENGTH_GRANULE`` tokens for budgets of
    4,096 and more, 1/32 of smaller ones (a multiple of 8), so at most ~32 lengths and one dynamic graph."""
    g = min(LENGTH_GRANULE, max(8, top // 32 // 8 * 8))
    return tuple(range(g, -(-top // g) * g + 1, g))


def default_attention(device: torch.device, fenced: bool, dtype: torch.dtype) -> str | None:
    """For padding-free / packed rows on CUDA: torch's varlen flash kernel, each example its own sequence
    (varlen_attention.py: 0.82 against 1.38 ms a layer's forward + backward for FlexAttention at 4,864 tokens on the
    H200, session 12); else FlexAttention, whose document mask skips the blocks between examples (SDPA computes
    them, then masks them: 1.6x slower). SDPA everywhere else."""
    if device.type != "cuda" or not fenced:
        return None
    if varlen_attention.available(device, dtype):
        return varlen_attention.NAME
    return "flex_attention" if importlib.util.find_spec("torch.nn.attention.flex_attention") else None


def symbolic_lengths_pay(attn: str | None, packed: bool, activation_budget: float, memory_plan: bool = False) -> bool:
    """Compiled layers with a symbolic token dimension (each micro-batch padded to a multiple of 128, not to one of
    4 fixed lengths) where measured faster: unpacked rows (pads 11.1% -> 2.3% of the tokens computed) under varlen
    attention, at every activation budget. On the H200 (session 12): 0.129 against 0.137 s a mean step and 27
    against 34 s of compiling at the default budget; 0.163 against 0.177 s and 33 against 50 s at the low one,
    which keeps more memory (memory.symbolic_lengths_bytes: the plan takes them only where they fit). At the middle
    budget as fast as fixed lengths on a 20 GiB card (20,247 against 20,347 tokens/s, session 13) and keeping less
    (memory.modelled_budget); 5% faster than the low budget's symbolic graphs on a 16 GiB card for the same memory
    (19,560 against 18,608 tokens/s, session 14). Not with FlexAttention (no faster: sessions 6, 12). Packed rows
    fill their micro-batches anyway, so they take them only at the middle budget, for the memory: a 16 GiB card then
    holds 4,096-token micro-batches there, 21,716 tokens/s at 10.85 GiB on the device against 2,048 at the default
    budget's 20,561 at 14.09; on 12 GiB 21,566 against the low budget's 21,417 (session 15, one machine).
    Never in the memory plan under torch's checkpoint (``memory_plan``): there they were no faster and held 0.27 GiB
    more at the allocator's peak (H200, seq 4096, batch 1 x 4: 4.20 GiB at 3,147 tokens/s against 3.93 at 3,106
    with fixed lengths, session 24), where memory is the point. Its layers checkpointed in their graphs take them as
    the speed plans do: session 27, an 8 GiB card, the memory plan's settings with symbolic lengths held 4.58 GiB at
    the device and padded 2.6% of the tokens, with 4 fixed lengths 4.62 and 9.8%.
    PHI3TUNE_COMPILE=dynamic_lengths=0/1 overrides it."""
    middle = budget_tier(activation_budget) == "middle"
    return attn == varlen_attention.NAME and (not packed or middle) and not memory_plan


def attention_words(attn: str | None) -> str:
    """The attention implementation as the plan's log line names it."""
    return {"flex_attention": "FlexAttention", varlen_attention.NAME: "varlen flash attention",
            None: "SDPA"}.get(attn, str(attn))

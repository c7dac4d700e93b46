"""What a plan's step is expected to cost: time per real token, fitted to the H200 measurements in
docs/performance.md. ``resolve_plan`` takes, among the plans that fit, the one this says is fastest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .checkpoint_lengths import recomputed_share
from .memory import budget_tier
from .plan import WHOLE_STEP_CAP


class CostedPlan(Protocol):
    """What the cost model reads of a plan (a ``plan.RunPlan``)."""

    @property
    def micro_batch_tokens(self) -> int | None: ...
    @property
    def checkpoint_layers(self) -> int: ...
    @property
    def activation_budget(self) -> float: ...
    @property
    def dequantized_base(self) -> bool: ...
    @property
    def dequantized_layers(self) -> int: ...
    @property
    def combo_kernels(self) -> bool: ...
    @property
    def memory(self) -> dict[str, int]: ...
    @property
    def checkpoint_lengths(self) -> tuple[tuple[int, int], ...]: ...

# What "auto" trades on CUDA (H200, README quickstart, docs/performance.md): time per real token relative to
# 4,096-token micro-batches. Each micro-batch pays a fixed cost (the host's launches of 32 compiled layers; the
# weights' dequantization), so a card that cannot hold 4,096-token activations keeps large micro-batches and
# checkpoints layers rather than cut them. Session 2: 1,024 tokens x5.1. Session 4: 2,048 tokens x1.48 (unpacked;
# x1.65 since session 37); 4,096 with 24 of 32 layers checkpointed +30%, with 31 +41% (recomputation costs in
# proportion to the layers).
# Session 7: a whole packed step (8,192 tokens) in one micro-batch 0.317 s against 0.335 s as two of 4,096 (x0.94).
# Session 37, 16 GiB quickstart, one machine, two pairs: 2,048 tokens at the default budget ran 11,696 / 10,783
# tokens/s against a whole step at the upper budget's 18,696 / 17,771 (x1.62 of that step's 0.94 x 1.08): x1.65.
_BUDGET_COST = {8192: 0.94, 4096: 1.0, 2048: 1.65, 1024: 5.1}  # 8,192: any budget above 4,096 (a whole step)
# Packed rows fill every micro-batch, which then costs what the fit below says (~19 ms + ~36.7 µs a token): session
# 11, a 16 GiB card, one machine, 4 of 2,048 at the default budget 0.376 s a step (the fit: 0.377), 2 of 4,096 at
# the low budget 0.398 (the fit x1.18: 0.400). Unpacked rows (~3,100 tokens a step) part-fill them: 2,048 ran 0.193 s
# against a whole step's 0.181 (low budget), and no faster with the base dequantized (0.197); the table is theirs
_RECOMPUTE_COST = 0.42  # all layers checkpointed: +42% per token
_RECOMPUTE_FULL = 1.0  # linear in the share of layers checkpointed
# Checkpointing by length (checkpoint_lengths.py) recomputes a few layers in some steps, where the host sets the
# pace: it costs more per layer. Session 21, call C, one machine, both the default budget and combo kernels: 20 GiB
# (10.96% of layer passes recomputed over the quickstart's steps) 5.047 s for 30 steps against 24 GiB's (1.16%)
# 4.635 / 4.520: +10% for 9.8 points, ~1.0 a share. Never more than every layer checkpointed costs.
_BY_LENGTH_RECOMPUTE = 1.0
# The compiler's activation budget (functorch's activation_memory_budget): compiled layers recompute cheap ops in
# backward instead of saving them. Session 5, H200, quickstart at 4,096 tokens: without LoRA dropout, budget 0.3 kept
# 9.25 GiB at peak against 17.69 (0.5: 9.47); with hashed LoRA dropout (lora_dropout.py; torch redraws nn.Dropout's
# masks when it recomputes them), median step 0.174 s on a 12 GiB card against 0.147 s for the default budget on
# the same GPU in the same call (+18%), where checkpointing every layer costs +42% (LOW_ACTIVATION_BUDGET: memory.py).
_LOW_BUDGET_COST = 1.18
# A middle budget: session 10, H200, quickstart (4,864 tokens, base dequantized), one machine: 8.6 GiB less at peak
# for a median step 0.1548 s against 0.1391 (+11%); with the masks recomputed too (PHI3TUNE_COMPILE=masks=recompute)
# 13.1 GiB less for +19%, the low budget's price a GiB, so the plan leaves the masks saved. Its backward holds the
# default's matmuls (CPU: tests/test_compiled_layers.py), where 0.3 recomputes 4 more. Session 14, 16 GiB card, both
# with symbolic lengths, one machine: 0.1582 against 0.1675 s a step (0.944; these costs: 1.11 / 1.18 = 0.941)
_MIDDLE_BUDGET_COST = 1.11  # MIDDLE_ACTIVATION_BUDGET: 0.5 (memory.py, whose activation model it changes)
# The upper budget (memory.UPPER_ACTIVATION_BUDGET, 0.6; unpacked rows' symbolic graphs): session 34, 16 GiB
# quickstart, one machine, 21,794 tokens/s against the middle budget's 21,213 (x0.973; median step 0.1470 against
# 0.1523 s), the same losses; 21,560 on a second machine
_UPPER_BUDGET_COST = 1.08
# The 4-bit base dequantized once (dequantized.py) saves a fixed time per micro-batch: session 9, H200, one machine,
# median step 0.1545 -> 0.137 s unpacked (one 4,864-token micro-batch a step), 0.320 -> 0.304 s packed (one of
# 8,192), i.e. ~16 ms of a micro-batch that costs ~19 ms plus ~36.7 µs a token (session 8's fit)
_DEQUANTIZE_SAVES_MS, _MICRO_BATCH_MS, _TOKEN_MS = 16.0, 19.0, 0.0367
# Its first N layers alone (packed rows, plan_search.with_dequantized_base) save about half their share: session 33,
# 16 GiB, one machine, 17 of 32 layers, a median step 0.3647 s against 0.3740 (-2.5%, where N/32 of 16 ms says -5%)
_FIRST_LAYERS_SHARE = 0.5
# Combo kernels (plan_search.with_combo_kernels): session 18, 16 GiB quickstart, three same-machine pairs, +4.1%
# tokens/s
_COMBO_COST = 0.96
# Layers' activations in host memory (offload.py) instead of recomputed: each byte crosses the host link twice (out
# in forward, back in backward) on a side stream beside the compute, so only what the compute cannot hide costs.
# Session 20, 12 GiB quickstart, ABBA on one machine: the first 5 layers at 4,864 tokens (1.1 GiB a micro-batch)
# against the 4,096 plan that checkpoints none, over the 25 steps both ran in one pass, 4.11 / 4.59 s against
# 4.27 / 3.92 (~6% slower; whole runs 15,580 / 14,791 tokens/s against 17,268 / 18,964, with two ~0.6 s steps):
# of a PCIe 5 link's ~40 GB/s time (60 ms against a 197 ms micro-batch) ~0.35 shows, more with the slow steps
# Checkpointed inputs in host memory (offload.py, ``host_checkpoints``) are given the same exposure (not measured on a
# speed plan; the memory plan ran no slower with them, session 7): so ``auto`` takes them only where the plan without
# them does not fit or is slower, except beside a streamed base, which takes them always (plan_search._offloads)
_HOST_LINK_BYTES_PER_MS, _OFFLOAD_EXPOSED = 40e6, 0.4
# A pass never takes less than the host needs to queue it: session 18, H200, 87.9 ms a pass through the 32 compiled
# layers (micro-batches of <= 512 tokens, where the device is not the bound; 76 ms with combo kernels, which packed
# plans do not take). Session 22, call 3: packed rows on 24 GiB in 2,048-token micro-batches beside the dequantized
# base (~78 ms of device work a pass by the fit) queued ~110 ms a pass on a slower host and ran 18,302 tokens/s,
# against 22,364 for 16 GiB's 4,096-token plan on the same machine; the two had run alike on a fast host (22,675 /
# 22,689, session 16). Packed rows only: the unpacked sizes' table above was measured with the host in it
_HOST_PASS_MS = 88.0
# Layers compiled to a lower activation budget recompute cheap ops in backward: more kernels for the host to queue a
# pass. Session 24, call 3: packed rows on 8 GiB in 2,048-token micro-batches at the middle budget (symbolic lengths,
# up to 8 layers recomputed in graph) queued 159 ms a pass (0.636 s a step of 4) and ran 12,654 tokens/s, where
# call 1's 4,096-token plan at the default budget, 30 layers recomputed, ran 19,752 (another machine; Unsloth's
# fast path ran alike on session 24's machines: 15,309 / 14,975). The low budget, which
# recomputes more, is given the same floor (not measured).
_HOST_PASS_MS_RECOMPUTING = 159.0
# The 4-bit base streamed from host memory (streamed_base.py). Session 26: packed rows on a 5 GiB card (4,096-token
# micro-batches, 32 layers recomputed) ran 0.4235 s a step, what the model says of the same plan resident (0.419 s,
# from session 24's 8 GiB step); 6 GiB's unpacked plan 0.174 s where it says 0.176 (call 4). But call 3's machine ran
# that plan at 0.241 s and the 8 GiB one streamed 7.3% slower than resident where the model said 2% faster; and on 5
# GiB unpacked the device filled, so the paged optimizer state was read from host memory (0.267 s). So a streamed
# plan is taken only where it is predicted this much faster than the best resident one: small cards, whose resident
# plans cut micro-batches or fall to the memory plan
_STREAMED_COST = 1.10


def micro_batch_ms(tokens: int) -> float:
    """The fitted time of one full micro-batch of ``tokens`` (H200, the default budget, the base not dequantized)."""
    return _MICRO_BATCH_MS + _TOKEN_MS * tokens


def expected_cost(plan: CostedPlan, layers: int, packed: bool = False, steps: Sequence[int] | None = None) -> float:
    """Time per real token of a speed plan relative to 4,096-token micro-batches with no checkpointing (H200).
    A budget above 4,096 is a whole step per micro-batch (``whole_step_tokens``): 8,192's measured cost. ``packed``
    rows fill every micro-batch, so from 2,048 tokens up the fit of a micro-batch's time says what a size costs. The
    base dequantized once takes its measured ~16 ms off each micro-batch (its first N layers alone: half of N/L of
    it, measured); activations or checkpointed inputs in host memory cost
    ``_OFFLOAD_EXPOSED`` of the host link's time for them against the micro-batch's; a full (packed) pass costs at
    least the host's time to queue it (``_HOST_PASS_MS``; below the default budget ``_HOST_PASS_MS_RECOMPUTING``).
    Recomputation costs in proportion to the layers checkpointed: where they depend on the micro-batch's length
    (checkpoint_lengths.py), ``_BY_LENGTH_RECOMPUTE`` of the share token-weighted over ``steps`` (the data's steps'
    tokens, one micro-batch each), at most what checkpointing the longest's count on every pass costs. A base
    streamed from host memory crosses the host link twice a pass, behind the compute (a floor), and carries the
    margin ``_STREAMED_COST``."""
    budget = plan.micro_batch_tokens or 4096
    size = 8192 if budget > 4096 else min(_BUDGET_COST, key=lambda b: abs(b - budget))
    fitted = packed and size >= 2048
    per_size = micro_batch_ms(size) / size / (micro_batch_ms(4096) / 4096) if fitted else _BUDGET_COST[size]
    whole = bool(steps) and budget >= max(steps or (0,))  # each step one micro-batch
    by_length = recomputed_share(plan.checkpoint_lengths, layers, steps or ()) if whole else None
    share = plan.checkpoint_layers / max(1, layers)
    recompute = _RECOMPUTE_COST * min(1.0, share / _RECOMPUTE_FULL)
    if by_length is not None:
        recompute = min(recompute, _BY_LENGTH_RECOMPUTE * by_length)
    tier = budget_tier(plan.activation_budget)
    low = {"default": 1.0, "upper": _UPPER_BUDGET_COST, "middle": _MIDDLE_BUDGET_COST, "low": _LOW_BUDGET_COST}[tier]
    spared = 1.0 if plan.dequantized_base else _FIRST_LAYERS_SHARE * plan.dequantized_layers / max(1, layers)
    held = 1 - spared * _DEQUANTIZE_SAVES_MS / micro_batch_ms(size)
    combo = _COMBO_COST if plan.combo_kernels else 1.0
    away = plan.memory.get("host_offloaded", 0) + plan.memory.get("host_checkpoints", 0)  # out and back, each
    link_ms = 2 * away / _HOST_LINK_BYTES_PER_MS
    moved = _OFFLOAD_EXPOSED * link_ms / micro_batch_ms(min(budget, WHOLE_STEP_CAP))
    cost = per_size * low * held * combo * (1 + recompute + moved)
    streamed_ms = 2 * plan.memory.get("host_streamed", 0) / _HOST_LINK_BYTES_PER_MS  # forward's copies, backward's
    if streamed_ms:  # a pass takes at least the host link's time for the base streamed in (streamed_base.py)
        cost = max(cost, streamed_ms / size / (micro_batch_ms(4096) / 4096)) * _STREAMED_COST
    if fitted:  # the device's time for a full pass, or the host's where that is longer
        pass_ms = _HOST_PASS_MS if tier == "default" else _HOST_PASS_MS_RECOMPUTING
        floor = pass_ms / size / (micro_batch_ms(4096) / 4096) * combo
        cost = max(cost, floor)
    return cost

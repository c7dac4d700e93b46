"""Which plan ``optimize_for="auto"`` runs: of the speed plans that fit the free device memory, the one
``step_cost.expected_cost`` says is fastest.

plan.py builds one plan from its choices (``_candidate``); this module lists the choices worth building for a card
(micro-batch budgets, activation budgets, the fewest layers checkpointed or offloaded that fit), adds what the room
left allows (the base dequantized once, combo kernels), and keeps the cheapest. The named modes skip the search.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from typing import Any

import torch

from .knobs import (
    combo_wanted,
    dequantize_layers_wanted,
    dequantize_wanted,
    offload_asked,
    offload_layers_wanted,
    stream_base_wanted,
)
from .memory import (
    GIB,
    LOW_ACTIVATION_BUDGET,
    MIDDLE_ACTIVATION_BUDGET,
    UPPER_ACTIVATION_BUDGET,
    ModelShape,
    dequantized_bytes,
    load_bytes,
    total_gib,
)
from .plan import (
    COMBO_KERNELS_HIDDENS,
    COMBO_RECOMPUTED_HIDDENS,
    FIT_FRACTION,
    WHOLE_STEP_CAP,
    RunPlan,
    _candidate,
    _free_device_memory,
    can_stream,
)
from .plugins import QuantFacts, facts
from .runspec import RunSpec
from .shapes import LENGTH_GRANULE
from .step_cost import expected_cost

log = logging.getLogger("phi3tune")

# Combo kernels' extra is measured, not modelled (plan.COMBO_KERNELS_HIDDENS, the most seen), and the plans it joins
# predict above their device peaks, so it may take the card to COMBO_FIT_FRACTION of the free memory where that leaves
# COMBO_MARGIN_GIB: session 20, 12 GiB quickstart, 4,096-token plan with them 10.91 GiB device peak (predicted
# 11.16), +6% tokens/s in two same-machine pairs. On 8 GiB the margin binds (7.2 GiB, as FIT_FRACTION)
COMBO_FIT_FRACTION, COMBO_MARGIN_GIB = 0.94, 0.75
# Fewer dequantized layers than this are not worth their second family of compiled graphs (compiled_layers.py)
MIN_DEQUANTIZED_LAYERS = 4


def with_dequantized_base(plan: RunPlan, run: RunSpec, shape: ModelShape, free: int | None) -> RunPlan:
    """``plan`` with its 4-bit base dequantized once (dequantized.py) where that fits: a speed plan on CUDA whose
    predicted peak, with the dequantized weights, is still within ``FIT_FRACTION`` of ``free``. ``auto`` weighs
    each candidate so (``expected_cost``), so the weights may displace a larger micro-batch where that costs less
    than the dequantization saves. Only where the matmuls run in the autocast dtype, as bitsandbytes' do, and not
    under FSDP, which shards the 4-bit weights, nor where the base streams from host memory. PHI3TUNE_DEQUANTIZE
    (knobs.dequantize_wanted) overrides;
    Where the whole base does not fit, packed rows take the most first decoder layers that do (at least
    ``MIN_DEQUANTIZED_LAYERS``; ``RunPlan.dequantized_layers``); PHI3TUNE_DEQUANTIZE_LAYERS=N asks for N."""
    q = facts(run.quant, QuantFacts) if run.quant is not None else None
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(plan.precision, plan.compute_dtype)
    if q is None or q.bits != 4 or plan.sharded or autocast != plan.compute_dtype or plan.streamed_base:
        return plan
    values = dequantized_bytes(shape, plan.dtype.itemsize)

    def first(n: int) -> RunPlan:  # only the first n decoder layers dequantized
        return _plus(plan, "dequantized_weights", values * n // shape.layers, dequantized_layers=n)

    some = dequantize_layers_wanted()
    if some is not None and 0 < some < shape.layers:  # a benchmark's count, on any plan that can
        return first(some)
    held = _plus(plan, "dequantized_weights", values, dequantized_base=True)
    asked = dequantize_wanted()
    if asked is not None:
        return held if asked else plan
    if plan.mode != "speed" or not plan.device.startswith("cuda"):
        return plan
    if _fits(held, free):
        return held
    if not run.data.packing:
        return plan
    # packed rows: else the most first layers whose dequantized weights still fit (session 33, 16 GiB, one
    # machine: 17 layers, 0.3647 s a step against 0.3740; unpacked, 12 layers ran 0.1601 against 0.1472, so not there)
    fewer = (first(n) for n in range(shape.layers - 1, MIN_DEQUANTIZED_LAYERS - 1, -1))
    return next((p for p in fewer if _fits(p, free)), plan)


def with_combo_kernels(plan: RunPlan, shape: ModelShape, free: int | None, packed: bool) -> RunPlan:
    """``plan`` with inductor's combo kernels in its compiled layers where measured to pay and where its predicted
    peak plus their extra (``_combo_held``) still fits (``COMBO_FIT_FRACTION``): a speed plan on CUDA for
    unpacked rows that checkpoints no layer. Session 18, H200: a host-bound pass (512-token micro-batches) 13%
    shorter; 16 GiB quickstart +2.0% to +7.4% in three same-machine pairs (step_cost's ``_COMBO_COST``); the same
    losses; session 20, 12 GiB, +6%; session 21, with layers checkpointed by length (checkpoint_lengths.py) on 8,
    12 and 24 GiB. And the memory plan on CUDA, every layer recomputed in its graph with its input in host memory,
    packed rows or not: session 31, 8 GiB card, one machine, 0.4121 s a packed step against 0.4287-0.4298 without
    (+4.2%) and 0.1859 against 0.2208 unpacked (+16%), the same losses. Packed rows in the speed plans were not
    measured with them.
    PHI3TUNE_COMPILE=combo_kernels=0 / 1 (benchmarks) overrides."""
    held = _combo_held(plan, shape, combo_kernels=True)
    asked = combo_wanted()
    if asked is not None:
        return held if asked and plan.compile else plan
    speed = plan.mode == "speed" and not packed and (not plan.checkpointing or bool(plan.checkpoint_lengths))
    measured = plan.device.startswith("cuda") and (speed or (_lean_in_graph(plan) and plan.offload_checkpoints))
    return held if plan.compile and measured and _combo_fits(held, free) else plan


def _combo_held(plan: RunPlan, shape: ModelShape, **changes: Any) -> RunPlan:
    """``plan`` predicting combo kernels' measured extra at its longest micro-batch (``COMBO_KERNELS_HIDDENS``;
    ``COMBO_RECOMPUTED_HIDDENS`` where the memory plan recomputes every layer in its graph)."""
    hiddens = COMBO_RECOMPUTED_HIDDENS if _lean_in_graph(plan) else COMBO_KERNELS_HIDDENS
    extra = hiddens * shape.hidden * plan.dtype.itemsize * plan.peak_micro_batch_tokens
    return _plus(plan, "combo_kernels", extra, **changes)


def _lean_in_graph(plan: RunPlan) -> bool:
    """The memory plan with every layer recomputed inside its compiled graph (combo kernels' own extra there)."""
    return plan.mode == "memory" and plan.recompute_in_graph


def _combo_fits(held: RunPlan, free: int | None) -> bool:
    """``held`` (a plan with combo kernels' extra) fits ``FIT_FRACTION`` of ``free`` or the combo room."""
    return free is None or _fits(held, free) or held.predicted_peak_gib * GIB <= min(COMBO_FIT_FRACTION * free,
                                                                                      free - COMBO_MARGIN_GIB * GIB)


def _plus(plan: RunPlan, part: str, nbytes: int, **changes: Any) -> RunPlan:
    """``plan`` with ``changes`` and ``nbytes`` more memory under ``part``, its predicted peak counting them."""
    parts = {**plan.memory, part: nbytes}
    return replace(plan, memory=parts, predicted_peak_gib=total_gib(parts), **changes)


def _fits(plan: RunPlan, free: int | None) -> bool:
    """The plan's predicted peak, and what loading its model holds (``_loads``), are within ``FIT_FRACTION`` of
    ``free`` (unknown free memory: anything fits)."""
    return _loads(plan, free) and (free is None or plan.predicted_peak_gib * GIB <= FIT_FRACTION * free)


def _loads(plan: RunPlan, free: int | None) -> bool:
    """Loading the plan's model fits ``FIT_FRACTION`` of ``free``: a streamed base loads on the device first
    (``memory.load_bytes``)."""
    return free is None or load_bytes(plan.memory) <= FIT_FRACTION * free


def whole_step_tokens(run: RunSpec, step_tokens: int | None = None) -> int:
    """A micro-batch that holds a whole optimizer step: what a step can hold (sequences_per_step x max_seq_length)
    or, given ``step_tokens`` (the data's longest step: unpacked rows, the most of batching.step_lengths), that
    many tokens rounded up to a granule; at most ``WHOLE_STEP_CAP``. The README quickstart's first epoch holds at
    most 4,842 tokens a step of the 8,192 it could: sized to that, the plan keeps ~1/3 less at peak (session 8: 23.7 GiB
    against 37.1), and a longer step of a later epoch (4,961 in the second) makes two micro-batches."""
    cap = run.train.sequences_per_step * run.data.max_seq_length
    held = min(cap, -(-step_tokens // LENGTH_GRANULE) * LENGTH_GRANULE) if step_tokens else cap
    return min(WHOLE_STEP_CAP, held)


def _can_offload(plan: RunPlan) -> bool:
    """Layers' activations may wait in host memory (offload.py): compiled speed plans on CUDA, not under FSDP
    (whose gathers the side stream would race)."""
    return plan.mode == "speed" and plan.compile and plan.device.startswith("cuda") and not plan.sharded


def _offloads(plan: RunPlan, shape: ModelShape) -> bool:
    """Whether the search also weighs ``plan`` with its checkpointed inputs in host memory (offload.py): a speed plan
    that checkpoints every layer, where host offloading can run (``_can_offload``), unless PHI3TUNE_OFFLOAD or
    PHI3TUNE_OFFLOAD_LAYERS (benchmarks) decides. The inputs cross the host link twice a pass (step_cost prices it),
    so ``auto`` takes it where the plan without it does not fit or is slower: it holds ``hidden`` bytes a token and
    layer less (0.75 GiB for Phi-3-mini at 4,096 tokens). Beside a streamed base it is taken whenever every layer is
    checkpointed: session 27, 5 GiB card, a whole step (4,864 tokens) so ran 14,686 tokens/s at 4.96 GiB at the
    device, where 4,096-token micro-batches keeping their inputs had filled the device (5.00 GiB, predicted 4.44),
    the paged optimizer state then read from host memory: 11,659 (session 26). Plans that move their inputs run
    0.6-1.1 GiB above their parts at the device, which ``memory.OFFLOAD_EXTRA`` counts (and why)."""
    return plan.checkpoint_layers >= shape.layers and not plan.offload_checkpoints and _can_offload(plan) \
        and offload_asked() is None and offload_layers_wanted() is None


def _streams(run: RunSpec, shape: ModelShape, device: torch.device, processes: int) -> tuple[bool, ...]:
    """Whether the base streams from host memory (streamed_base.py), as the search weighs it: both ways on CUDA
    where it can, PHI3TUNE_STREAM_BASE=1 / 0 (benchmarks, tests) only that way."""
    able = can_stream(run, shape, processes)
    asked = stream_base_wanted()
    if asked is not None:
        return (asked and able,)
    return (False, True) if able and device.type == "cuda" else (False,)


def _speed_candidates(run: RunSpec, shape: ModelShape, targets: list[str], device: torch.device, optimize_for: str,
                      free: int | None, processes: int = 1, step_tokens: int | None = None) -> list[RunPlan]:
    """For each micro-batch budget (the user's, else a whole step when that is more than 4,096 tokens
    (``whole_step_tokens``) / 4,096 / 2,048 / 1,024) and activation budget (``_budgets``: the compiler's default, the
    upper one for unpacked rows, the middle one, the low one): the speed plan that checkpoints the fewest layers and
    still fits ``free`` (all of them when none fits), those layers for its longest micro-batch and fewer for shorter
    ones (``_by_length``); where it checkpoints every layer, the same with their inputs in host memory too
    (``_offloads``: instead, where the base streams); or, where it checkpoints any, host offloading can run
    (``_can_offload``) and a benchmark asks for it (knobs.offload_layers_wanted: a fixed count), the one that moves that
    many layers' activations to host memory instead. Not yet a choice of ``auto``: session 20 measured it slower on a
    12 GiB card; session 21 ran it on an 8 GiB card, steady steps faster than checkpointing but slower over 30 steps and
    near the card's edge (docs/performance.md)."""
    whole = whole_step_tokens(run, step_tokens)
    budgets = [None] if run.train.micro_batch_tokens else [*([whole] if whole > 4096 else []), None, 2048, 1024]
    forced = offload_layers_wanted()
    out: list[RunPlan] = []
    for streamed, budget in itertools.product(_streams(run, shape, device, processes), budgets):
        for low in _budgets(run):
            upper = low == UPPER_ACTIVATION_BUDGET  # measured only where it checkpoints no layer
            for k in range(1 if upper else shape.layers + 1):
                plan = _candidate(run, shape, targets, device, "speed", optimize_for, free, budget, k, processes,
                                  low, streamed=streamed)
                if _fits(plan, free):
                    break
            if upper and not _fits(plan, free):
                continue
            moved = bool(forced) and plan.checkpoint_layers > 0 and _can_offload(plan)
            # every layer checkpointed: their inputs may wait in host memory (beside a streamed base they do)
            away = _candidate(run, shape, targets, device, "speed", optimize_for, free, budget, shape.layers,
                              processes, low, streamed=streamed, offload=True) if _offloads(plan, shape) else None
            if away is not None and plan.streamed_base:
                out.append(away)
            elif moved:
                out.append(_candidate(run, shape, targets, device, "speed", optimize_for, free, budget, 0, processes,
                                      low, offload_layers=forced or 0, streamed=streamed))
            elif plan.checkpoint_layers:  # shorter micro-batches checkpoint fewer layers (checkpoint_lengths.py)
                out += _by_length(run, shape, targets, device, optimize_for, free, budget, plan.checkpoint_layers,
                                  processes, low, streamed)
            else:
                out.append(plan)
            if away is not None and not plan.streamed_base:
                out.append(away)
            if plan.checkpoint_layers == 0:  # fits whole: a lower activation budget is only slower
                break
    return out  # smaller budgets too, though slower alone: with the room they leave, the base may be dequantized


def _budgets(run: RunSpec) -> tuple[float, ...]:
    """The compiled layers' activation budgets the search weighs, highest first: the compiler's default, the middle
    and the low one, and for unpacked rows the upper one too, in plans that checkpoint no layer (measured there
    only, with symbolic lengths; with fixed ones the memory model counts it as keeping the default's activations,
    so it is never taken there)."""
    upper = () if run.data.packing else (UPPER_ACTIVATION_BUDGET,)
    return (1.0, *upper, MIDDLE_ACTIVATION_BUDGET, LOW_ACTIVATION_BUDGET)


def _by_length(run: RunSpec, shape: ModelShape, targets: list[str], device: torch.device, optimize_for: str,
               free: int | None, budget: int | None, layers: int, processes: int, low: float,
               streamed: bool = False) -> list[RunPlan]:
    """The plan that checkpoints ``layers`` for its longest micro-batch and fewer for shorter ones, and, where
    combo kernels would not fit beside it, the one with the fewest more layers at which they do (with the room
    they leave, the longest steps recompute a little more and every step launches fewer kernels)."""
    def by(k: int, by_length: bool = True) -> RunPlan:
        return _candidate(run, shape, targets, device, "speed", optimize_for, free, budget, k, processes, low,
                          by_length=by_length, streamed=streamed)

    plan = by(layers)
    if with_combo_kernels(plan, shape, free, run.data.packing).combo_kernels or not plan.checkpoint_lengths:
        return [plan]
    # the peak, and so the room, does not depend on the table: it is built for the count found
    more = range(layers + 1, shape.layers + 1)
    roomy = next((k for k in more if _combo_fits(_combo_held(by(k, False), shape), free)), None)
    return [plan] if roomy is None else [plan, by(roomy)]


def resolve_plan(run: RunSpec, shape: ModelShape, targets: list[str], device: torch.device,
                 free_bytes: int | None = None, processes: int = 1, step_tokens: int | None = None,
                 steps: list[int] | None = None) -> RunPlan:
    """The plan for ``run`` on ``device``. ``optimize_for="auto"``: on CUDA the fastest plan whose predicted peak
    fits the free memory, by ``expected_cost`` (speed with whole-step (up to 8,192), 4,096-, 2,048- or 1,024-token
    micro-batches and the fewest checkpointed or host-offloaded layers that fit, the 4-bit base resident or streamed
    from host memory (``_streams``), each with the base dequantized once where that still fits
    (``with_dequantized_base``) and with combo kernels where those fit (``with_combo_kernels``), or the memory plan
    at 4,096-, 2,048- or 1,024-token micro-batches, its base resident or streamed, where that is cheaper or alone
    fits),
    on the CPU the plain padded layout (no compiler, no Flex kernels to gain from). ``free_bytes`` overrides the
    measured free memory (estimates for another card); ``processes``: the run's ranks (FSDP divides what it shards);
    ``steps``: every step's tokens, once the data is known, which size a whole step (``whole_step_tokens``) and
    say what checkpointing by length costs (``expected_cost``); ``step_tokens``: the longest step alone (default:
    the most of ``steps``)."""
    asked = run.train.optimize_for
    if step_tokens is None and steps:
        step_tokens = max(steps)
    free = free_bytes if free_bytes is not None else _free_device_memory(device)
    packed = run.data.packing
    if asked != "auto" or device.type != "cuda":
        mode, forced = asked if asked != "auto" else "balanced", offload_layers_wanted()
        # a named mode streams the base when asked; the memory plan wherever it can (holding little is what it was
        # asked for: 1.6 GiB of Phi-3-mini's 4-bit base wait in host memory)
        asked_stream = stream_base_wanted()
        streamed = asked_stream if asked_stream is not None else mode == "memory" and True in _streams(
            run, shape, device, processes)
        named = _candidate(run, shape, targets, device, mode, asked, free, processes=processes, streamed=streamed)
        if streamed and asked_stream is None and not _loads(named, free):  # the base must fit while it loads
            named = _candidate(run, shape, targets, device, mode, asked, free, processes=processes)
        if forced and not named.checkpointing and not named.sharded:  # tests: offloading on any device
            named = _candidate(run, shape, targets, device, mode, asked, free, processes=processes,
                               offload_layers=forced, streamed=streamed)
        return with_combo_kernels(with_dequantized_base(named, run, shape, free), shape, free, packed)
    fits = [plan for plan in _speed_candidates(run, shape, targets, device, asked, free, processes, step_tokens)
            if _fits(plan, free)]
    # the base dequantized where it fits (faster, the same math), combo kernels in the room left, or combo kernels
    # first and the first layers dequantized in what they leave
    held = [with_dequantized_base(plan, run, shape, free) for plan in fits]
    combo = [c for c in (with_combo_kernels(p, shape, free, packed) for p in held) if c.combo_kernels]
    # (where nothing was dequantized, combo kernels' extra leaves less room: ``combo`` already holds that plan)
    first = [with_dequantized_base(c, run, shape, free) for c in (with_combo_kernels(p, shape, free, packed)
                                                                   for p, h in zip(fits, held) if h is not p)
             if c.combo_kernels]
    fits = held + combo + first
    if any(plan.dequantized_base for plan in fits):  # the first layers alone only where no plan holds the whole base
        fits = [plan for plan in fits if not plan.dequantized_layers]  # (measured on 16 GiB, not against it)
    # the memory plan too, its base resident or streamed: on the smallest cards it beats 1,024-token micro-batches
    # (not where a benchmark asks for speed plans that offload layers: PHI3TUNE_OFFLOAD_LAYERS)
    lean = [with_combo_kernels(_candidate(run, shape, targets, device, "memory", asked, free, budget,
                                          processes=processes, streamed=streamed), shape, free, packed)
            for budget, streamed in itertools.product((None, 2048, 1024), _streams(run, shape, device, processes))]
    fits += [plan for plan in lean if _fits(plan, free)] if offload_layers_wanted() is None else []
    if fits:
        return min(fits, key=lambda p: expected_cost(p, shape.layers, packed, steps))
    # the least it can hold: the smallest micro-batches, streamed where the model still loads, else resident
    # (pipeline.check_fits may refuse it)
    memory = min((plan for plan in lean if _loads(plan, free)), key=lambda p: p.predicted_peak_gib, default=lean[0])
    if not _fits(memory, free):
        log.warning("%s — more than the free device memory; it may run out of memory. Lower "
                    "data.max_seq_length or training.micro_batch_tokens", memory.describe())
    return with_dequantized_base(memory, run, shape, free)

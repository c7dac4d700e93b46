"""RunPlan: every decision about *how* a run executes, made once, before any weights load.

The four specs say what to train; the plan says how: precision, attention kernel, batch layout, micro-batch
token budget and its fixed shapes, compiled layers, activation checkpointing, output-head chunk, optimizer
paging, the 4-bit base dequantized once or not, and the peak memory that all of this predicts. ``run()``, the
loop, ``estimate_memory`` and ``bench`` read the plan; nothing re-derives a setting elsewhere. No plan changes which
tokens are trained or how the loss is weighted (tests/test_modes.py), so ``optimize_for="auto"`` can pick the
fastest plan that fits the device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .checkpoint_lengths import table
from .knobs import (
    checkpoints_by_length_wanted,
    compile_env,
    compile_settings,
    ddp_settings,
    offload_wanted,
    read_late_wanted,
    recompute_in_graph_wanted,
    stream_resident_wanted,
    yes,
)
from .loss import CE_CHUNK, TIGHT_CE_CHUNK
from .memory import (
    COMMUNICATION,
    GIB,
    ModelShape,
    estimate_parts,
    modelled_budget,
    per_rank_parts,
    symbolic_lengths_bytes,
    total_gib,
)
from .optim import optimizer_facts
from .plugins import AdapterFacts, QuantFacts, facts
from .precision import DTYPES, resolve_compute_dtype, resolve_precision
from .runspec import RunSpec
from .shapes import BUCKETS, attention_words, default_attention, granule_lengths, symbolic_lengths_pay
from .shapes import token_buckets as token_buckets
from .varlen_attention import NAME as VARLEN

log = logging.getLogger("phi3tune")

# What each mode switches. None of it changes the trained tokens or the loss weighting.
MODES: dict[str, dict[str, Any]] = {
    # the classic recipe's layout: right-padded batches, frozen non-quantized weights upcast to fp32 (PEFT)
    "balanced": {"padding_free": False, "upcast_frozen": True, "checkpointing": False, "compile": False,
                 "micro_batch_tokens": None, "ce_chunk": CE_CHUNK},
    # examples laid end to end, fenced by position ids, re-cut into <= 4,096-token micro-batches of a few fixed
    # lengths; frozen weights in the compute dtype; FlexAttention document masks and compiled layers on CUDA
    "speed": {"padding_free": True, "upcast_frozen": False, "checkpointing": False, "compile": True,
              "micro_batch_tokens": 4096, "ce_chunk": CE_CHUNK},
    # speed's layout with every layer checkpointed, 4,096-token micro-batches and 512-token output-head chunks; on
    # CUDA in their compiled graphs, the inputs in host memory, the base streamed where it can (plan_search; session
    # 27: 3.19 GiB allocated, 14,033 tokens/s on an 8 GiB card). The low budget applies under torch's checkpoint
    # (PHI3TUNE_RECOMPUTE_IN_GRAPH=0), whose recomputed layer it shrinks (session 9: at max_seq_length 4,096, 3.90
    # GiB allocated against session 7's 4.02)
    "memory": {"padding_free": True, "upcast_frozen": False, "checkpointing": True, "compile": True,
               "micro_batch_tokens": 4096, "ce_chunk": 512, "activation_budget": 0.3},  # LOW_ACTIVATION_BUDGET
}
FIT_FRACTION = 0.9  # "auto" takes a plan whose predicted peak is at most this share of the free device memory
WHOLE_STEP_CAP = 8192  # the longest micro-batch measured: a whole step is tried as one micro-batch up to this size
# Combo kernels' extra at peak in hidden vectors a micro-batch token, the most measured (session 18, Phi-3-mini,
# allocator peaks: +0.48 GiB on 12 GiB at 4,096 tokens and the 0.5 budget, 20.6 hiddens; +0.43 on 16 GiB at 4,864;
# +0 on the H200): fused launches keep some buffers alive together
COMBO_KERNELS_HIDDENS = 21
# The same where every layer recomputes inside its graph (the memory plan): session 31, 8 GiB card, 4,096-token
# micro-batches, +0.215 GiB at the device's peak packed (4.58 against 4.37) and +0.195 unpacked (4.47 against 4.27)
COMBO_RECOMPUTED_HIDDENS = 9


@dataclass(frozen=True)
class RunPlan:
    """The resolved execution plan of one run (see the module docstring)."""

    mode: str  # "speed" | "memory" | "balanced"
    optimize_for: str  # TrainSpec.optimize_for as given ("auto", ...); ``mode`` is what it resolved to
    device: str
    precision: str  # "bf16" | "fp16" | "fp32": autocast of the loop
    compute_dtype: str  # dtype of the frozen base's matmuls: "bfloat16" | "float16" | "float32"
    attn_implementation: str | None  # None: transformers' default (SDPA)
    layout: str  # "padded" | "packed" | "padding_free": how examples become micro-batches (batching.py)
    micro_batch_tokens: int | None  # token budget of a micro-batch (padding-free plans)
    token_buckets: tuple[int, ...]  # every padding-free micro-batch is padded up to one of these lengths
    position_cap: int  # pads' position ids stay below this (the longest example), so RoPE scaling never changes
    compile: bool  # torch.compile of every decoder layer
    checkpointing: bool  # activation checkpointing of (some) decoder layers
    checkpoint_layers: int  # how many decoder layers are checkpointed (the first ones); the rest keep activations
    activation_budget: float  # compiled layers: the compiler recomputes what keeps saved activations under this share
    expandable_segments: bool  # CUDA's allocator maps memory as it grows (_isolation.allocator_for): no fragments
    dynamic_lengths: bool  # compiled layers: one graph for every length (token_buckets: multiples of a granule)
    upcast_frozen: bool  # frozen non-quantized weights in fp32 (PEFT's prepare_model_for_kbit_training)
    ce_chunk: int  # tokens per output-head + cross-entropy chunk
    optimizer: str
    paged_optimizer: bool
    sequences_per_step: int
    peak_micro_batch_tokens: int  # the largest micro-batch, whose activations the predicted peak counts
    predicted_peak_gib: float
    device_memory_gib: float | None = None  # free device memory when the plan was made (CUDA)
    memory: dict[str, int] = field(default_factory=dict)  # bytes per component of the predicted peak (per GPU)
    processes: int = 1  # ranks of the run (torchrun / accelerate launch)
    sharded: bool = False  # FSDP over those ranks: the peak counts each rank's shard
    shard_from_cpu: bool = False  # FSDP on CUDA: load the base on the CPU, so no GPU ever holds all of it
    # DDP's gradient buckets (DistributedDataParallelKwargs). PHI3TUNE_DDP overrides them, for benchmarks only
    # (examples/benchmarks/h200.sh): "bucket_cap_mb=100,gradient_as_bucket_view=1"
    ddp: dict[str, Any] = field(default_factory=dict)
    # checkpointed layers' inputs held in pinned host memory until backward (offload.py): the memory plan on one or
    # more CUDA GPUs without FSDP, and the speed plans that checkpoint every layer where ``auto`` finds it pays
    # (plan_search._offloads); PHI3TUNE_OFFLOAD=1 / 0 (benchmarks) asks for it wherever every layer is checkpointed /
    # never
    offload_checkpoints: bool = False
    # the frozen 4-bit base dequantized once, kept for the run in the compute dtype (dequantized.py): the speed
    # plans on CUDA, where it fits; PHI3TUNE_DEQUANTIZE=1 / 0 (benchmarks, tests) asks for it on any plan / never
    dequantized_base: bool = False
    # only the first N decoder layers' 4-bit weights dequantized once (PHI3TUNE_DEQUANTIZE_LAYERS, benchmarks):
    # where the whole base does not fit, some of its ~16 ms a micro-batch for N/L of its 6.8 GiB
    dequantized_layers: int = 0
    # compiled layers: the partitioner may recompute the hashed LoRA dropout masks instead of saving them
    # (knobs.RECOMPUTE_MASKS). Only PHI3TUNE_COMPILE=masks=recompute (benchmarks) asks for it. Session 40 (int32
    # hash) measured it free on the packed H200 (session 10, int64: +7.6%), but where the plans are short of room
    # step_cost says the layers it would spare are worth <= 0.4% (24 GiB), within what a run varies: not adopted
    recompute_masks: bool = False
    # compiled layers' independent kernels launched together (inductor's combo kernels): fewer launches, so less
    # host time a pass (with_combo_kernels)
    combo_kernels: bool = False
    # each step's loss and gradient norm read off the device one step late (late_read.py): the host queues the next
    # step without waiting for this one. CUDA plans but fp16 and FSDP; PHI3TUNE_READ_LATE=1 / 0 (knobs.read_late_wanted)
    read_late: bool = False
    # the first this many decoder layers' saved activations wait for backward in pinned host memory instead of
    # being recomputed (offload.py). Only PHI3TUNE_OFFLOAD_LAYERS=N (benchmarks, tests) asks for it, on a speed plan
    # that would checkpoint layers (plan_search._speed_candidates): sessions 20-21 measured no gain yet
    offload_layers: int = 0
    # checkpointing by micro-batch length (checkpoint_lengths.py): ((up to N tokens, checkpoint the first K layers),
    # ...), ascending; the last is the longest micro-batch's ``checkpoint_layers``. Empty: every pass checkpoints
    # ``checkpoint_layers``. Speed plans that checkpoint, unless PHI3TUNE_CKPT_BY_LENGTH=0 (benchmarks)
    checkpoint_lengths: tuple[tuple[int, int], ...] = ()
    # compiled layers that checkpoint do so inside their own graphs: compiled a second time at activation budget 0,
    # they keep only their inputs and recompute the rest in their backward graph, the same math as
    # torch.utils.checkpoint without its extra forward call per layer on the host (recompute.RecomputeSwitch).
    # Compiled speed plans that checkpoint, but not with inputs in host memory nor under FSDP;
    # PHI3TUNE_RECOMPUTE_IN_GRAPH=0 (benchmarks) never
    recompute_in_graph: bool = False
    # the 4-bit base's packed weights in pinned host memory, two decoder layers' worth on the device, streamed in a
    # layer ahead (streamed_base.py): ``auto`` where it pays its margin (plan_search), PHI3TUNE_STREAM_BASE=1 on
    # any plan of one process with a 4-bit base, not dequantized
    streamed_base: bool = False
    # of a streamed base, this many decoder layers keep their packed bytes on the device, spread evenly
    # (streamed_base.resident_layers): only PHI3TUNE_STREAM_RESIDENT=N asks for it (benchmarks), until measured
    resident_layers: int = 0

    @property
    def padding_free(self) -> bool:
        """Examples laid end to end in one row, fenced by position ids, re-cut within the token budget."""
        return self.layout == "padding_free"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @property
    def varlen_bounds(self) -> bool:
        """Attention is varlen_attention's: every micro-batch carries its examples' cumulative lengths."""
        return self.attn_implementation == VARLEN

    def compile_settings(self) -> dict[str, Any]:
        """How its compiled layers compile (knobs.compile_settings of the plan's budget, masks, combo kernels)."""
        return compile_settings(self.activation_budget, self.recompute_masks, self.combo_kernels)

    def length_words(self) -> str:
        """The micro-batch lengths in words: the fixed ones, or the symbolic graphs' granule and largest."""
        if self.dynamic_lengths:
            return f"a multiple of {self.token_buckets[0]:,} (up to {self.token_buckets[-1]:,})"
        return "/".join(f"{b:,}" for b in self.token_buckets)

    def describe(self) -> str:
        """One line for the log: what runs, and how much memory it should take."""
        how = [f"padding-free micro-batches of {self._budget_words()} padded to {self.length_words()} tokens"
               ] if self.padding_free else [f"padded batches, {self.sequences_per_step} sequences a step"]
        how.append(attention_words(self.attn_implementation))
        how.append("compiled layers" if self.compile else "eager layers")
        if self.activation_budget < 1.0:  # only compiled layers on CUDA get a low one (_candidate)
            how.append(f"activations recomputed to a {self.activation_budget:g} budget"
                       + (", dropout masks too" if self.recompute_masks else ""))
        elif self.recompute_masks:
            how.append("dropout masks recomputed")
        if self.checkpointing:
            how.append(f"activation checkpointing of {self.checkpoint_layers} layers"
                       + (" inside their compiled graphs" if self.recompute_in_graph else "")
                       + (f", their inputs in host memory ({_gib(self.memory.get('host_checkpoints', 0) / GIB)} a "
                          "micro-batch)" if self.offload_checkpoints else "")
                       + (f" (by length: {self._lengths_words()})" if self.checkpoint_lengths else ""))
        if self.offload_layers:
            how.append(f"the first {self.offload_layers} layers' activations in host memory "
                       f"({_gib(self.memory.get('host_offloaded', 0) / GIB)})")
        if self.dequantized_base or self.dequantized_layers:
            where = f" in the first {self.dequantized_layers} layers" if self.dequantized_layers else ""
            how.append(f"4-bit base dequantized once{where} ({_gib(self.memory.get('dequantized_weights', 0) / GIB)})")
        if self.streamed_base:
            how.append(f"4-bit base streamed from host memory ({_gib(self.memory.get('host_streamed', 0) / GIB)}), "
                       "a layer ahead" + (f", {self.resident_layers} layers resident" if self.resident_layers else ""))
        if self.combo_kernels:
            how.append("combo kernels")
        if self.read_late:
            how.append("each step's numbers read a step late")
        how.append(self.precision + (", frozen weights fp32" if self.upcast_frozen else ""))
        name = self.optimizer.removeprefix("paged_")
        how.append(f"paged {name.removeprefix('Paged')}" if self.paged_optimizer else name)
        if self.sharded:
            how.append(f"FSDP over {self.processes} processes (peak per GPU)"
                       + (", base loaded on the CPU" if self.shard_from_cpu else ""))
        elif self.ddp:
            how.append("DDP " + " ".join(f"{k}={v}" for k, v in sorted(self.ddp.items())))
        fits = f" of {self.device_memory_gib:.1f} GiB free" if self.device_memory_gib is not None else ""
        chosen = f"{self.mode} (auto)" if self.optimize_for == "auto" else self.mode
        return f"plan: {chosen} — {', '.join(how)}; predicted peak {_gib(self.predicted_peak_gib)}{fits}"

    def _lengths_words(self) -> str:
        """``checkpoint_lengths`` in words: how many layers each length range checkpoints."""
        return ", ".join(f"{k} up to {n:,} tokens" for n, k in self.checkpoint_lengths)

    def _budget_words(self) -> str:
        """The micro-batch sizes the run really makes: an example longer than the budget gets its own."""
        budget, peak = self.micro_batch_tokens or 0, self.peak_micro_batch_tokens
        if budget >= peak:
            return f"<= {peak:,} tokens"
        return (f"<= {budget:,} tokens (training.micro_batch_tokens), or one example of up to {peak:,} "
                "(data.max_seq_length) when it is longer")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_buckets"] = list(self.token_buckets)
        d["checkpoint_lengths"] = [list(e) for e in self.checkpoint_lengths]
        d["padding_free"] = self.padding_free
        d["requested"] = self.optimize_for  # the key plan files had before
        d["summary"] = self.describe()
        return d


def _gib(gib: float) -> str:
    """A size in the plan's line: one decimal from 1 GiB up, two below."""
    return f"{gib:.{1 if gib >= 1 else 2}f} GiB"


def _free_device_memory(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def _allocator_unset() -> bool:
    """The user configured no expandable segments of their own (PYTORCH_CUDA_ALLOC_CONF): the plan may."""
    return "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def can_stream(run: RunSpec, shape: ModelShape, processes: int) -> bool:
    """The base can stream from host memory (streamed_base.py): 4-bit, one process (FSDP shards it instead), every
    decoder layer alike (they share the device slots)."""
    four_bit = run.quant is not None and facts(run.quant, QuantFacts).bits == 4
    return four_bit and processes == 1 and shape.uniform_layers


def _candidate(run: RunSpec, shape: ModelShape, targets: list[str], device: torch.device, mode: str,
               optimize_for: str, free: int | None, budget_override: int | None = None,
               checkpoint_layers: int | None = None, processes: int = 1,
               activation_budget: float = 1.0, offload_layers: int = 0, by_length: bool = False,
               streamed: bool = False, offload: bool | None = None) -> RunPlan:
    """The plan of ``mode``; ``checkpoint_layers`` checkpoints that many decoder layers (default: the mode's);
    ``processes``: the run's ranks (under FSDP the peak is per GPU); ``activation_budget``: compiled layers';
    ``offload_layers``: that many (uncheckpointed) layers' activations in host memory; ``by_length``: shorter
    micro-batches checkpoint fewer layers within the same predicted peak (checkpoint_lengths.py), where the plan
    checkpoints some, not all by its mode, and keeps no checkpointed input in host memory; ``streamed``: the 4-bit
    base streamed from host memory, where it can be (``can_stream``); ``offload``: checkpointed inputs in host
    memory where every layer is checkpointed, on CUDA and not under FSDP (None: the mode's default or the knob's,
    ``offload_wanted``)."""
    t, d = run.train, run.data
    q = facts(run.quant, QuantFacts) if run.quant is not None else None
    a = facts(run.adapter, AdapterFacts)
    m = MODES[mode]
    precision = resolve_precision(t.precision, device)
    dtype = resolve_compute_dtype(run.quant, precision, device)
    padding_free = bool(m["padding_free"])
    budget = (t.micro_batch_tokens or budget_override or m["micro_batch_tokens"]) if padding_free else None
    knobs = compile_env()  # benchmarks: more fixed lengths, or symbolic-length graphs
    count = int(knobs.get("lengths", BUCKETS))
    buckets = token_buckets(budget, d.max_seq_length, t.sequences_per_step * d.max_seq_length, count) if budget else ()
    cuda = device.type == "cuda"
    sharded = t.distributed == "fsdp" and processes > 1
    # under FSDP too: distributed.keep_quant_state_on_gathered_weights keeps 4-bit layers traceable there
    compile_ = t.compile if t.compile is not None else bool(m["compile"] and cuda and padding_free)
    activation_budget = min(activation_budget, m.get("activation_budget", 1.0)) if compile_ and cuda else 1.0
    recompute_masks = bool(compile_ and cuda and knobs.get("masks") == "recompute")
    layout = "padding_free" if padding_free else "packed" if d.packing else "padded"  # the one place it is chosen
    attn = run.attn_implementation or default_attention(device, layout != "padded", dtype)
    checkpointing = bool(m["checkpointing"] or t.gradient_checkpointing or checkpoint_layers)
    # (the offloaded inputs are then the ones the in-graph checkpoints save: offload.offloader_for)
    in_graph = mode in ("speed", "memory") and checkpointing and compile_ and not sharded \
        and recompute_in_graph_wanted()
    if in_graph and mode == "memory":  # every layer recomputes in its graph: the plan's own graphs serve eval alone
        activation_budget = 1.0
    asked = knobs.get("dynamic_lengths")
    dynamic = bool(compile_ and buckets and (yes(asked) if asked else symbolic_lengths_pay(
        attn, d.packing, activation_budget, memory_plan=mode == "memory" and not in_graph)))
    fixed, buckets = buckets, granule_lengths(buckets[-1]) if dynamic else buckets
    if checkpoint_layers is None or m["checkpointing"] or t.gradient_checkpointing:
        checkpoint_layers = shape.layers if checkpointing else 0
    tokens = buckets[-1] if buckets else t.batch_size * d.max_seq_length
    act_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    opt = optimizer_facts(t.optimizer, device.type)
    every = checkpointing and checkpoint_layers >= shape.layers
    offload = offload_wanted(mode, every, cuda, sharded, chosen=offload)
    moved = 0 if checkpointing else min(offload_layers, shape.layers)  # layers whose activations go to host memory
    streamed = streamed and can_stream(run, shape, processes)
    resident = min(stream_resident_wanted() or 0, shape.layers) if streamed else 0

    def parts_of(symbolic: bool, chunk: int, n: int = tokens, k: int = checkpoint_layers) -> dict[str, int]:
        kept_as = modelled_budget(activation_budget, symbolic)  # symbolic-length graphs keep other activations
        parts = estimate_parts(
            shape, bits=q.bits if q is not None else None, double_quant=q is not None and q.double_quant,
            targets=set(targets), r=a.r, dropout=a.dropout, optimizer_state_bytes=opt.state_bytes,
            act_bytes=act_bytes, upcast_frozen=bool(m["upcast_frozen"]), tokens=n, checkpointing=checkpointing,
            compiled=compile_ and cuda, ce_chunk=chunk, cuda=cuda, checkpoint_layers=k,
            activation_budget=kept_as, offload=offload, masks_recomputed=recompute_masks,
            offload_layers=moved, recompute_in_graph=in_graph, streamed_base=streamed, resident_layers=resident)
        return {**parts, "symbolic_lengths": symbolic_lengths_bytes(shape, n, act_bytes, activation_budget)} \
            if symbolic else parts

    def over(parts: dict[str, int]) -> bool:  # the parts would not fit in FIT_FRACTION of the free memory
        return free is not None and total_gib(parts) * GIB > FIT_FRACTION * free

    chunk = int(m["ce_chunk"])
    parts = parts_of(dynamic, chunk)
    if mode == "speed" and over(parts) and chunk > TIGHT_CE_CHUNK:  # smaller output-head chunks: the same matmuls
        chunk, parts = TIGHT_CE_CHUNK, parts_of(dynamic, TIGHT_CE_CHUNK)
    if dynamic and not asked and over(parts):
        fixed_parts = parts_of(False, chunk)  # where fixed lengths fit and the symbolic length does not: fixed
        if total_gib(fixed_parts) < total_gib(parts):
            dynamic, buckets, parts = False, fixed, fixed_parts
    lengths: tuple[tuple[int, int], ...] = ()
    # not under FSDP: ranks whose micro-batches differ in length would checkpoint different layers
    if by_length and checkpoint_layers > 0 and not (m["checkpointing"] or t.gradient_checkpointing or offload) \
            and not sharded and len(buckets) > 1 and checkpoints_by_length_wanted():
        peak = total_gib(parts)
        lengths = table(granule_lengths(tokens), checkpoint_layers, peak,  # every length a fitted bucket may take
                        lambda n, k: total_gib(parts_of(dynamic, chunk, n, k)))
    whole = parts["quantized_weights"] + parts["other_weights"] + parts["cuda_context"]
    shard_from_cpu = sharded and cuda and free is not None and whole > FIT_FRACTION * free
    parts = per_rank_parts(parts, shape, processes) if sharded else parts
    if cuda and processes > 1:  # NCCL's buffers on every GPU (DDP and FSDP alike)
        parts = {**parts, "communication": COMMUNICATION}
    return RunPlan(
        mode=mode, optimize_for=optimize_for, device=str(device), precision=precision,
        compute_dtype=str(dtype).removeprefix("torch."), attn_implementation=attn, layout=layout,
        micro_batch_tokens=budget, token_buckets=buckets, position_cap=d.max_seq_length, compile=compile_,
        checkpointing=checkpointing, checkpoint_layers=checkpoint_layers, activation_budget=activation_budget,
        upcast_frozen=bool(m["upcast_frozen"]),
        ce_chunk=chunk, optimizer=t.optimizer, paged_optimizer=opt.paged,
        sequences_per_step=t.sequences_per_step, peak_micro_batch_tokens=tokens, predicted_peak_gib=total_gib(parts),
        device_memory_gib=round(free / GIB, 1) if free is not None else None, memory=parts, processes=processes,
        sharded=sharded, shard_from_cpu=shard_from_cpu, expandable_segments=cuda and _allocator_unset(),
        dynamic_lengths=dynamic, offload_checkpoints=offload, recompute_masks=recompute_masks,
        ddp=ddp_settings() if processes > 1 and not sharded else {},
        read_late=read_late_wanted(cuda, precision, sharded),
        offload_layers=moved, checkpoint_lengths=lengths,
        recompute_in_graph=in_graph, streamed_base=streamed, resident_layers=resident)

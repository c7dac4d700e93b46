"""Peak-memory arithmetic for a run, from the model's shapes and the plan's settings: no weights, no device.

The activation model (saved elements per token per decoder layer = 14 x hidden + 5 x intermediate + 95, with
LoRA dropout on) was fitted with saved-tensor hooks on seven CPU shapes (tests/test_bench.py re-measures it) and
checked within 10% on the H200 under bf16 autocast (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
STREAMED_LAYERS = 2  # decoder layers whose packed 4-bit bytes a streamed base holds on the device (its slots)
CUDA_CONTEXT = int(0.5 * GIB)
# each GPU of a run with several processes: NCCL's buffers and its kernels, outside PyTorch's allocator. Measured on
# 2x H200 (session 4, Phi-3-medium under FSDP on 8 GiB cards): ~1.0 GiB per GPU beyond the context
COMMUNICATION = int(1.0 * GIB)
_ACT_COEF = (14.0, 5.0, 95.0)
_NO_DROPOUT = 0.83  # share of the above left without LoRA dropout (CPU fit)
_COMPILED = 0.85  # compiled layers keep fewer intermediates (H200: 12.3 vs 14.0 GiB at equal batches)
# compiled layers under a low activation budget (LOW_ACTIVATION_BUDGET): H200, quickstart at 4,096 tokens,
# 9.25 GiB at peak against 17.69 with the default budget, that is 5.3 GiB of activations against 13.8
_LOW_BUDGET = 0.40
# the middle budget (plan.MIDDLE_ACTIVATION_BUDGET): H200, quickstart at 4,864 tokens, 8.7 GiB less at the device
# peak than the default budget, i.e. 58% of the default's 20.7 GiB of activations kept (with the masks, which it
# does not recompute); 0.60 leaves a margin
_MIDDLE_BUDGET = 0.60
# The classic layout (``upcast_frozen``: PEFT's prepare_model_for_kbit_training puts the frozen norms in fp32) runs a
# quantized 16-bit model's residual stream in fp32 (bitsandbytes casts each output back to its input's dtype), so its
# layers keep more than the fit above says in the activation dtype: x1.24 on the H200 (the README quickstart under
# ``balanced``, its largest micro-batches 4 x 512 tokens: 16.68 GiB allocated at peak where the fit said 14.26,
# session 16), x1.27 on the CPU (tests/test_bench.py measures it)
_UPCAST_ACTIVATIONS = 1.24
# A layer recomputed inside its compiled backward graph (RunPlan.recompute_in_graph) holds more at once than
# torch.utils.checkpoint's recomputation of it: 8 GiB card, 4,864-token micro-batches, every layer checkpointed,
# 5.45 GiB allocated at peak against 5.27 (6.98 / 6.69 at the device), one machine, session 23; 0.18 GiB is 28%
# of that layer's modelled activations
_IN_GRAPH_RECOMPUTED = 1.28
# Checkpointed inputs in host memory (offload.py) hold more at the device than the parts say, growing with the inputs
# moved a micro-batch. Device peak above the parts without this, Phi-3-mini, streamed base (sessions 27-28): 0.62 GiB
# at 2,048 tokens (0.375 GiB moved), 1.00-1.12 at 4,096 (0.75 moved; 7 runs), 0.78 at 4,864, 1.88-1.98 at 8,192 (1.5
# moved); the base resident, packed 4,096 tokens on 6 GiB: 0.68. Counted as OFFLOAD_EXTRA x the moved bytes (0.9 GiB
# at 4,096 tokens, session 27's constant there): within 0.2 GiB of each of those runs, over the rest. Where
# it comes from (session 28, call 3's trace): the allocator *reserved* 0.37-1.40 GiB above its allocated peak, the
# gap growing with the moved inputs, because each moved input's block was freed under ``record_stream`` and so
# could be reused only once every copy queued on the side stream by then had run, which, with the host a step
# ahead, held nearly all of them. offload.py no longer frees that way (it holds each input for offload.HELD_SAVES
# saves, then makes the compute stream wait for its copy): session 29, 8 GiB card, packed 4,096 tokens, 4.51 GiB at the
# device (predicted 4.48: 0.6% under) where record_stream took 4.66, its reservation 0.73 GiB above the steps'
# allocated peak (2.73) against 0.91; that gap is no longer the copies', so the allowance stays. The streamed runs'
# allocated peak, 3.185 GiB, is the base coming back to the device at the run's end (unstream_base); their steps
# stay under it at 4,096 tokens (2.71-2.73 GiB, session 29)
OFFLOAD_EXTRA = 1.2
# Where every saved tensor moves (offload.py), the forward's last saves worth this many hidden vectors a token stay on
# the device: backward needs them first, so a copy out and back would make it wait at its start, and the forward's
# end waits for the copies still in flight (session 30's profile, 8 GiB packed: 9.9 ms over 4 micro-batches waiting
# on copies out, 9.1 on copies back). For Phi-3-mini that is the last layer's input and the final norm's fp32 input
# (1 + 2 hiddens), 72 MiB at 4,096 tokens. Not counted at the peak, which is inside a layer's recomputed backward,
# once the tail is used up: session 31, 8 GiB packed, the device's peak 4.37 GiB with it against 4.39 without
OFFLOAD_TAIL_HIDDENS = 3
# the speed plans' upper budget, for unpacked rows' symbolic-length graphs only (plan_search._budgets): session 34,
# 16 GiB quickstart, one machine, 21,794 tokens/s at 10.53 GiB allocated against the middle budget's 21,213 at 10.10
# (0.7: 21,467 / 21,500 at 10.97; 0.8: 22,059 at 14.09, 15.89 at the device of the card's 16)
UPPER_ACTIVATION_BUDGET = 0.6
MIDDLE_ACTIVATION_BUDGET = 0.5  # the speed plans' middle budget (plan.py: its cost); below it, the low budget's share
LOW_ACTIVATION_BUDGET = 0.3  # the speed plans' low budget and the memory plan's (plan.py: why, and its cost)


def budget_tier(activation_budget: float) -> str:
    """Which measured budget a compiled layer's ``activation_budget`` falls under: "default" (1.0), "upper" (from
    UPPER_ACTIVATION_BUDGET), "middle" (from MIDDLE_ACTIVATION_BUDGET) or "low"; the one rule both the memory
    model here and step_cost.expected_cost read."""
    if activation_budget >= 1.0:
        return "default"
    if activation_budget >= UPPER_ACTIVATION_BUDGET:
        return "upper"
    return "middle" if activation_budget >= MIDDLE_ACTIVATION_BUDGET else "low"


# Symbolic-length compiled layers (shapes.symbolic_lengths_pay) keep more than fixed-length ones: hidden-sized
# vectors per token and layer, in the activation dtype, per budget tier. Low: Phi-3-mini at 4,864 tokens, 0.3
# budget, 12.38 against 10.97 GiB at the device's peak (10.44 against 9.64 allocated), with FlexAttention and with
# varlen attention alike (session 12). Middle: none since each layer compiles its symbolic graph first
# (compiled_layers.symbolic_from_the_first_length). Session 15 measured 0.4 hiddens when a static graph came
# first (16 GiB card, 4,864 tokens: 12.06 GiB at the device's peak). Session 24 ran the same plan at 11.69 (10.10
# allocated against 10.96 in session 22), and the 12 GiB card's at 9.94 against 10.70. The middle budget's
# modelled share alone then predicts 12.34 and 10.80, 5.6% and 8.7% above. At the default budget they keep the
# same. Upper: the low budget's share (``modelled_budget``) and 0.5 more: session 34, 16 GiB quickstart at 4,864
# tokens, 10.53 GiB allocated at the 0.6 budget against 10.10 at the middle one (0.49 hiddens a token and layer;
# predicted 12.78, 12.40 at the device)
SYMBOLIC_HIDDENS = {"low": 1.6, "upper": 0.5}


# Symbolic-length compiled layers at the middle budget keep what they keep at the low one (and, until each compiled
# its symbolic graph first, a little more: SYMBOLIC_HIDDENS above): Phi-3-mini at 4,864 tokens, 10.53 GiB
# allocated at peak against 10.44 (16 GiB card, one call, session 14), where the fixed-length middle-budget graphs
# kept 15.01 (20 GiB card, session 13). Why the partitioner keeps less with a symbolic token dimension is not known
# (one layer compiled alone saves the same with either, on the CPU and on the GPU: session 14,
# examples/benchmarks/saved_tensors.py); the plan follows the runs.
def modelled_budget(activation_budget: float, symbolic: bool) -> float:
    """The activation budget whose measured activations a plan's compiled layers keep: their own, except
    symbolic-length graphs at the middle or upper budget, which keep the low budget's (measured above; the upper
    one a little more: ``SYMBOLIC_HIDDENS``)."""
    lean = symbolic and budget_tier(activation_budget) in ("middle", "upper")
    return LOW_ACTIVATION_BUDGET if lean else activation_budget


def symbolic_lengths_bytes(shape: ModelShape, tokens: int, act_bytes: int, activation_budget: float) -> int:
    """What symbolic-length graphs under ``activation_budget`` (the plan's own, not ``modelled_budget``'s) add to
    a plan's peak (``SYMBOLIC_HIDDENS``); 0 where nothing was measured to differ."""
    hiddens = SYMBOLIC_HIDDENS.get(budget_tier(activation_budget), 0.0)
    return int(hiddens * shape.hidden * act_bytes * tokens * shape.layers)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model: read off a weightless (meta) copy."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # (dotted name, in, out) of every linear layer but the head
    other_params: int  # every parameter outside those linears (embeddings, norms, head)

    @classmethod
    def of(cls, meta_model: Any) -> ModelShape:
        from torch import nn

        head = meta_model.get_output_embeddings()
        linears = tuple((name, m.in_features, m.out_features) for name, m in meta_model.named_modules()
                        if isinstance(m, nn.Linear) and m is not head)
        total = sum(p.numel() for p in meta_model.parameters())  # tied weights are counted once
        cfg = meta_model.config
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, linears,
                   total - sum(i * o for _, i, o in linears))

    @property
    def uniform_layers(self) -> bool:
        """Every decoder layer (``layers.N.`` in a linear's name) has the same linears, in and out: what a streamed
        base's shared slots need (streamed_base.py)."""
        per_layer: dict[str, list[tuple[str, int, int]]] = {}
        for name, fan_in, fan_out in self.linears:
            _, sep, rest = name.partition("layers.")
            index, _dot, inner = rest.partition(".")
            if sep and index.isdigit():
                per_layer.setdefault(index, []).append((inner, fan_in, fan_out))
        return len({tuple(sorted(v)) for v in per_layer.values()}) == 1


def estimate_parts(shape: ModelShape, *, bits: int | None, double_quant: bool, targets: set[str], r: int,
                   dropout: float, optimizer_state_bytes: int, act_bytes: int, upcast_frozen: bool, tokens: int,
                   checkpointing: bool, compiled: bool, ce_chunk: int, cuda: bool,
                   checkpoint_layers: int | None = None, activation_budget: float = 1.0,
                   offload: bool = False, masks_recomputed: bool = False,
                   offload_layers: int = 0, recompute_in_graph: bool = False,
                   streamed_base: bool = False, resident_layers: int = 0) -> dict[str, int]:
    """Bytes per component of the peak: weights, adapter + grads + optimizer state, activations, one CE chunk.
    ``optimizer_state_bytes`` per trainable parameter: ``optim.optimizer_facts``. ``checkpoint_layers``: how many
    decoder layers are checkpointed (default: all when ``checkpointing``). Compiled layers under a low
    ``activation_budget`` recompute their hashed LoRA dropout masks (lora_dropout.py) and so keep what they keep
    without dropout; under the default budget the compiler still saves the masks, a byte an element (H200: 20.55
    GiB at peak with hashed masks, 20.57 with nn.Dropout's), unless ``masks_recomputed`` (knobs.RECOMPUTE_MASKS):
    then their bytes come off.
    ``offload``: the checkpointed inputs live in host memory (``host_checkpoints``: their bytes), with the measured
    ``OFFLOAD_EXTRA`` at the device.
    ``offload_layers``: that many (uncheckpointed) layers' activations live in host memory (offload.py), counted
    under ``host_offloaded``, not in the device total.
    ``recompute_in_graph``: checkpointed layers recompute inside their compiled backward graphs, which hold more.
    ``streamed_base``: the 4-bit weights' packed bytes live in host memory (``host_streamed``), two decoder layers'
    worth on the device (streamed_base.py) and ``resident_layers`` layers' own; their block scales stay."""
    quantized = other = lora = packed = lora_inputs = 0
    for name, fan_in, fan_out in shape.linears:
        n = fan_in * fan_out
        if bits is None:
            other += n * act_bytes
        elif bits == 4:
            quantized += n // 2 + (n // 64) * (1 if double_quant else 4)
            packed += n // 2
        else:
            quantized += n + fan_out * 4
        if name.rsplit(".", 1)[-1] in targets:
            lora += r * (fan_in + fan_out)
            lora_inputs += fan_in
    upcast = upcast_frozen and bits is not None  # PEFT's prepare_model_for_kbit_training runs on quantized bases
    other += shape.other_params * (4 if upcast or act_bytes == 4 else act_bytes)
    adapter = lora * (4 + 4 + optimizer_state_bytes)
    a, b, c = _ACT_COEF
    tier = budget_tier(activation_budget) if compiled else "default"
    saves_masks = dropout > 0 and tier != "low"  # the low budget recomputes them itself
    kept = 1.0 if saves_masks else _NO_DROPOUT
    whole_layer = act_bytes * (a * shape.hidden + b * shape.intermediate + c) * (_COMPILED if compiled else 1.0)
    if upcast and act_bytes < 4:
        whole_layer *= _UPCAST_ACTIVATIONS
    # the upper budget with fixed lengths was never measured: counted as keeping what the default keeps
    share = {"default": 1.0, "upper": 1.0, "middle": _MIDDLE_BUDGET, "low": _LOW_BUDGET}[tier]
    per_layer = whole_layer * kept * share  # a layer that keeps its activations
    # less the masks where recomputed: a bool per element of each LoRA'd linear's input, Phi-3-mini 17,408 bytes a
    # token and layer (session 40, H200, packed 8,192 tokens: 4.25-4.44 GiB off the allocator's peak, these 4.25)
    if saves_masks and compiled and masks_recomputed:
        per_layer -= lora_inputs // max(1, shape.layers)
    recomputed = whole_layer * (1.0 if dropout > 0 else _NO_DROPOUT)  # the checkpointed layer being recomputed
    recomputed *= _IN_GRAPH_RECOMPUTED if recompute_in_graph else 1.0
    k = (shape.layers if checkpoint_layers is None else min(checkpoint_layers, shape.layers)) if checkpointing else 0
    # the first ``moved`` layers' activations wait in host memory; backward brings them back a layer or two ahead,
    # once the later layers' activations are gone, so the peak (backward's start) holds none of them
    moved = min(offload_layers, shape.layers - k)
    # a checkpointed layer keeps its input; the others keep everything; one layer is recomputed at a time, and
    # keeps what the default budget keeps (session 9: the low budget took 0.12 GiB off that layer's peak at 4,096
    # tokens where the model would take 0.36). ``offload`` (offload.py; every layer checkpointed): the layers'
    # inputs go to host memory; two are on the GPU at a time in backward (the one recomputed and the one prefetched;
    # the forward's tail, OFFLOAD_TAIL_HIDDENS, is gone by the first layer's recompute)
    if offload and k:
        activations = tokens * (2 * shape.hidden * act_bytes + recomputed)
    else:
        kept_whole = (shape.layers - k - moved) * per_layer + (recomputed if k else 0)
        activations = tokens * (k * shape.hidden * act_bytes + kept_whole)
    logits = min(tokens, ce_chunk) * shape.vocab * (act_bytes + 4 + 4)
    streamed = {}
    if streamed_base and packed:
        on_device = min(STREAMED_LAYERS + max(0, resident_layers), shape.layers)
        quantized -= packed - packed * on_device // max(1, shape.layers)
        streamed = {"host_streamed": packed}
    inputs = tokens * k * shape.hidden * act_bytes if offload and k else 0  # checkpointed inputs in host memory
    return {"quantized_weights": quantized, "other_weights": other, "adapter_and_optimizer": adapter,
            "activations": int(activations), "logits_chunk": logits, "cuda_context": CUDA_CONTEXT if cuda else 0,
            "lora_params": lora, **({"host_offloaded": int(tokens * moved * per_layer)} if moved else {}), **streamed,
            **({"host_checkpoints": inputs} if inputs else {}),
            **({"offload_extra": int(OFFLOAD_EXTRA * inputs)} if inputs and cuda else {})}


def dequantized_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """The 4-bit linear layers' weights dequantized to a ``dtype_bytes`` dtype (dequantized.py)."""
    return sum(fan_in * fan_out for _, fan_in, fan_out in shape.linears) * dtype_bytes


def per_rank_parts(parts: dict[str, int], shape: ModelShape, processes: int) -> dict[str, int]:
    """FSDP over ``processes`` GPUs: each holds 1/n of the 4-bit weights, of the embedding and of the adapter with
    its gradients and optimizer state, plus what is gathered whole at the peak: two decoder layers (the one
    running and the one prefetched) and the output head with the final norm (accelerate keeps that unit gathered
    through the step; a tied embedding stays with it). Activations are each rank's own micro-batch: unchanged."""
    if processes <= 1:
        return parts
    n, layers = processes, max(1, shape.layers)
    q, adapter, other = parts["quantized_weights"], parts["adapter_and_optimizer"], parts["other_weights"]
    embed = shape.vocab * shape.hidden * other / max(1, shape.other_params)
    tied = shape.other_params < 2 * shape.vocab * shape.hidden
    return {**parts, "quantized_weights": int(q / n + 2 * q / layers),
            "other_weights": int(other - (0 if tied else embed) * (1 - 1 / n)),
            "adapter_and_optimizer": int(adapter / n + 2 * adapter / layers)}


# in ``parts`` but not summed into the device peak: the LoRA parameter count (its bytes are in
# adapter_and_optimizer) and what waits in host memory (offloaded activations and checkpointed inputs, a micro-batch's
# worth; a streamed base's packed weights)
NOT_ON_DEVICE = ("lora_params", "host_offloaded", "host_streamed", "host_checkpoints")


def fixed_bytes(parts: dict[str, int]) -> int:
    """What no smaller micro-batch reduces: weights, adapter with gradients and optimizer state, CUDA context."""
    return sum(parts.get(k, 0) for k in ("quantized_weights", "other_weights", "adapter_and_optimizer",
                                          "cuda_context"))


def load_bytes(parts: dict[str, int]) -> int:
    """What the device holds while the model loads: every weight, a streamed base's too (bitsandbytes quantizes it
    on the device; streamed_base.py moves it to host memory after), the fp32 LoRA weights (attached before the base
    streams: pipeline.build_model) and the CUDA context. Every streamed Phi-3-mini run peaked at 3.185 GiB allocated;
    session 28's trace placed that peak at the run's end, where the base comes back to the device (unstream_base)
    beside 1.50 GiB that stays (LoRA weights and gradients, embedding and head, block scales, the slots): the load
    stays at or under it. That restore is skipped, with a warning, where it would not fit."""
    held = ("quantized_weights", "host_streamed", "other_weights", "cuda_context")
    return sum(parts.get(k, 0) for k in held) + 4 * parts.get("lora_params", 0)


def total_gib(parts: dict[str, int]) -> float:
    """The device peak of ``parts`` (the LoRA parameters are inside adapter_and_optimizer; host_offloaded and
    host_streamed are not on the device)."""
    return round(sum(v for k, v in parts.items() if k not in NOT_ON_DEVICE) / GIB, 3)

"""Benchmark knobs read from the environment: how compiled layers compile (PHI3TUNE_COMPILE), DDP's buckets
(PHI3TUNE_DDP), host offloading of checkpointed inputs (PHI3TUNE_OFFLOAD, which overrides the memory plan's default
decided here too) and of whole layers' activations (PHI3TUNE_OFFLOAD_LAYERS), the 4-bit base dequantized once
(PHI3TUNE_DEQUANTIZE, PHI3TUNE_DEQUANTIZE_LAYERS), the LoRA dropout hash's integer width (PHI3TUNE_DROPOUT_HASH).
They exist to measure an option before a plan adopts it (examples/benchmarks/cards.sh); a user's run sets none of
them, and without them each function returns the plan's default."""

from __future__ import annotations

import os
from typing import Any


def yes(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def _count(name: str, least: int, hint: str) -> int | None:
    """Environment variable ``name`` as a whole number of at least ``least``; None where unset. Anything else is
    refused with ``hint`` (what a right value is)."""
    asked = os.environ.get(name, "")
    if asked and not (asked.isdigit() and int(asked) >= least):
        raise ValueError(f"{name}={asked!r}: {hint}")
    return int(asked) if asked else None


def ddp_settings() -> dict[str, Any]:
    """DDP bucket settings: torch's defaults unless PHI3TUNE_DDP (benchmarks) names others (``broadcast_buffers=0``:
    no broadcast of the model's buffers before every forward; Phi-3's are the same on every rank). Not static_graph:
    torch's reducer fails an internal assert ("expect_autograd_hooks_") when a backward runs under no_sync,
    which the loop uses for every micro-batch but a step's last (measured, gloo, torch 2.13)."""
    out: dict[str, Any] = {}
    for item in filter(None, os.environ.get("PHI3TUNE_DDP", "").split(",")):
        key, _, value = item.partition("=")
        if key not in ("bucket_cap_mb", "gradient_as_bucket_view", "broadcast_buffers"):
            raise ValueError(f"PHI3TUNE_DDP: {key!r} is not one of bucket_cap_mb, gradient_as_bucket_view, "
                             "broadcast_buffers")
        out[key] = int(value) if key == "bucket_cap_mb" else yes(value)
    return out


def offload_asked() -> bool | None:
    """PHI3TUNE_OFFLOAD (benchmarks, tests): 1 / 0 holds checkpointed inputs in host memory (offload.py) on every
    plan that checkpoints every layer / on none; unset (None): the plan decides (``offload_wanted``, and ``auto``
    weighs it on its speed plans: plan_search._offloads)."""
    asked = os.environ.get("PHI3TUNE_OFFLOAD", "")
    return yes(asked) if asked else None


def offload_wanted(mode: str, every_layer_checkpointed: bool, cuda: bool, sharded: bool,
                   chosen: bool | None = None) -> bool:
    """Offload checkpointed inputs (offload.py)? Only where every decoder layer is checkpointed: the hooks take
    whatever the decoder stack saves outside a checkpoint, which a layer that is not checkpointed fills with its
    whole activations. The memory plan's choice on CUDA (not under FSDP, whose gathers it would race);
    PHI3TUNE_OFFLOAD=1 (benchmarks, tests) asks for it on any plan that checkpoints every layer, on any device,
    0 never. ``chosen``: a plan search's own answer (plan_search: streamed plans), in place of the mode's and the
    knob's, on CUDA only."""
    if chosen is not None:
        wanted = chosen and cuda
    else:
        asked = offload_asked()
        wanted = asked if asked is not None else cuda and mode == "memory"
    return bool(every_layer_checkpointed and not sharded and wanted)


def offload_layers_wanted() -> int | None:
    """PHI3TUNE_OFFLOAD_LAYERS (benchmarks, tests): ``N`` keeps the first N decoder layers' activations in host
    memory (offload.py) on every speed plan that would checkpoint layers, and on any plan of the CPU or a named
    mode that checkpoints none; ``0`` never; unset (None): the plan decides (plan_search._speed_candidates)."""
    return _count("PHI3TUNE_OFFLOAD_LAYERS", 0, "give a number of layers (0: never offload them)")


def checkpoints_by_length_wanted() -> bool:
    """Checkpoint by micro-batch length (checkpoint_lengths.py) where a speed plan checkpoints layers? Yes, unless
    PHI3TUNE_CKPT_BY_LENGTH=0 (benchmarks: every pass checkpoints the longest micro-batch's layers, as before)."""
    asked = os.environ.get("PHI3TUNE_CKPT_BY_LENGTH", "")
    return yes(asked) if asked else True


def pin_batches_wanted() -> bool:
    """A CUDA run's micro-batches in pinned host memory (batching.MicroBatcher)? Yes, unless PHI3TUNE_PIN_BATCHES=0
    (benchmarks: pageable micro-batches, whose copies may wait for the device, as before session 28; session 29
    measured the two alike)."""
    asked = os.environ.get("PHI3TUNE_PIN_BATCHES", "")
    return yes(asked) if asked else True


def record_stream_wanted() -> bool:
    """PHI3TUNE_OFFLOAD_RELEASE=record_stream (benchmarks): offload.py frees each moved tensor under
    ``record_stream`` on its copy's stream, as before session 28, instead of holding it until the next one is saved
    and making the compute stream wait for its copy (the default), to time the two."""
    return os.environ.get("PHI3TUNE_OFFLOAD_RELEASE", "") == "record_stream"


def held_saves_wanted() -> int | None:
    """PHI3TUNE_HELD_SAVES=N (benchmarks): offload.py's compute stream waits for a moved input's copy N saves
    later instead of ``offload.HELD_SAVES``; unset (None): that."""
    return _count("PHI3TUNE_HELD_SAVES", 1, "give a number of saves, 1 or more")


def offload_ahead_wanted() -> int | None:
    """PHI3TUNE_OFFLOAD_AHEAD=N (benchmarks): backward keeps at least N moved tensors on their way back to the device
    ahead of the one it unpacks (offload.py), not one; unset (None): one."""
    return _count("PHI3TUNE_OFFLOAD_AHEAD", 1, "give a number of tensors, 1 or more")


def offload_tail_wanted() -> int | None:
    """PHI3TUNE_OFFLOAD_TAIL=N (benchmarks): where every saved tensor moves (offload.py), a forward's last saves
    worth N hidden vectors a token stay on the device, not ``memory.OFFLOAD_TAIL_HIDDENS`` (0: every one moves, as
    before session 31); unset (None): that."""
    return _count("PHI3TUNE_OFFLOAD_TAIL", 0, "give a number of hidden vectors a token (0: move every save)")


def recompute_in_graph_wanted() -> bool:
    """Compiled layers that checkpoint recompute inside their own backward graph (recompute.RecomputeSwitch)?
    Yes, unless PHI3TUNE_RECOMPUTE_IN_GRAPH=0 (benchmarks: torch.utils.checkpoint around the compiled layer, the
    plans before session 23)."""
    asked = os.environ.get("PHI3TUNE_RECOMPUTE_IN_GRAPH", "")
    return yes(asked) if asked else True


def dequantize_wanted() -> bool | None:
    """PHI3TUNE_DEQUANTIZE (benchmarks, tests): ``1`` dequantizes the 4-bit base once on any plan that can
    (plan_search.with_dequantized_base), on any device; ``0`` never; unset (None): the plan decides."""
    asked = os.environ.get("PHI3TUNE_DEQUANTIZE", "")
    return yes(asked) if asked else None


def stream_base_wanted() -> bool | None:
    """PHI3TUNE_STREAM_BASE=1 / 0 (benchmarks, tests): the 4-bit base's packed weights wait in pinned host memory
    and come to the device a decoder layer at a time (streamed_base.py) on any plan that can stream / never; unset
    (None): ``auto`` weighs it (plan_search: where it pays more than its margin, step_cost._STREAMED_COST)."""
    asked = os.environ.get("PHI3TUNE_STREAM_BASE", "")
    return yes(asked) if asked else None


def stream_resident_wanted() -> int | None:
    """PHI3TUNE_STREAM_RESIDENT=N (benchmarks, tests): a streamed base keeps N decoder layers' packed bytes on the
    device, spread evenly, and streams the rest (streamed_base.resident_layers); unset (None): none (not yet a
    plan's choice: plan.RunPlan.resident_layers)."""
    return _count("PHI3TUNE_STREAM_RESIDENT", 0, "give a number of decoder layers (0: stream them all)")


def stream_slots_wanted() -> int | None:
    """PHI3TUNE_STREAM_SLOTS=N (benchmarks): a streamed base takes turns in N device slots, N - 1 layers' bytes on
    their way in while one runs (streamed_base.py), not ``memory.STREAMED_LAYERS``; the plan still counts that many
    (a slot is a decoder layer's packed bytes, 57 MiB for Phi-3-mini). Unset (None): that."""
    return _count("PHI3TUNE_STREAM_SLOTS", 2, "give a number of slots, 2 or more")


def dequantize_layers_wanted() -> int | None:
    """PHI3TUNE_DEQUANTIZE_LAYERS=N (benchmarks, tests): only the first N decoder layers' 4-bit weights dequantized
    once, the others left 4-bit, on any plan that can (plan_search.with_dequantized_base); unset (None): the plan
    decides: all where they fit, else for packed rows the most first layers that fit (session 33), else none."""
    asked = os.environ.get("PHI3TUNE_DEQUANTIZE_LAYERS", "")
    return int(asked) if asked else None


def int64_dropout_hash_wanted() -> bool:
    """PHI3TUNE_DROPOUT_HASH=int64 (benchmarks): the hashed LoRA dropout masks computed in int64 as before session
    22, the same bits as the default int32 (lora_dropout.keep_mask), to time the two."""
    return os.environ.get("PHI3TUNE_DROPOUT_HASH", "") == "int64"


def combo_wanted() -> bool | None:
    """PHI3TUNE_COMPILE=combo_kernels=1 / 0 (benchmarks): combo kernels on any compiled plan / never; unset (None):
    the plan decides (plan_search.with_combo_kernels)."""
    asked = compile_env().get("combo_kernels", "")
    return yes(asked) if asked else None


def scale_on_input_wanted() -> bool:
    """PHI3TUNE_COMPILE=lora_scale=output (benchmarks): compiled plans leave PEFT's LoRA scale on the adapter's
    output, as before session 39, where by default (``input``) the hashed dropout applies it
    (lora_dropout.make_recomputable): the same numbers, to time the two."""
    return compile_env().get("lora_scale", "input") == "input"


def read_late_wanted(cuda: bool, precision: str, sharded: bool) -> bool:
    """Read each step's loss and gradient norm one step late (late_read.py)? On CUDA: session 19, 16 GiB
    quickstart, ABBA in two calls, +4.1% tokens/s over the timed steps and +7.1% over whole runs (the CPU runs
    each op as it is queued: nothing to gain). PHI3TUNE_READ_LATE=1 / 0 (benchmarks, tests) asks for it on any
    device / never. Never with fp16's loss scaler, which reads each step's overflow off the device, nor under
    FSDP, whose optimizer waits per shard anyway."""
    asked = os.environ.get("PHI3TUNE_READ_LATE", "")
    if precision == "fp16" or sharded:
        return False
    return yes(asked) if asked else cuda


COMPILE_KEYS = ("mode", "cpp_wrapper", "combo_kernels", "opaque_4bit", "activation_budget", "dynamic_lengths",
                "lengths", "dequant", "masks", "lora_scale")  # PHI3TUNE_COMPILE's keys (compile_settings reads them)


def compile_env() -> dict[str, str]:
    """PHI3TUNE_COMPILE's ``key=value`` items (benchmarks only; compile_settings says what each key does)."""
    out = {}
    for item in filter(None, os.environ.get("PHI3TUNE_COMPILE", "").split(",")):
        key, _, value = item.partition("=")
        if key not in COMPILE_KEYS:
            raise ValueError(f"PHI3TUNE_COMPILE: {key!r} is not one of {', '.join(COMPILE_KEYS)}")
        if key == "dequant" and value not in ("table", "select", "kernel"):
            raise ValueError(f"PHI3TUNE_COMPILE: dequant={value!r} is not table, select or kernel")
        if key == "masks" and value not in ("save", "recompute"):
            raise ValueError(f"PHI3TUNE_COMPILE: masks={value!r} is not save or recompute")
        if key == "lora_scale" and value not in ("input", "output"):
            raise ValueError(f"PHI3TUNE_COMPILE: lora_scale={value!r} is not input or output")
        out[key] = value
    return out


# The partitioner's rules that keep the hashed LoRA dropout masks saved (one bool byte per element of the 4 inputs
# of a layer's LoRA'd linears): "reduction" (an int64 hash compared into a bool is 8x smaller than its input), "used
# far apart", "long fusible chain". Off, a compiled tiny layer saves no mask and what it saves without dropout
# (CPU, saved-tensor hooks: tests/test_compiled_layers.py). Only PHI3TUNE_COMPILE=masks=recompute turns them off
# (RunPlan.recompute_masks): on the H200 that gave back 2.5 GiB for +7.6% a step (session 10, the int64 hash), dearer
# than a budget; 4.25 GiB at 8,192 tokens for no measurable time with the int32 hash (session 40).
RECOMPUTE_MASKS = {"ban_recompute_reductions": False, "ban_recompute_used_far_apart": False,
                   "ban_recompute_long_fusible_chains": False}


def compile_settings(activation_budget: float = 1.0, recompute_masks: bool = False,
                     combo_kernels: bool = False) -> dict[str, Any]:
    """How the decoder layers compile (``compiled_layers.backend``): inductor's defaults with bitsandbytes' 4-bit
    ops as torch ops, the plan's ``activation_budget`` and, where the plan says ``recompute_masks``, the
    partitioner's ``RECOMPUTE_MASKS``; unless PHI3TUNE_COMPILE (benchmarks only, examples/benchmarks/cards.sh) names
    otherwise: ``mode=reduce-overhead`` (CUDA graphs: inductor's ``triton.cudagraphs``), ``cpp_wrapper=1`` (a C++
    wrapper around the kernels), ``combo_kernels=1`` / ``0`` (read by the plan: inductor's combo kernels,
    independent kernels launched as one, on any compiled plan / none), ``opaque_4bit=1`` (bitsandbytes' ops left
    as Python calls), ``activation_budget=F``
    (functorch's ``activation_memory_budget``: the partitioner recomputes in backward what keeps the saved
    activations under F of its default), ``dynamic_lengths=1`` / ``0`` (every multiple of a granule from one
    symbolic-length graph, or the fixed lengths, whatever the plan's own choice: shapes.symbolic_lengths_pay),
    ``lengths=N`` (N fixed lengths instead of 4; both read by ``_candidate``), ``dequant=select`` (the 4-bit
    codes' values selected by their bits, not loaded from a table: compiled_layers.dequantize_4bit), ``dequant=kernel``
    (one Triton kernel per weight, dequant_kernel.py),
    ``masks=recompute`` / ``save`` (read by ``_candidate``: the plan's ``recompute_masks`` on any compiled plan / on
    none), ``lora_scale=output`` (PEFT's LoRA scale on the adapter's output, not applied by the hashed dropout:
    scale_on_input_wanted), to measure what each does before a plan adopts it. Returns ``{"options": inductor
    config patches, "opaque_4bit": bool, "activation_budget": float, "dequant": str, "partitioner": functorch
    config patches}``.
    Measured (H200, torch 2.11, docs/performance.md sessions 7-8): neither CUDA graphs (each micro-batch a graph
    step, ``TokenLoss``) nor the C++ wrapper shortened a step at 4,096-8,192-token micro-batches (median 0.148 /
    0.158 s against 0.149 s); the wrapper doubled the warm-up's compile. No plan uses either."""
    options: dict[str, Any] = {"combo_kernels": True} if combo_kernels else {}  # the plan's (with_combo_kernels)
    opaque, budget, dequant = False, activation_budget, "table"
    partitioner = dict(RECOMPUTE_MASKS) if recompute_masks else {}
    for key, value in compile_env().items():
        if key == "mode":
            options["triton.cudagraphs"] = value == "reduce-overhead"
        elif key == "cpp_wrapper":
            options["cpp_wrapper"] = yes(value)
        elif key == "opaque_4bit":
            opaque = yes(value)
        elif key == "activation_budget":
            budget = float(value)
        elif key == "dequant":
            dequant = value
    return {"options": options, "opaque_4bit": opaque, "activation_budget": budget, "dequant": dequant,
            "partitioner": partitioner}

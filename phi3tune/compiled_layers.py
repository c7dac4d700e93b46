"""Decoder layers compiled with the 4-bit matmuls inside their graphs.

bitsandbytes' 4-bit matmul is a custom op with a Python implementation, so a compiled layer calls back into Python
for each one: on the H200 ~150 µs of host time per 4-bit linear in forward (``bitsandbytes::gemm_4bit``) and ~80 µs
per dequantization in backward (profiled), some 30 ms per micro-batch of Phi-3-mini's 32 layers by those figures,
at which the GPU waited on the host (docs/performance.md). Here the compiler is given the ops' math in torch ops
(a 16-entry table lookup of each 4-bit code times its block's fp32 absmax, rounded once to the compute dtype; then
the matmul), so inductor fuses each dequantization into one kernel launched from the compiled graph. The values
are bitsandbytes' own: the same table, the same fp32 product, one rounding (tests compare bit for bit; on the GPU
all 128 weights of Phi-3-mini, examples/benchmarks/check_twins.py). Only the compiler sees these decompositions;
eager code and the bitsandbytes ops themselves are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import dequant_kernel
from .dequant_kernel import decode_4bit, nibbles, scale_blocks
from .recompute import RecomputeSwitch

if TYPE_CHECKING:
    from .plan import RunPlan


def code_tables() -> dict[str, list[float]]:
    """bitsandbytes' 4-bit code tables as numbers, read once outside any trace (building one normalises it in
    place, which a traced graph may not hold)."""
    from bitsandbytes.functional import get_4bit_type

    return {kind: get_4bit_type(kind, device="cpu").tolist() for kind in ("nf4", "fp4")}


def _select(codes: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    """``values[codes]`` for 4-bit codes as a tree of selects on the code's bits: the 16 values are constants of
    the kernel, where a lookup (``table[codes]``) loads each from memory. The same fp32 values either way."""
    def pick(first: int, width: int) -> Any:
        if width == 1:
            return values[first]
        half = width // 2
        return torch.where((codes & half) != 0, pick(first + half, half), pick(first, half))

    return pick(0, len(values)).to(torch.float32)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype, tables: dict[str, list[float]] | None = None,
                    lookup: str = "table") -> torch.Tensor:
    """``bitsandbytes::dequantize_4bit`` in torch ops: two codes per byte, high nibble first. ``lookup``: each
    code's value loaded from a 16-entry table; "select"ed from constants by its bits; or the "kernel" of
    dequant_kernel.py, one Triton kernel (the same values; which is faster is measured: PHI3TUNE_COMPILE=dequant=)."""
    codes = packed.reshape(-1)
    if codes.dtype != torch.uint8:  # quant_storage other than uint8 (FSDP stores bf16): the same bytes
        codes = codes.view(torch.uint8)
    values = (tables or code_tables())[quant_type]
    if lookup == "select":
        looked_up = _select(nibbles(codes, math.prod(shape)), values)
        return scale_blocks(looked_up, absmax, blocksize, shape, dtype)
    table = torch.tensor(values, dtype=torch.float32, device=codes.device)
    if lookup == "kernel":
        return dequant_kernel.dequantize_4bit(codes, absmax, table, blocksize, shape, dtype)  # casts absmax itself
    return decode_4bit(codes, table, absmax, blocksize, shape, dtype)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """``bitsandbytes::dequantize_blockwise`` (8-bit codes, e.g. the double-quantized absmax) in torch ops."""
    values = code.float()[codes.reshape(-1).to(torch.int64)]
    return scale_blocks(values, absmax, blocksize, codes.shape, dtype)


def gemm_4bit(a: torch.Tensor, packed: torch.Tensor, shape: Sequence[int], absmax: torch.Tensor, blocksize: int,
              quant_type: str, bias: torch.Tensor | None = None, absmax_8bit: torch.Tensor | None = None,
              absmax_code: torch.Tensor | None = None, absmax_offset: torch.Tensor | None = None,
              tables: dict[str, list[float]] | None = None, lookup: str = "table") -> torch.Tensor:
    """``bitsandbytes::gemm_4bit`` in torch ops: dequantize to ``a``'s dtype, then ``F.linear``. With double
    quantization ``absmax`` holds the scales of the 8-bit ``absmax_8bit`` (256-element blocks)."""
    if absmax_8bit is not None:
        assert absmax_code is not None and absmax_offset is not None
        absmax = dequantize_blockwise(absmax_8bit, absmax, absmax_code, 256, torch.float32) + absmax_offset
    return F.linear(a, dequantize_4bit(packed, absmax, blocksize, quant_type, shape, a.dtype, tables, lookup), bias)


def decompositions(lookup: str = "table") -> dict[Any, Callable[..., Any]]:
    """The bitsandbytes ops this bitsandbytes registers, each with its torch-ops twin above."""
    ops = getattr(torch.ops, "bitsandbytes", None)
    tables = code_tables()
    twins: dict[str, Callable[..., Any]] = {
        "gemm_4bit": functools.partial(gemm_4bit, tables=tables, lookup=lookup),
        "dequantize_4bit": functools.partial(dequantize_4bit, tables=tables, lookup=lookup),
        "dequantize_blockwise": dequantize_blockwise}
    out: dict[Any, Callable[..., Any]] = {}
    for name, twin in twins.items():
        try:
            out[getattr(ops, name).default] = twin
        except (AttributeError, RuntimeError):  # an older bitsandbytes without this op: it stays opaque
            continue
    return out


def backend(settings: dict[str, Any] | None = None, generate: bool = True) -> Callable[..., Any]:
    """inductor with the 4-bit decompositions added to its own. ``settings``: knobs.compile_settings() (its
    ``options`` are inductor config patches; ``opaque_4bit`` leaves bitsandbytes' ops opaque, the host cost this
    module removes, to measure it; ``activation_budget`` and ``partitioner`` patch how the joint graph is split
    into forward and backward). ``generate=False``: the same decompositions and inductor's partitioner, called as
    inductor calls it but without inductor's own graph passes, the two graphs then run as traced, with no code
    generated: what the tests of the loop around compiled layers need, at a fraction of the compile time on a CPU."""
    from torch._inductor.decomposition import select_decomp_table

    settings = settings or {}
    ours = {} if settings.get("opaque_4bit") else decompositions(settings.get("dequant", "table"))
    table = {**select_decomp_table(), **ours}
    inner = _inductor(settings.get("options") or None, table) if generate else _traced(table)
    budget = float(settings.get("activation_budget", 1.0))
    patches = {**({"activation_memory_budget": budget} if budget < 1.0 else {}), **settings.get("partitioner", {})}
    if not patches:
        return inner

    def partitioned(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Any:
        import torch._functorch.config as functorch

        with functorch.patch(**patches):  # read when the joint graph is partitioned
            return inner(gm, inputs)

    return partitioned


def _inductor(options: dict[str, Any] | None, table: dict[Any, Any]) -> Callable[..., Any]:
    """inductor with ``options`` and, first among its joint-graph passes, the one that drops ``* 1`` (unit_scale.py:
    what is left of PEFT's LoRA scale once the LoRA dropout applies it)."""
    from torch._inductor.compile_fx import compile_fx

    from .unit_scale import DropMultiplicationsByOne

    patches = {"joint_custom_pre_pass": DropMultiplicationsByOne(), **(options or {})}
    return functools.partial(compile_fx, config_patches=patches, decompositions=table)


def _traced(table: dict[Any, Any]) -> Callable[..., Any]:
    """AOTAutograd's forward and backward graphs, split by inductor's partitioner, run without code generation."""
    import torch._inductor.compile_fx as inductor
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def boxed_nop(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        return make_boxed_func(gm.forward)

    def partition(*args: Any, **kwargs: Any) -> Any:  # looked up at each call: as inductor's own
        return inductor.min_cut_rematerialization_partition(*args, compiler="inductor", **kwargs)

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition, decompositions=table)


def compile_layers(layers: Sequence[torch.nn.Module], settings: dict[str, Any] | None = None,
                   dynamic: bool = False, recompute_in_graph: bool = False) -> None:
    """Compile each decoder layer. ``dynamic``: dynamo's automatic dynamic shapes, so the second length a layer
    sees makes its graph's token dimension symbolic and every later length reuses that graph (the plan's lengths
    are the multiples of a granule; the warm-up shows them all before training); else one static graph per
    length (the plan's few fixed lengths). ``recompute_in_graph``: each layer also gets the graphs that checkpoint
    it (``RecomputeSwitch``)."""
    compiler = backend(settings)
    recomputing = backend({**(settings or {}), "activation_budget": 0.0}) if recompute_in_graph else None
    for layer in layers:
        layer.compile(backend=compiler, dynamic=None if dynamic else False)
        if recomputing is not None:
            RecomputeSwitch.install(layer, recomputing, dynamic)


def symbolic_from_the_first_length(decoder: torch.nn.Module) -> None:
    """Symbolic-length plans: make each family's first graph symbolic in the token dimension. Dynamo's automatic
    dynamic shapes compile a static graph at the first length a layer meets and the symbolic one at the second, so
    each graph family compiled twice; with every layer input that carries the token dimension marked dynamic, the
    first compile is the symbolic one (a CPU run: 1 graph where it built 2, the same losses). Those inputs: the
    embedding's output and the rotary tables (forward hooks on those eager modules), and the position ids (a
    pre-hook on the decoder; the examples' bounds are marked in ``loss.TokenLoss``). ``maybe_mark_dynamic``: where
    dynamo must specialize a length, it still may."""
    def mark(tensors: Any) -> None:
        for t in tensors if isinstance(tensors, tuple) else (tensors,):
            if isinstance(t, torch.Tensor) and t.dim() > 1:
                torch._dynamo.maybe_mark_dynamic(t, 1)

    def mark_positions(_module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        mark(kwargs.get("position_ids"))

    decoder.register_forward_pre_hook(mark_positions, with_kwargs=True)
    for name in ("embed_tokens", "rotary_emb"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            module.register_forward_hook(lambda _module, _args, out: mark(out))


def warm_up_positions(lengths: tuple[int, ...], position_cap: int) -> list[tuple[int, torch.Tensor]]:
    """The position ids of the compile warm-up's micro-batches: for each fixed length, two documents, as in real
    micro-batches (one would take another attention-mask path, and every real one would then compile during
    training). A single example that fills a length exactly is padded to the next length
    (``batching.pad_to_bucket``), except at the longest; where one can (``<= position_cap``, max_seq_length), the
    warm-up builds that one-document graph too (measured on the GPU without it: a 16.2 s step)."""
    out = [(n, torch.arange(n) % max(1, min(position_cap, n // 2))) for n in lengths]
    if lengths and lengths[-1] <= position_cap:
        out.append((lengths[-1], torch.arange(lengths[-1])))
    return out


def graph_room(plan: RunPlan, options: dict[str, Any] | None = None) -> contextlib.ExitStack:
    """The run's compile scope. Room in dynamo's cache for every graph the plan's compiled layers need: all decoder
    layers share one code object, so one cache: a graph per fixed length, for train and eval, and twice that where
    only some layers are checkpointed, or only some dequantized. Past dynamo's recompile limit (8) a layer would
    silently run eager (measured: 3.7x slower). And ``options`` (compile_settings' inductor patches) set for the
    whole run, not only inside the backend: inductor compiles a layer's backward graph at its first backward call,
    after the backend has returned, and reads e.g. ``cpp_wrapper`` then (without it the backward fails in code
    generation: pytorch/pytorch#178845, session 3's error)."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    kinds = 2 if plan.dequantized_layers else 1  # 4-bit and dequantized layers: a graph each
    kinds *= 2 if plan.recompute_in_graph else 1  # and the graphs that checkpoint a layer (RecomputeSwitch)
    need = 4 * kinds * len(warm_up_positions(plan.token_buckets, plan.position_cap)) + 4 if plan.compile else 0
    scope = contextlib.ExitStack()
    scope.enter_context(dynamo.patch(recompile_limit=max(dynamo.recompile_limit, need)))
    if plan.compile and options:
        scope.enter_context(inductor.patch(options))
    return scope

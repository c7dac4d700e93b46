"""bitsandbytes' 4-bit dequantization for compiled graphs: in torch ops (``decode_4bit``, which inductor fuses into
one kernel of its own: compiled_layers' default) and as one hand-written Triton kernel.

Inductor's own kernel for the torch-ops decoding takes ~10% of a 16 GiB card's step (session 13's profile);
bitsandbytes' CUDA kernel cannot run inside the graph without a Python call per weight (its ops are Python
implementations: the host cost ``compiled_layers`` removed). The Triton kernel below can. Each program reads a run of
packed bytes once, looks up both codes of each byte in the 16-entry table, multiplies by the block's fp32 absmax and
rounds once to the output dtype: bitsandbytes' arithmetic, so the values are bit for bit its own (tests run the
kernel under Triton's interpreter on the CPU; on the GPU, examples/benchmarks/dequant_kernels.py). It is the CUDA path
of ``phi3tune::dequantize_4bit``, a ``torch.library.triton_op`` (PHI3TUNE_COMPILE=dequant=kernel; measured slower
in the layers, so no plan's choice): a compiled layer traces through the op, so the graph holds the kernel's launch
and no Python call. The partitioner then needs no help: the layer's backward dequantizes again on its own
(bitsandbytes' MatMul4Bit), so the forward's weights are never saved.

Measured (H200, sessions 14-15): the kernel alone 68-77 µs on Phi-3-mini's largest weight (512-4,096 bytes a program;
bitsandbytes' 76-87), bit-identical. The op was first a ``torch.library.custom_op`` that the compiled layers called:
14,793 against 18,737 tokens/s on a 16 GiB card, each of its 256 calls a micro-batch a Python dispatch and a Triton
launch from Python. As this ``triton_op``: 19,041 against 20,004 on a 16 GiB card (16,792 against 17,876 on 12),
one machine: compiled, its launch took 102 µs where the direct one takes 73, and inductor's own kernel is faster in
the layers than alone (docs/performance.md, session 15). So it stays a benchmark knob.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

BYTES_PER_PROGRAM = 1024  # packed bytes per Triton program: 2,048 outputs


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Sequence[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``values`` (flat) times the fp32 absmax of their block (the last block may be short), rounded once to
    ``dtype``, in ``shape``: how every way of dequantizing ends."""
    n, absmax = values.numel(), absmax.float()
    if n % blocksize == 0:
        scaled = (values.view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)
    else:
        scaled = values * absmax[torch.arange(n, device=values.device) // blocksize]
    return scaled.view(tuple(shape)).to(dtype)


def decode_4bit(codes: torch.Tensor, table: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``codes`` (two a byte, high nibble first) looked up in ``table`` (16 fp32 values), times their
    block's absmax, rounded once to ``dtype``."""
    looked_up = table[nibbles(codes, math.prod(shape)).to(torch.int64)]
    return scale_blocks(looked_up, absmax, blocksize, shape, dtype)


def nibbles(codes: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of uint8 ``codes``, two a byte, high nibble first. Pointwise ops only (a
    broadcast shift, not a stack): the compiler may then recompute a weight in backward from the packed bytes, which
    a layer keeps anyway, instead of saving an unpacked copy per layer."""
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=codes.device)
    return ((codes.reshape(-1).unsqueeze(-1) >> shifts) & 15).reshape(-1)[:n]


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, built at first use (Triton is imported only where a CUDA run needs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_nf4(packed, absmax, table, out, n_out, blocksize: tl.constexpr, per_program: tl.constexpr,
                       bf16: tl.constexpr, low_first: tl.constexpr):
        first = tl.program_id(0) * per_program
        index = first + tl.arange(0, per_program)  # byte index
        live = index * 2 < n_out
        byte = tl.load(packed + index, mask=live, other=0).to(tl.int32)
        scale = tl.load(absmax + (index * 2) // blocksize, mask=live, other=0.0)  # a byte's two codes share a block
        high = tl.load(table + (byte >> 4)) * scale
        low = tl.load(table + (byte & 15)) * scale
        # high nibble first, as bitsandbytes packs (low_first: the tests' negative control)
        values = tl.interleave(low, high) if low_first else tl.interleave(high, low)
        if bf16:  # round to nearest even by hand: the GPU's conversion, and the interpreter's (which truncates) too
            bits = values.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            values = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            values = values.to(out.dtype.element_ty)
        where = first * 2 + tl.arange(0, 2 * per_program)
        tl.store(out + where, values, mask=where < n_out)

    return dequantize_nf4


def launch(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: torch.Tensor,
           shape: Sequence[int], dtype: torch.dtype, per_program: int = BYTES_PER_PROGRAM,
           low_first: bool = False, wrap: Any = None) -> torch.Tensor:
    """Run the kernel: ``packed`` uint8 (two codes a byte), ``absmax`` fp32 (one a block), ``table`` the 16 fp32
    code values, on one device. ``wrap``: torch.library.wrap_triton, so that a compiled graph launches the kernel
    itself. ``per_program`` (a power of two) and ``low_first`` (the nibbles in the wrong order: the tests' negative
    control) exist for the tests and examples/benchmarks/dequant_kernels.py."""
    n = math.prod(shape)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    programs = (n + 2 * per_program - 1) // (2 * per_program)
    kernel = wrap(_kernel()) if wrap is not None else _kernel()
    kernel[(programs,)](packed.reshape(-1), absmax.reshape(-1), table, out, n, blocksize=blocksize,
                        per_program=per_program, bf16=dtype == torch.bfloat16, low_first=low_first)
    return out


@torch.library.triton_op("phi3tune::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes::dequantize_4bit's values from ``table`` (the 16 fp32 code values): the Triton kernel on CUDA,
    ``decode_4bit`` elsewhere. A compiled graph traces through it: on CUDA it then holds the kernel's launch."""
    codes = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)  # FSDP's bf16 storage: the same bytes
    if codes.is_cuda:
        return launch(codes, absmax.float(), blocksize, table, shape, dtype, wrap=torch.library.wrap_triton)
    return decode_4bit(codes, table, absmax, blocksize, shape, dtype)

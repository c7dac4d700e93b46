"""dequant_kernel.py's second Triton kernel, laid out by quantization block: each program takes ``rows`` whole
blocks as a 2-D tile (a row a block: ``blocksize / 2`` bytes in, ``blocksize`` values out), so a block's absmax is
loaded once a row, not once a byte, and every load and store is a contiguous run. ``tree``: each code's value
selected from the 16 table entries held in registers by the code's four bits (as bitsandbytes' CUDA kernel does),
not loaded per code. The arithmetic is the other kernel's (one fp32 product, one rounding); which layout is faster is
measured (examples/benchmarks/dequant_kernels.py, the ``blocks*`` ways). A module of its own: Triton's jit functions
call each other by module-level names, and this module imports Triton, which only a CUDA run (or the tests'
interpreter) needs."""

import triton
import triton.language as tl


@triton.jit
def _from_table(code, table):
    return tl.load(table + code)


@triton.jit
def _from_tree(code, table):
    b0, b1, b2, b3 = (code & 1) != 0, (code & 2) != 0, (code & 4) != 0, (code & 8) != 0
    low = tl.where(b2, tl.where(b1, tl.where(b0, tl.load(table + 7), tl.load(table + 6)),
                                tl.where(b0, tl.load(table + 5), tl.load(table + 4))),
                   tl.where(b1, tl.where(b0, tl.load(table + 3), tl.load(table + 2)),
                            tl.where(b0, tl.load(table + 1), tl.load(table + 0))))
    high = tl.where(b2, tl.where(b1, tl.where(b0, tl.load(table + 15), tl.load(table + 14)),
                                 tl.where(b0, tl.load(table + 13), tl.load(table + 12))),
                    tl.where(b1, tl.where(b0, tl.load(table + 11), tl.load(table + 10)),
                             tl.where(b0, tl.load(table + 9), tl.load(table + 8))))
    return tl.where(b3, high, low)


@triton.jit
def dequantize_blocks(packed, absmax, table, out, n_out, half: tl.constexpr, rows: tl.constexpr,
                      tree: tl.constexpr, bf16: tl.constexpr, low_first: tl.constexpr):
    block = tl.program_id(0).to(tl.int64) * rows + tl.arange(0, rows)  # the rows' quantization blocks
    byte = block[:, None] * half + tl.arange(0, half)[None, :]  # [rows, half] byte indices
    codes = tl.load(packed + byte, mask=byte * 2 < n_out, other=0).to(tl.int32)
    scale = tl.load(absmax + block, mask=block * (2 * half) < n_out, other=0.0)[:, None]
    if tree:
        high = _from_tree(codes >> 4, table) * scale
        low = _from_tree(codes & 15, table) * scale
    else:
        high = _from_table(codes >> 4, table) * scale
        low = _from_table(codes & 15, table) * scale
    values = tl.interleave(low, high) if low_first else tl.interleave(high, low)  # [rows, 2 * half]
    if bf16:  # round to nearest even by hand (the interpreter truncates), as the other kernel does
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        values = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        values = values.to(out.dtype.element_ty)
    where = block[:, None] * (2 * half) + tl.arange(0, 2 * half)[None, :]
    tl.store(out + where, values, mask=where < n_out)

"""The Triton kernel of phi3tune/dequant_kernel.py gives bitsandbytes' dequantized values bit for bit. No GPU here:
the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, read when Triton is first imported, so in a child
process), the same kernel source the GPU compiles; its rounding to bf16 is done by hand in the kernel so that the
interpreter (which truncates) and the GPU (round to nearest even) agree."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the test extra)")

CHILD = textwrap.dedent("""
    import sys
    import bitsandbytes.functional as bnbf
    import torch
    from phi3tune import compiled_layers as cl, dequant_kernel as dk

    torch.manual_seed(0)
    tables = cl.code_tables()
    cases = 0
    for quant_type in ("nf4", "fp4"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            # whole blocks, a short last block, an odd count (the last byte's low nibble unused), blocks of 128
            for shape, blocksize in (((96, 64), 64), ((3, 50), 64), ((33, 7), 64), ((40, 256), 128)):
                weight = torch.randn(*shape, dtype=dtype) * 0.02
                packed, qs = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
                want = bnbf.dequantize_4bit(packed, qs)
                table = torch.tensor(tables[quant_type], dtype=torch.float32)
                got = dk.launch(packed, qs.absmax.float(), blocksize, table, tuple(qs.shape), dtype,
                                per_program=int(sys.argv[1]))
                assert got.dtype == want.dtype and torch.equal(got, want), (quant_type, dtype, shape)
                if sys.argv[2] == "control":  # a kernel reading the nibbles in the wrong order must differ
                    swapped = dk.launch(packed, qs.absmax.float(), blocksize, table, tuple(qs.shape), dtype,
                                        per_program=int(sys.argv[1]), low_first=True)
                    assert not torch.equal(swapped, want), (quant_type, dtype, shape)
                cases += 1
    print("cases", cases)
""")


@pytest.mark.parametrize("per_program,control", [(1024, "control"), (16, "plain")])
def test_the_triton_kernel_dequantizes_as_bitsandbytes_does_bit_for_bit(per_program, control):
    """Both code tables, three output dtypes, whole and short last blocks, an odd element count; with programs of
    1,024 bytes (the default: one program covers several weights here) and of 16 (many programs, the boundaries
    inside blocks). Negative control: the nibbles read low first do not match."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(per_program), control], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cases 24" in out.stdout

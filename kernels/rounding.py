"""Round-to-nearest-even casts from float32 that are exact on the GPU and in Triton's interpreter.

The GPU's conversions (cvt.rn) round to nearest even. Triton 3.6's CPU interpreter does not: its
float32 -> bfloat16 cast truncates (and its round-to-nearest variant drops the carry into the
exponent), and its float32 -> e4m3 cast mis-rounds values whose mantissa carries into the exponent
(127.97 -> 64). The helpers below round on the float32 bits first, so the conversion that follows
only drops zero bits and is exact everywhere. A few integer operations per element cost nothing in
these memory-bound kernels, and the same code then runs in the CPU tests and on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_bf16(v):
    """float32 -> float32 on the bfloat16 grid (nearest even; inf stays inf)."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(v):
    """float32 values already clamped to [-448, 448] -> float32 values on the e4m3 grid (nearest even)."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal e4m3 numbers keep 3 of float32's 23 mantissa bits: add half an e4m3 step (minus one,
    # plus the kept lsb, for ties-to-even) and truncate the 20 dropped bits.
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    # Below 2^-6 e4m3 is subnormal with a fixed step of 2^-9: 24576 = 1.5 * 2^14 has a float32 ulp of
    # 2^-9, so the float32 addition itself rounds to that step (to nearest even).
    subnormal = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """float32 v -> `dtype`, rounded to nearest even (float32, float16 and bfloat16 outputs)."""
    if dtype == tl.bfloat16:
        v = round_bf16(v)
    return v.to(dtype)

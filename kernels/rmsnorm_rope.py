"""Fused q/k RMS norm + 3-axis rotary embedding of the Wan2.1 DiT (one pass over q or k).

One program per token: it reads the token's full row of H*D channels (the RMS statistic is over the
whole model width, not per head, as in WanRMSNorm), normalises it in float32, applies the norm
weight, rotates every (2j, 2j+1) = (real, imag) channel pair of every head by the token's float32
(cos, sin) table row (shared by the heads), and writes the result once in the output dtype. There is
no complex or float64 arithmetic per call: the tables are built once per grid
(`flashportrait.models.rope.RopeCache`), with identity rows (cos 1, sin 0) past the real tokens so
seq_len padding stays unrotated, as in the reference.

Numerics differ from the unfused reference only by rounding: the reference rounds to bf16 after the
normalisation and after the weight, this kernel keeps float32 until the single final rounding, so
its error against float64 is at most the reference's (tests/kernels/test_rmsnorm_rope.py).

Bytes at the full-size shape (52,224 tokens x 5,120 channels = 267.4 M elements, bf16), per call:
the unfused PyTorch sequence (x.float(), rms_norm, cast, * weight, cast to float32, four products and
two sums on the pair halves, stack, cast) moves about 72 bytes per element = 19.3 GB; this kernel
reads 2 and writes 2 bytes per element = 1.07 GB (+ 27 MB of tables). Two calls (q, k) per block,
40 blocks per forward: about 1.46 TB less memory traffic per forward pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flashportrait.kernels.rounding import cast_rne


@triton.jit
def _rmsnorm_rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    seq_len,
    width,
    stride_x_row,
    stride_out_row,
    eps,
    HALF_HEAD: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = row % seq_len
    pair = tl.arange(0, BLOCK_PAIRS)
    chan = tl.arange(0, 2 * BLOCK_PAIRS)
    pair_mask = pair < width // 2
    chan_mask = chan < width

    # Contiguous loads, split into (real, imag) in registers: channel 2p is real, 2p+1 imaginary.
    x = tl.load(x_ptr + row * stride_x_row + chan, mask=chan_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + chan, mask=chan_mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / width
    rstd = tl.rsqrt(mean_sq + eps)
    y = x * rstd * w
    re, im = tl.split(tl.reshape(y, (BLOCK_PAIRS, 2)))

    # Table column of pair p is its index within the head; the row is the token's position.
    col = pair % HALF_HEAD
    c = tl.load(cos_ptr + token * HALF_HEAD + col, mask=pair_mask, other=1.0)
    s = tl.load(sin_ptr + token * HALF_HEAD + col, mask=pair_mask, other=0.0)
    out = tl.reshape(tl.join(re * c - im * s, re * s + im * c), (2 * BLOCK_PAIRS,))
    tl.store(out_ptr + row * stride_out_row + chan, cast_rne(out, out_ptr.dtype.element_ty), mask=chan_mask)


def _num_warps(block: int) -> int:
    """About 16 to 32 elements per thread keeps a whole row in registers without spilling."""
    return max(1, min(16, block // 512))


def rmsnorm_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Kernel launch. x: [B, L, H*D]; weight: [H*D]; cos, sin: float32
    [L, 1, D/2] or [L, D/2] contiguous. Returns [B, L, H, D] in out_dtype (default x's dtype)."""
    b, l, width = x.shape
    head_dim = width // num_heads
    # Rows may sit at any constant stride (e.g. q or k sliced out of a fused qkv output).
    if x.stride(-1) != 1 or x.stride(0) != l * x.stride(1):
        x = x.contiguous()
    cos = cos.reshape(-1, head_dim // 2).float().contiguous()
    sin = sin.reshape(-1, head_dim // 2).float().contiguous()
    out = torch.empty(b, l, num_heads, head_dim, dtype=out_dtype or x.dtype, device=x.device)
    block_pairs = triton.next_power_of_2(width // 2)
    _rmsnorm_rope_kernel[(b * l,)](
        x,
        weight.contiguous(),
        cos,
        sin,
        out,
        l,
        width,
        x.stride(1),
        width,
        eps,
        HALF_HEAD=head_dim // 2,
        BLOCK_PAIRS=block_pairs,
        num_warps=_num_warps(2 * block_pairs),
    )
    return out

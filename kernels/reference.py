"""Plain PyTorch references of the fused kernels: the unfused sequences the Wan2.1 DiT runs.

Each function is the arithmetic of `flashportrait/models/dit_blocks.py` (itself the reference's
WanRMSNorm, rope_apply, WanLayerNorm and the block's modulation lines under CUDA autocast), kept here
as the oracle the kernels are tested against and the fallback `flashportrait.kernels` uses where
Triton cannot run (no CUDA, no triton package, or a shape a kernel does not take). Shapes:

- q/k RMS norm + RoPE: x [B, L, H*D] -> [B, L, H, D]; tables (cos, sin) [L, 1, D/2] or [L, D/2].
- modulation: x [B, L, C] (the float32 residual stream), per-sample vectors [B, 1, C] or [B, C]
  (or [1, 1, C] shared by every sample).
- fp8: rows are the last dimension; e4m3 values with float32 scales, `value = fp8 * scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# A row of zeros gets this absmax instead of 0 so its scale stays finite (its values quantise to 0).
FP8_MIN_ABSMAX = 1e-12
ACTIVATIONS = (None, "gelu_tanh")


def rmsnorm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMS norm over the full width, then 3-axis RoPE per head, as the DiT computes it.

    x: [B, L, H*D] (q or k straight out of its linear layer); weight: [H*D]; cos, sin: [L, 1, D/2] or
    [L, D/2] float32 (identity rows past the real tokens). Returns [B, L, H, D] in x's dtype.

    WanRMSNorm rounds twice to x's dtype (after the float32 normalisation, and after the weight);
    the rotation is done in the tables' precision and rounded once more.
    """
    b, l, width = x.shape
    normed = F.rms_norm(x.float(), (width,), eps=eps).to(x.dtype) * weight.to(x.dtype)
    heads = normed.view(b, l, num_heads, width // num_heads)
    return apply_rope_reference(heads, cos, sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (2j, 2j+1) = (real, imag) of x [B, L, H, D] by the tables
    [L, 1, D/2] (or [L, D/2]): (a + ib)(cos + i sin). Computed in the tables' dtype, returned in x's."""
    d = x.shape[-1]
    cos, sin = _tables_lhd(cos, sin)
    re, im = x.to(cos.dtype).unflatten(-1, (d // 2, 2)).unbind(-1)
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def _tables_lhd(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables as [L, 1, D/2] so they broadcast over heads."""
    if cos.dim() == 2:
        return cos[:, None], sin[:, None]
    return cos, sin


def _per_sample(v: torch.Tensor | None) -> torch.Tensor | None:
    """[B, C] -> [B, 1, C] (a [B, 1, C] or [1, 1, C] vector is returned as is)."""
    if v is None or v.dim() == 3:
        return v
    return v[:, None]


def layernorm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`LN(x) * (1 + scale) + shift` in float32, cast to `out_dtype` (the bf16 cast the next linear
    layer does under autocast). LN has no affine unless `weight`/`bias` are given (norm3 of the
    block has one; norm1/norm2 and the head's norm do not). shift/scale None: plain LayerNorm.

    x: [B, L, C] any float dtype; shift, scale: [B, 1, C] / [B, C] float32. Returns [B, L, C]."""
    c = x.shape[-1]
    w = None if weight is None else weight.float()
    bb = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (c,), w, bb, eps)
    if scale is not None:
        y = y * (1 + _per_sample(scale).float())
    if shift is not None:
        y = y + _per_sample(shift).float()
    return y.to(out_dtype)


def gated_residual_reference(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """`x + y.float() * gate` (gate None: `x + y.float()`), in x's dtype.

    x: [B, L, C] residual stream (float32 in the DiT: the reference's `x + y * e[2]` runs in an
    autocast(float32) region with float32 `e`, which promotes the stream to float32); y: [B, L, C]
    the branch output (bf16); gate: [B, 1, C] / [B, C] float32."""
    yf = y.float()
    if gate is not None:
        yf = yf * _per_sample(gate).float()
    return (x.float() + yf).to(x.dtype)


def residual_layernorm_modulate_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update followed by the next norm: returns (x_new, h) with
    x_new = gated_residual(x, y, gate) in x's dtype and h = layernorm_modulate(x_new, ...)."""
    x_new = gated_residual_reference(x, y, gate)
    h = layernorm_modulate_reference(
        x_new, shift, scale, weight=weight, bias=bias, eps=eps, out_dtype=out_dtype
    )
    return x_new, h


def apply_activation_reference(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activation in x's dtype, as the DiT's FFN does (nn.GELU(approximate='tanh') on bf16)."""
    if activation is None:
        return x
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")


def quantize_fp8_reference(
    x: torch.Tensor, activation: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic e4m3 quantisation of x [..., K].

    scale = max(absmax(row), FP8_MIN_ABSMAX) / 448 and fp8 = round_to_nearest_even(x * (448 / absmax))
    clamped to [-448, 448], all in float32: the row's largest value lands on 448 exactly. Returns
    (fp8 [..., K] float8_e4m3fn, scale [..., 1] float32); x ~ fp8.float() * scale.
    `activation` ('gelu_tanh') is applied first, in float32 (the fused kernel does not round it to
    x's dtype before quantising)."""
    xf = x.float()
    if activation is not None:
        xf = apply_activation_reference(xf, activation)
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(FP8_MIN_ABSMAX)
    # Tensor / tensor is a correctly rounded division on CPU and CUDA alike, as the kernel's div_rn:
    # PyTorch computes `448 / t` as `t.reciprocal() * 448`, and CUDA `t / 448` as `t * (1 / 448)`,
    # each rounded twice.
    fp8_max = torch.full_like(absmax, FP8_MAX)
    q = (xf * (fp8_max / absmax)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, absmax / fp8_max


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [..., K] * scale [..., 1] -> float32."""
    return q.float() * scale.float()


def fp8_linear_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """What `torch._scaled_mm` computes with row-wise scales, emulated in float32: every fp8 x fp8
    product is exact in float32; only the float32 accumulation order differs from the GPU's.

    xq: [M, K] e4m3, x_scale: [M, 1] float32; wq: [N, K] e4m3, w_scale: [N] float32; bias: [N].
    Returns [M, N] in out_dtype."""
    acc = xq.float() @ wq.float().t()
    out = acc * x_scale.float() * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)

"""Fused adaptive-LayerNorm modulation and gated residuals of the Wan2.1 DiT block.

One kernel, specialised by compile-time flags, does any prefix of this row-wise chain for one token:

    x_new = x + gate * y                       (residual; gate optional; written in x's dtype)
    h     = LN(x_new) [* w + b] * (1 + scale) + shift   (float32; affine and modulation optional)
    out   = h in the compute dtype, or e4m3 with a per-token scale (the next FP8Linear's input)

The block (reference order, golden notes "Block order") becomes four passes over the stream:

    h        = layernorm_modulate(x, shift_msa, scale_msa)                  # norm1
    x, h     = residual_layernorm_modulate(x, attn, gate_msa, weight=norm3.w, bias=norm3.b)
    x, h     = residual_layernorm_modulate(x, cross, None, shift_mlp, scale_mlp)  # norm2
    x        = gated_residual(x, ffn, gate_mlp)

Precision (reference behaviour, see dit_blocks.py): the residual stream is float32, because the
reference's `x + y * e[2]` runs in an autocast(float32) region with float32 modulation `e`; the
norms run in float32; the modulated output is rounded once to bf16, where the next linear layer's
autocast would cast it. A bf16 stream also works (x_new is rounded to it before the norm, as the
unfused code would).

Bytes per element at the full-size shape (52,224 tokens x 5,120 channels = 267.4 M elements; float32
stream, bf16 branch outputs), unfused PyTorch vs fused:
- LN + modulation + cast (LN 4+4, * (1 + scale) 4+4, + shift 4+4, cast 4+2): 30 vs 6 (8.0 vs 1.6 GB);
- gated residual (y.float() 2+4, * gate 4+4, x + 8+4): 26 vs 10 (7.0 vs 2.7 GB);
- residual + affine LN + cast (26 + 4+4 + 4+2): 40 vs 12; residual + LN + modulation: 48 vs 12.
A whole block: 144 vs 40 bytes per element, about 27.8 GB less traffic per block, 1.1 TB per forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flashportrait.kernels.fp8 import fp8_row_scales, quantize_values
from flashportrait.kernels.reference import FP8_DTYPE
from flashportrait.kernels.rounding import cast_rne


@triton.jit
def _residual_norm_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    shift_ptr,
    scale_ptr,
    w_ptr,
    b_ptr,
    x_out_ptr,
    h_ptr,
    h_scale_ptr,
    rows_per_sample,
    width,
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    HAS_Y: tl.constexpr,
    HAS_GATE: tl.constexpr,
    WRITE_X: tl.constexpr,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP8_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sample = row // rows_per_sample
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    base = row * width
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(gate_ptr + sample * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
            y = y * g
        x = x + y
    if WRITE_X:
        x_store = cast_rne(x, x_out_ptr.dtype.element_ty)
        tl.store(x_out_ptr + base + offs, x_store, mask=mask)
        # The norm sees the stream as stored (a no-op for a float32 stream).
        x = x_store.to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=0) / width
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / width + eps)
        h = xc * rstd
        if HAS_W:
            h = h * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            h = h + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + sample * stride_scale + offs, mask=mask, other=0.0).to(tl.float32)
            h = h * (1.0 + s)
        if HAS_SHIFT:
            h = h + tl.load(shift_ptr + sample * stride_shift + offs, mask=mask, other=0.0).to(tl.float32)
        if FP8_OUT:
            absmax = tl.max(tl.where(mask, tl.abs(h), 0.0), axis=0)
            inv, scale = fp8_row_scales(absmax)
            tl.store(h_ptr + base + offs, quantize_values(h, inv).to(tl.float8e4nv), mask=mask)
            tl.store(h_scale_ptr + row, scale)
        else:
            tl.store(h_ptr + base + offs, cast_rne(h, h_ptr.dtype.element_ty), mask=mask)


def _vector(v: torch.Tensor | None, batch: int, width: int) -> tuple[torch.Tensor | None, int]:
    """A per-sample vector [B, 1, C], [B, C], [1, 1, C], [1, C] or [C] -> ([B or 1, C] with a
    contiguous last dim, stride between samples: 0 when one vector serves every sample)."""
    if v is None:
        return None, 0
    if v.dim() == 3 and v.shape[1] == 1:
        rows = v[:, 0]
    elif v.dim() in (1, 2):
        rows = v.reshape(-1, v.shape[-1])
    else:
        rows = None
    if rows is None or rows.shape[-1] != width or rows.shape[0] not in (1, batch):
        raise ValueError(f"modulation vector of shape {tuple(v.shape)} does not fit [{batch}, 1, {width}]")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, (rows.stride(0) if rows.shape[0] > 1 else 0)


def residual_norm_triton(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm: bool = True,
    out_dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    x_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Kernel launch. x: [B, L, C]; y: [B, L, C] or None (no residual); vectors as in `_vector`;
    weight, bias: [C]. Writes x_new when y is given (into `x_out`, which may be x itself, else a new
    tensor of x's dtype). Returns (x_new or None, h [B, L, C] in out_dtype or e4m3 or None,
    h_scale [B, L, 1] float32 when fp8 else None)."""
    b, l, c = x.shape
    x = x.contiguous()
    if y is not None:
        if y.shape != x.shape:
            raise ValueError(f"residual branch {tuple(y.shape)} does not match the stream {tuple(x.shape)}")
        y = y.contiguous()
    write_x = y is not None
    if write_x and x_out is None:
        x_out = torch.empty_like(x)
    if x_out is not None and not x_out.is_contiguous():
        raise ValueError("x_out must be contiguous")
    gate_v, gate_stride = _vector(gate, b, c)
    shift_v, shift_stride = _vector(shift, b, c)
    scale_v, scale_stride = _vector(scale, b, c)
    h = h_scale = None
    if norm:
        h = torch.empty(b, l, c, dtype=FP8_DTYPE if fp8 else out_dtype, device=x.device)
        if fp8:
            h_scale = torch.empty(b, l, 1, dtype=torch.float32, device=x.device)
    if b * l:
        block = triton.next_power_of_2(c)
        # Tensors a flag switches off are never read; any pointer fills their slot.
        _residual_norm_kernel[(b * l,)](
            x,
            x if y is None else y,
            x if gate_v is None else gate_v,
            x if shift_v is None else shift_v,
            x if scale_v is None else scale_v,
            x if weight is None else weight.contiguous(),
            x if bias is None else bias.contiguous(),
            x if x_out is None else x_out,
            x if h is None else h,
            x if h_scale is None else h_scale,
            l,
            c,
            gate_stride,
            shift_stride,
            scale_stride,
            eps,
            HAS_Y=y is not None,
            HAS_GATE=gate_v is not None,
            WRITE_X=write_x,
            NORM=norm,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_SHIFT=shift_v is not None,
            HAS_SCALE=scale_v is not None,
            FP8_OUT=fp8,
            BLOCK=block,
            num_warps=max(1, min(16, block // 512)),
        )
    return x_out if write_x else None, h, h_scale

"""The fused kernels' entry points, each choosing the Triton kernel or its PyTorch reference.

Backend choice per call (`backend=` argument, else the process default set by `set_default_backend`,
else automatic): "triton" runs the kernel and fails loudly when it cannot; "torch" runs the plain
PyTorch reference of `flashportrait.kernels.reference`; automatic runs the kernel on CUDA tensors
when the `triton` package is importable and the reference otherwise (CPU goldens, machines without
triton). Triton's CPU interpreter (`TRITON_INTERPRET=1`, which must be set before triton is first
imported) serves CPU tensors only when "triton" is asked for explicitly: it is the tests' way of
running the kernels without a GPU, far too slow for anything else. The kernel modules import
`triton` at their top, so they are imported here lazily, on the first kernel call: importing this
package never imports triton or touches CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cache

import torch
from flashportrait.kernels import reference as ref

BACKENDS = ("triton", "torch")
# Rows wider than this stay with the reference: one program holds a whole row in registers.
MAX_KERNEL_WIDTH = 32768

_default_backend: str | None = None


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run this call."""


@dataclass(frozen=True)
class Fp8Activation:
    """A per-token quantised activation: data [..., K] float8_e4m3fn, scale [..., 1] float32, with
    value = data * scale. What `FP8Linear` consumes without quantising again."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self) -> torch.Tensor:
        """float32 values [..., K]."""
        return ref.dequantize_fp8_reference(self.data, self.scale)


def set_default_backend(name: str | None) -> None:
    """Pin the backend used when a call does not name one (None: automatic)."""
    global _default_backend
    if name is not None and name not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {name!r}; choose from {BACKENDS}")
    _default_backend = name


@cache
def triton_importable() -> bool:
    """The triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Triton's CPU interpreter is requested for this process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device` in this process."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return not triton_interpreting()
    return device.type == "cpu" and triton_interpreting()


def _use_triton(backend: str | None, x: torch.Tensor, width: int) -> bool:
    name = backend or _default_backend
    if name is not None and name not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {name!r}; choose from {BACKENDS}")
    if name == "torch":
        return False
    fits = width <= MAX_KERNEL_WIDTH and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if name == "triton":
        if not triton_runs_on(x.device):
            raise KernelBackendError(
                f"Triton kernels cannot run on {x.device} here (triton importable: {triton_importable()}, "
                f"interpreter: {triton_interpreting()})"
            )
        if not fits:
            raise KernelBackendError(f"no kernel for width {width} in {x.dtype}")
        return True
    return fits and x.device.type == "cuda" and triton_runs_on(x.device)


def rmsnorm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """q or k RMS norm over the full width + 3-axis RoPE: x [B, L, H*D] straight out of its linear
    layer, weight [H*D] (`norm_q.weight` / `norm_k.weight`), cos/sin [L, 1, D/2] float32 from
    `RopeCache` (L = seq_len, identity rows past the real tokens). Returns [B, L, H, D] in x's dtype."""
    _, l, width = x.shape
    if width % num_heads or (width // num_heads) % 2:
        raise ValueError(f"width {width} does not split into {num_heads} heads of an even size")
    if cos.shape[0] != l:
        raise ValueError(f"rope tables have {cos.shape[0]} rows for a sequence of {l} tokens")
    if _use_triton(backend, x, width):
        from flashportrait.kernels.rmsnorm_rope import rmsnorm_rope_triton

        return rmsnorm_rope_triton(x, weight, cos, sin, num_heads, eps)
    return ref.rmsnorm_rope_reference(x, weight, cos, sin, num_heads, eps)


def _fp8_or(h: torch.Tensor, fp8: bool, h_scale: torch.Tensor | None = None) -> torch.Tensor | Fp8Activation:
    if not fp8:
        return h
    if h_scale is None:
        return Fp8Activation(*ref.quantize_fp8_reference(h))
    return Fp8Activation(h, h_scale)


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    backend: str | None = None,
) -> torch.Tensor | Fp8Activation:
    """`LN(x) [* weight + bias] * (1 + scale) + shift` in float32, written once in `out_dtype` (or,
    with fp8=True, as an `Fp8Activation` for FP8Linear layers). x: [B, L, C] (float32 stream);
    shift/scale: [B, 1, C] float32 (views of the 6-way modulation are fine). Returns [B, L, C]."""
    if _use_triton(backend, x, x.shape[-1]):
        from flashportrait.kernels.modulation import residual_norm_triton

        _, h, h_scale = residual_norm_triton(
            x, None, None, shift, scale, weight=weight, bias=bias, eps=eps, out_dtype=out_dtype, fp8=fp8
        )
        return _fp8_or(h, fp8, h_scale)
    h = ref.layernorm_modulate_reference(
        x, shift, scale, weight=weight, bias=bias, eps=eps, out_dtype=torch.float32 if fp8 else out_dtype
    )
    return _fp8_or(h, fp8)


def gated_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """`x + y * gate` (gate None: `x + y`) in x's dtype. x: [B, L, C] the float32 stream; y: [B, L, C]
    (bf16 branch output); gate: [B, 1, C] float32. inplace=True writes into x and returns it."""
    if _use_triton(backend, x, x.shape[-1]):
        from flashportrait.kernels.modulation import residual_norm_triton

        x_new, _, _ = residual_norm_triton(x, y, gate, norm=False, x_out=x if inplace else None)
        return x_new
    x_new = ref.gated_residual_reference(x, y, gate)
    return x.copy_(x_new) if inplace else x_new


def residual_layernorm_modulate(
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
    fp8: bool = False,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Activation]:
    """`gated_residual` then `layernorm_modulate` of the new stream, in one pass.
    Returns (x_new [B, L, C] in x's dtype, h [B, L, C] in out_dtype or an Fp8Activation)."""
    if _use_triton(backend, x, x.shape[-1]):
        from flashportrait.kernels.modulation import residual_norm_triton

        x_new, h, h_scale = residual_norm_triton(
            x,
            y,
            gate,
            shift,
            scale,
            weight=weight,
            bias=bias,
            eps=eps,
            out_dtype=out_dtype,
            fp8=fp8,
            x_out=x if inplace else None,
        )
        return x_new, _fp8_or(h, fp8, h_scale)
    x_new, h = ref.residual_layernorm_modulate_reference(
        x,
        y,
        gate,
        shift,
        scale,
        weight=weight,
        bias=bias,
        eps=eps,
        out_dtype=torch.float32 if fp8 else out_dtype,
    )
    if inplace:
        x_new = x.copy_(x_new)
    return x_new, _fp8_or(h, fp8)


def quantize_fp8(
    x: torch.Tensor, activation: str | None = None, *, backend: str | None = None
) -> Fp8Activation:
    """Per-token e4m3 quantisation of x [..., K] (after `activation`, 'gelu_tanh' or None, applied in
    float32). Returns an Fp8Activation with data [..., K] and scale [..., 1]."""
    if _use_triton(backend, x, 0):
        from flashportrait.kernels.fp8 import quantize_fp8_triton

        return Fp8Activation(*quantize_fp8_triton(x, activation))
    return Fp8Activation(*ref.quantize_fp8_reference(x, activation))

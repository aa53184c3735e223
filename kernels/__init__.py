"""Triton-language GPU kernels (installed as ``flashportrait.kernels``).

Fused kernels for the bandwidth-bound glue of the Wan2.1 DiT, each with a plain PyTorch reference
(`flashportrait.kernels.reference`) that runs wherever Triton cannot:

- `rmsnorm_rope`: q/k RMS norm over the full width + 3-axis rotary embedding, one pass;
- `layernorm_modulate`, `gated_residual`, `residual_layernorm_modulate`: the block's adaptive
  LayerNorm modulation and residual updates, optionally emitting fp8 for `FP8Linear`;
- `quantize_fp8`: per-token e4m3 activation quantisation, optionally fused with GELU(tanh).

Importing this package imports neither triton nor CUDA; the kernels load on first use.
"""

from flashportrait.kernels.api import (
    BACKENDS,
    Fp8Activation,
    KernelBackendError,
    gated_residual,
    layernorm_modulate,
    quantize_fp8,
    residual_layernorm_modulate,
    rmsnorm_rope,
    set_default_backend,
    triton_runs_on,
)

__all__ = [
    "BACKENDS",
    "Fp8Activation",
    "KernelBackendError",
    "gated_residual",
    "layernorm_modulate",
    "quantize_fp8",
    "residual_layernorm_modulate",
    "rmsnorm_rope",
    "set_default_backend",
    "triton_runs_on",
]

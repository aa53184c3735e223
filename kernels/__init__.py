"""Triton-language GPU kernels (installed as ``flashportrait.kernels``).

Fused kernels for the bandwidth-bound glue of the Wan2.1 DiT, each with a plain PyTorch reference
(`flashportrait.kernels.reference`) that runs wherever Triton cannot (CPU, goldens):

- `rmsnorm_rope`: q/k RMS norm over the full width + 3-axis rotary embedding, one pass;
- `layernorm_modulate`, `gated_residual`, `residual_layernorm_modulate`: the block's adaptive
  LayerNorm modulation and residual updates, optionally emitting fp8 for `FP8Linear`;
- `quantize_fp8`: per-token e4m3 activation quantisation, optionally fused with GELU(tanh).

How a DiT block uses them (x: the float32 stream [B, L, C]; modulation chunks [B, 1, C] float32;
`dt` the linear layers' compute dtype, bf16 in production and float32 for the goldens):

    h = layernorm_modulate(x, shift_msa, scale_msa, eps=eps, out_dtype=dt)
    q = rmsnorm_rope(self_attn.q(h), norm_q.weight, cos, sin, heads, eps)   # likewise k
    x, h = residual_layernorm_modulate(x, attn_out, gate_msa, weight=norm3.weight,
                                       bias=norm3.bias, eps=eps, out_dtype=dt)
    x, h = residual_layernorm_modulate(x, cross_out, None, shift_mlp, scale_mlp, eps=eps, out_dtype=dt)
    x = gated_residual(x, ffn_out, gate_mlp)

With fp8 linear layers, `fp8=True` makes the norms return an `Fp8Activation` that `FP8Linear`
consumes as is, and `quantize_fp8(hidden, "gelu_tanh")` feeds the FFN's second layer. On the CPU
the automatic backend is the reference, which is the DiT's unfused arithmetic operation for
operation, so golden results do not change.

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

"""float8 (e4m3) linear layers: weights quantised once per output channel, activations per token.

`FP8Linear` holds `weight` [N, K] float8_e4m3fn and `weight_scale` [N] float32 (value = weight *
weight_scale, each output channel's absmax mapped to 448) and a bias in the output dtype. Its input is
quantised per token on the fly (`flashportrait.kernels.quantize_fp8`: a Triton kernel on the GPU), or
arrives already quantised as an `Fp8Activation` from a fused norm kernel. On CUDA the product is
`torch._scaled_mm` with row-wise scales (scale_a [M, 1], scale_b [1, N]), bf16 output and the bias
added in its epilogue; Hopper runs it at about twice the bf16 rate. Elsewhere (CPU tests) the same
arithmetic is emulated in float32 (`fp8_linear_reference`): fp8 x fp8 products are exact in float32,
so only the accumulation order differs.

`convert_linears_to_fp8(model, filter)` swaps a model's nn.Linear layers for FP8Linear in place
(after the bf16 weights are loaded) and returns the names converted; `dit_block_linears` is the
filter for the DiT (the attention and FFN projections of the transformer blocks, not the float32
time embedding, patch embedding, text/image embeddings or head).

Error budget (bench/fp8_error.py measures it at full width on the GPU): e4m3 keeps 3 mantissa bits,
so each operand value carries a relative rounding error of up to 2^-4 (about 2.6% RMS), and one fp8
layer's output differs from the exact product by a relative L2 error of about 3.7% for Gaussian
activations and weights (sqrt(2) x 2.6%), against about 0.17% for bf16 (tests/kernels/test_fp8_linear.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from flashportrait.kernels import Fp8Activation, quantize_fp8
from flashportrait.kernels.reference import FP8_DTYPE, fp8_linear_reference, quantize_fp8_reference

# torch._scaled_mm needs K and N multiples of 16 (fp8 tensor-core tiles).
ALIGNMENT = 16


class FP8Linear(nn.Module):
    """y = x W^T + b with W and x in e4m3. Input x: [..., K] any float dtype or an Fp8Activation;
    output [..., N] in `out_dtype` (bf16: the only output type of row-wise `_scaled_mm` on every
    torch version we support)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        out_dtype: torch.dtype = torch.bfloat16,
        fast_accum: bool = True,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features % ALIGNMENT or out_features % ALIGNMENT:
            raise ValueError(
                f"FP8Linear needs in and out features divisible by {ALIGNMENT}, "
                f"got {in_features}->{out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        # Hopper's fast accumulation keeps partial sums in the tensor core's reduced precision; its
        # error is small next to e4m3 rounding (bench/fp8_error.py reports both settings).
        self.fast_accum = fast_accum
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        bias_tensor = torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True
    ):
        """Quantise `linear`'s weight once (per output channel, on its device) into a new FP8Linear."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            out_dtype=out_dtype,
            fast_accum=fast_accum,
            device=weight.device,
        )
        module.load_weight(weight, None if linear.bias is None else linear.bias.detach())
        return module

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """weight: [N, K] any float dtype (quantised here); bias: [N] or None."""
        q, scale = quantize_fp8_reference(weight)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale[:, 0])
        if bias is not None:
            self.bias.copy_(bias)

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] float32: what the layer multiplies by."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        return fp8_matmul(x, self.weight, self.weight_scale, self.bias, self.out_dtype, self.fast_accum)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, out_dtype={self.out_dtype}, fast_accum={self.fast_accum}"
        )


def fp8_matmul(
    x: torch.Tensor | Fp8Activation,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = True,
) -> torch.Tensor:
    """What `FP8Linear` computes, on any weights laid out like its buffers (also the concatenated
    q/k/v weights of a fused projection). x: [..., K] any float dtype (quantised per token here) or
    an Fp8Activation; weight: [N, K] e4m3; weight_scale: [N] float32; bias: [N] or None.
    Returns [..., N] in out_dtype."""
    act = x if isinstance(x, Fp8Activation) else quantize_fp8(x)
    *lead, k = act.data.shape
    n, k_weight = weight.shape
    if k != k_weight:
        raise ValueError(f"fp8 linear layer expects {k_weight} input features, got {k}")
    data = act.data.reshape(-1, k)
    scale = act.scale.reshape(-1, 1).float()
    if data.is_cuda and data.shape[0]:
        out = torch._scaled_mm(
            data.contiguous(),
            weight.t(),
            scale_a=scale.contiguous(),
            scale_b=weight_scale[None, :],
            bias=bias,
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )
    else:
        out = fp8_linear_reference(data, scale, weight, weight_scale, bias, out_dtype)
    return out.view(*lead, n)


def dit_block_linears(name: str, module: nn.Linear) -> bool:
    """Filter for the DiT: every linear layer inside `blocks.*` (self- and cross-attention q/k/v/o,
    k_img/v_img, the expression projections, both FFN layers) whose sizes fit fp8 tiles. Layers
    outside the blocks stay as they are (the reference keeps time embedding and head in float32)."""
    return (
        name.startswith("blocks.")
        and module.in_features % ALIGNMENT == 0
        and module.out_features % ALIGNMENT == 0
    )


def dit_token_linears(name: str, module: nn.Linear) -> bool:
    """`dit_block_linears` less the cross-attention's context projections (text/image keys and
    values, expression keys and values): they see a few hundred rows per block, so fp8 saves no time
    there."""
    return dit_block_linears(name, module) and not _CONTEXT_PROJECTIONS.search(name)


def dit_self_attention_ffn_linears(name: str, module: nn.Linear) -> bool:
    """The self-attention projections and the FFN of every block (the cross-attention stays bf16)."""
    return dit_block_linears(name, module) and _SELF_OR_FFN.search(name) is not None


def dit_ffn_linears(name: str, module: nn.Linear) -> bool:
    """The FFN layers of every block."""
    return dit_block_linears(name, module) and ".ffn." in name


_CONTEXT_PROJECTIONS = re.compile(r"\.cross_attn\.(k|v|k_img|v_img|emo_k_proj|emo_v_proj)$")
_SELF_OR_FFN = re.compile(r"\.(self_attn|ffn)\.")
# Named selections of the DiT's linear layers for `WanDiT.convert_to_fp8` (bench/dit_fp8_error.py
# measures the time and error of each; at full size the guided velocity moved 10.5% with "all",
# 3.0% with "self_attn+ffn", for forwards of 10.27 and 10.55 s against 11.84 s in bf16, batch 2).
DIT_FP8_LAYER_SETS: dict[str, Callable[[str, nn.Linear], bool]] = {
    "all": dit_block_linears,
    "tokens": dit_token_linears,
    "self_attn+ffn": dit_self_attention_ffn_linears,
    "ffn": dit_ffn_linears,
}


DEFAULT_FP8_LAYERS = "self_attn+ffn"


def convert_linears_to_fp8(
    model: nn.Module,
    filter: Callable[[str, nn.Linear], bool] = dit_block_linears,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = True,
) -> list[str]:
    """Replace, in place, every nn.Linear (subclasses included) for which `filter(name, module)` is
    true by an FP8Linear with its weight quantised once; the original weights are released. Run it
    after the weights are loaded, on the device the model runs on. Returns the converted names."""
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and filter(name, module)
    ]
    for name, module in chosen:
        if module.in_features % ALIGNMENT or module.out_features % ALIGNMENT:
            raise ValueError(f"{name}: {module.in_features}->{module.out_features} does not fit fp8 tiles")
        if module.weight.is_meta:
            raise ValueError(f"{name}: weights are on the meta device; load them before converting")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(module, out_dtype=out_dtype, fast_accum=fast_accum))
    return [name for name, _ in chosen]

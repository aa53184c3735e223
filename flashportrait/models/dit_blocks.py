"""Building blocks of the Wan2.1 I2V DiT with FlashPortrait's expression cross-attention.

Parameter names mirror the release checkpoints (`golden/manifests/transformer_i2v_14b.json`).

Precision policy, autocast-free. The reference runs every pass under CUDA autocast(bf16) with bf16
weights, except the time embedding, the modulation arithmetic and the output head, which sit in an
`amp.autocast(dtype=float32)` region. We reproduce that with explicit dtypes:
- `CastLinear`: matmuls in the weight dtype (bf16 in production, float32 for the goldens);
- `Fp32Linear`: matmuls in float32 whatever the weight dtype (time embedding, head);
- `Fp32LayerNorm`: layer norms in float32 (autocast runs layer_norm in float32);
- the residual stream is float32: in the reference `x + y * gate` promotes to float32 because the
  modulation `e0` is float32, so from the first block on the stream is float32 there too. (We
  convert the patch embedding's output at once; the reference's first norm1 sees it in bf16.)
- the expression branch's statistics and mixing are taken in float32 (see `_mix_expression`).
With float32 weights every path is plain float32, which is what the goldens were produced with.

Fast path (`fast=True`, chosen by `WanDiT` for CUDA): the same function with fewer passes over
memory. q/k/v are one matmul over their concatenated weights (`FusedProjection`); the norms,
modulations and residual updates are the fused kernels of `flashportrait.kernels` (q/k RMS norm +
RoPE, LN + modulation, residual + LN + modulation, gated residual), which round once where the
unfused code rounds two or three times; the FFN's GELU runs in the first matmul's epilogue; the
expression renormalisation takes its statistics in one read per tensor and becomes one multiply-add
plus a per-sample bias of the output projection (`_mix_and_project`). With FP8Linear layers
(`fp8_linear.convert_linears_to_fp8`) the norms emit the fp8 input of the next matmul directly, and
q/k/v share one quantised activation. A stream of batch 1 with a context of batch B means the B
samples share it (identical inputs, `WanDiT`): the self-attention half of the block is computed
once, and the stream splits where the samples differ (the expression weight, the text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.kernels import (
    Fp8Activation,
    gated_residual,
    layernorm_modulate,
    quantize_fp8,
    residual_layernorm_modulate,
    rmsnorm_rope,
)
from flashportrait.models.attention import attention
from flashportrait.models.fp8_linear import FP8Linear, fp8_matmul
from flashportrait.models.rope import apply_rope, identity_tables

# The reference splits the cross-attention context at a hard-coded 257 CLIP tokens
# (cls + 16x16 patches of ViT-H/14 at 224); it is a config value here.
CLIP_TOKENS = 257
# Renormalisation of the expression branch: (e - mean_e) * std_x / (std_e + 1e-5) + mean_x.
EMO_STD_EPS = 1e-5


class CastLinear(nn.Linear):
    """A linear layer computed in its weight dtype (the input is cast to it): the bf16 matmuls of the
    reference's autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Fp32Linear(nn.Linear):
    """A linear layer computed in float32 whatever its weight dtype: the reference's
    `amp.autocast(dtype=float32)` region (time embedding, time projection, head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed and returned in float32 (reference WanLayerNorm on the float32 stream;
    autocast runs layer_norm in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """Reference WanRMSNorm: x * rsqrt(mean(x^2) + eps) over the full width, computed in float32,
    cast back to x's dtype, then scaled by `weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight.to(x.dtype)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, L, H, D]."""
    b, l, width = x.shape
    return x.view(b, l, num_heads, width // num_heads)


def _samples(t: torch.Tensor) -> torch.Tensor:
    """t [B, ...] itself, or t[:1] when every sample is the same row (batch 1 or a stride-0 batch
    from `expand`): work on it is done once and broadcast."""
    if t.shape[0] > 1 and t.stride(0) == 0:
        return t[:1]
    return t


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[1 or batch, ...] -> [batch, ...] materialised (attention kernels want real strides)."""
    if t.shape[0] == batch:
        return t
    return t.expand(batch, *t.shape[1:]).contiguous()


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer's matmul runs in (its output dtype for FP8Linear)."""
    if isinstance(linear, FP8Linear):
        return linear.out_dtype
    return linear.weight.dtype


# Tensors of a linear layer that a fused projection concatenates (FP8Linear has all three).
_PROJECTION_TENSORS = ("weight", "weight_scale", "bias")


class FusedProjection:
    """Linear layers reading the same input (self-attention q, k, v) computed as one matmul.

    Their weights, biases and fp8 weight scales are concatenated once along the output dimension
    and each layer's tensors are rebound as views of the concatenation: the state dict keeps its
    names, shapes and values, memory is not duplicated, and writes into a layer's weight are seen by
    the fused matmul. `valid` notices when a layer was replaced (fp8 conversion) or its tensors were
    (checkpoint loading, `.to()`), and the owner builds a new one.
    """

    def __init__(self, linears: tuple[nn.Module, ...]):
        kinds = {type(m) is FP8Linear for m in linears}
        if len(kinds) != 1 or {m.bias is None for m in linears} != {linears[0].bias is None}:
            raise ValueError("fused projections need layers of one kind, all with or all without bias")
        self.fp8 = kinds == {True}
        self.linears = linears
        self.out_features = [m.weight.shape[0] for m in linears]
        self.tensors: dict[str, torch.Tensor] = {}
        with torch.inference_mode(False), torch.no_grad():
            for name in _PROJECTION_TENSORS:
                parts = [getattr(m, name, None) for m in linears]
                if parts[0] is None:
                    continue
                whole = _cat_rows([p.detach() for p in parts])
                self.tensors[name] = whole
                for module, view in zip(linears, whole.split(self.out_features), strict=True):
                    if name in module._parameters:
                        module._parameters[name] = nn.Parameter(view, requires_grad=False)
                    else:
                        module._buffers[name] = view
        self._ptrs = self._pointers(linears)

    @staticmethod
    def _pointers(linears: tuple[nn.Module, ...]) -> list[int]:
        return [
            getattr(m, n).data_ptr()
            for m in linears
            for n in _PROJECTION_TENSORS
            if getattr(m, n, None) is not None
        ]

    def valid(self, linears: tuple[nn.Module, ...]) -> bool:
        """Still the concatenation of exactly these layers' current tensors."""
        return (
            all(a is b for a, b in zip(linears, self.linears, strict=True))
            and self._pointers(linears) == self._ptrs
        )

    def __call__(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        """x: [B, L, K] (or an Fp8Activation for fp8 layers) -> [B, L, sum(N)]."""
        weight, bias = self.tensors["weight"], self.tensors.get("bias")
        if self.fp8:
            first = self.linears[0]
            return fp8_matmul(
                x, weight, self.tensors["weight_scale"], bias, first.out_dtype, first.fast_accum
            )
        if isinstance(x, Fp8Activation):
            x = x.dequantize()
        return F.linear(x.to(weight.dtype), weight, bias)


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; one-byte (fp8) tensors go through uint8, which every backend copies."""
    if parts[0].element_size() == 1 and parts[0].is_floating_point():
        return torch.cat([p.view(torch.uint8) for p in parts]).view(parts[0].dtype)
    return torch.cat(parts)


def _norm_rope(
    x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """norm (RMSNorm or Identity) then RoPE of x [B, L, H*D] (a strided slice is fine) -> [B, L, H, D]."""
    if isinstance(norm, RMSNorm):
        return rmsnorm_rope(x, norm.weight, cos, sin, num_heads, norm.eps)
    return apply_rope(_heads(x.contiguous(), num_heads), cos, sin)


class SelfAttention(nn.Module):
    """Self-attention with q/k RMS norm over the full width and 3-axis RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = CastLinear(dim, dim)
        self.k = CastLinear(dim, dim)
        self.v = CastLinear(dim, dim)
        self.o = CastLinear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        # Built on the first fast call (not a submodule: nothing of it enters the state dict).
        self._qkv: FusedProjection | None = None

    def qkv_projection(self) -> FusedProjection:
        """q, k and v as one matmul (built once, rebuilt when the layers or their tensors change)."""
        linears = (self.q, self.k, self.v)
        if self._qkv is None or not self._qkv.valid(linears):
            self._qkv = FusedProjection(linears)
        return self._qkv

    def forward(
        self,
        x: torch.Tensor | Fp8Activation,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lens: torch.Tensor | None,
        *,
        fast: bool = False,
    ) -> torch.Tensor:
        """x: [B, L, dim] (any float dtype; fast: also an Fp8Activation); rope: (cos, sin)
        [L, 1, head_dim/2]; k_lens: [B] real token counts (keys past them are masked, queries are all
        computed) or None. Returns [B, L, dim] in the weight dtype."""
        cos, sin = rope
        n = self.num_heads
        if fast:
            q, k, v = self.qkv_projection()(x).chunk(3, dim=-1)
            q, k = _norm_rope(q, self.norm_q, cos, sin, n), _norm_rope(k, self.norm_k, cos, sin, n)
            v = v.unflatten(-1, (n, -1))
        else:
            q = apply_rope(_heads(self.norm_q(self.q(x)), n), cos, sin)
            k = apply_rope(_heads(self.norm_k(self.k(x)), n), cos, sin)
            v = _heads(self.v(x), n)
        return self.o(attention(q, k, v, k_lens=k_lens).flatten(2))


class I2VCrossAttention(nn.Module):
    """Cross-attention over CLIP image tokens and text tokens, plus FlashPortrait's per-latent-frame
    expression attention renormalised to the statistics of the text+image result."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, emo_dim: int, clip_tokens: int):
        super().__init__()
        self.num_heads = num_heads
        self.clip_tokens = clip_tokens
        self.q = CastLinear(dim, dim)
        self.k = CastLinear(dim, dim)
        self.v = CastLinear(dim, dim)
        self.o = CastLinear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.k_img = CastLinear(dim, dim)
        self.v_img = CastLinear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.emo_k_proj = CastLinear(emo_dim, dim, bias=False)
        self.emo_v_proj = CastLinear(emo_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor | Fp8Activation,
        context: torch.Tensor,
        emo_proj: torch.Tensor | None,
        ip_scale: torch.Tensor | None,
        *,
        fast: bool = False,
    ) -> torch.Tensor:
        """x: [B, L, dim]; context: [B, clip_tokens + text_len, dim] (image tokens first);
        emo_proj: [B, F, K, emo_dim] expression tokens per latent frame, or None;
        ip_scale: [B] float32 weight of the expression branch, or None (branch skipped).
        fast: x, context and emo_proj may also have batch 1 (shared by every sample), x may be an
        Fp8Activation. Returns [B, L, dim] in the weight dtype ([1, L, dim] when nothing differs)."""
        if fast:
            return self._forward_fast(x, context, emo_proj, ip_scale)
        n = self.num_heads
        context_img, context_text = context[:, : self.clip_tokens], context[:, self.clip_tokens :]
        q = _heads(self.norm_q(self.q(x)), n)
        k = _heads(self.norm_k(self.k(context_text)), n)
        v = _heads(self.v(context_text), n)
        k_img = _heads(self.norm_k_img(self.k_img(context_img)), n)
        v_img = _heads(self.v_img(context_img), n)
        # Both unmasked (reference context_lens None): text padding rows are attended.
        out = attention(q, k, v).flatten(2) + attention(q, k_img, v_img).flatten(2)
        if emo_proj is None or ip_scale is None:
            return self.o(out)
        emo = self._expression(q, emo_proj)
        return self.o(_mix_expression(out, emo, ip_scale))

    def _forward_fast(
        self,
        x: torch.Tensor | Fp8Activation,
        context: torch.Tensor,
        emo_proj: torch.Tensor | None,
        ip_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        n = self.num_heads
        context = _samples(context)
        q = self.q(x)
        b, l, width = q.shape
        # RMS norm through the fused kernel with identity rotation tables (no RoPE in cross-attention).
        cos, sin = identity_tables(l, width // n, q.device)
        q = _norm_rope(q, self.norm_q, cos, sin, n)
        context_img, context_text = context[:, : self.clip_tokens], context[:, self.clip_tokens :]
        k = _heads(self.norm_k(self.k(context_text)), n)
        v = _heads(self.v(context_text), n)
        k_img = _heads(self.norm_k_img(self.k_img(context_img)), n)
        v_img = _heads(self.v_img(context_img), n)
        batch = max(b, context.shape[0])
        qb = _to_batch(q, batch)
        k, v, k_img, v_img = (_to_batch(t, batch) for t in (k, v, k_img, v_img))
        out = attention(qb, k, v).flatten(2) + attention(qb, k_img, v_img).flatten(2)
        if emo_proj is None or ip_scale is None:
            return self.o(out)
        emo_proj = _samples(emo_proj)
        emo_batch = max(b, emo_proj.shape[0])
        emo = self._expression(_to_batch(q, emo_batch), _to_batch(emo_proj, emo_batch))
        return _mix_and_project(self.o, out, emo, ip_scale)

    def _expression(self, q: torch.Tensor, emo_proj: torch.Tensor) -> torch.Tensor:
        """Each latent frame's queries attend to that frame's K expression tokens, all frames in one
        batched call. q: [B, L, H, D]; emo_proj: [B, F, K, emo_dim]. Returns [B, L, dim].

        Reference grouping: the L query tokens (including any seq_len padding) are cut into F equal
        groups of L // F tokens in order; with L not divisible by F the last L % F tokens belong to
        no group and get no expression output (zeros). Padded expression tokens are zero rows: zero
        keys and values (no bias), unmasked, so they still take softmax mass, as in the reference.
        """
        b, l, h, d = q.shape
        _, f, tokens, _ = emo_proj.shape
        per = l // f
        k = self.emo_k_proj(emo_proj).view(b * f, tokens, h, d)
        v = self.emo_v_proj(emo_proj).view(b * f, tokens, h, d)
        grouped = q[:, : per * f].reshape(b * f, per, h, d)
        emo = attention(grouped, k, v).reshape(b, per * f, h * d)
        if per * f < l:
            emo = F.pad(emo, (0, 0, 0, l - per * f))
        return emo


def _mix_expression(x: torch.Tensor, emo: torch.Tensor, ip_scale: torch.Tensor) -> torch.Tensor:
    """x + ip_scale * renorm(emo), with renorm matching emo's per-sample mean and unbiased std over
    (tokens, channels) to x's (reference: torch.mean/torch.std over dims (1, 2)). Computed in
    float32 (the statistics of a [52k, 5120] tensor are not worth taking in bf16); returned in x's
    dtype. x, emo: [B, L, dim]; ip_scale: [B]."""
    xf, ef = x.float(), emo.float()
    mean_x = xf.mean(dim=(1, 2), keepdim=True)
    std_x = xf.std(dim=(1, 2), keepdim=True)
    mean_e = ef.mean(dim=(1, 2), keepdim=True)
    std_e = ef.std(dim=(1, 2), keepdim=True)
    ef = (ef - mean_e) * (std_x / (std_e + EMO_STD_EPS)) + mean_x
    return (xf + ip_scale.float().view(-1, 1, 1) * ef).to(x.dtype)


def _moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std over (tokens, channels) of t [B, L, C], float32 [B, 1, 1],
    from float32 sums read straight from t (no float32 copy). The variance is taken as
    (sum x^2 - n mean^2) / (n - 1): exact enough when the mean is not large against the spread, which
    holds for attention outputs (|mean| < std in every measured case)."""
    _, l, c = t.shape
    count = l * c
    total = t.sum(dim=(1, 2), keepdim=True, dtype=torch.float32)
    squares = torch.linalg.vector_norm(t, dim=(1, 2), keepdim=True, dtype=torch.float32).square()
    mean = total / count
    var = (squares - total * mean) / (count - 1)
    return mean, var.clamp_min(0).sqrt()


def _mix_and_project(
    linear: nn.Module, x: torch.Tensor, emo: torch.Tensor, ip_scale: torch.Tensor
) -> torch.Tensor:
    """`linear(_mix_expression(x, emo, ip_scale))` in fewer passes over memory.

    x + ip ((emo - mean_e) r + mean_x) = x + a emo + c with r = std_x / (std_e + eps), a = ip r and
    c = ip (mean_x - r mean_e) per sample. x + a emo is one kernel (float32 arithmetic, rounded once
    to x's dtype); the constant c moves through the linear layer, linear(m + c) = linear(m) +
    c W 1, into each sample's bias. x, emo: [1 or B, L, K] (1: shared); ip_scale: [B].
    Returns [B, L, N] in the layer's output dtype."""
    mean_x, std_x = _moments(x)
    mean_e, std_e = _moments(emo)
    ip = ip_scale.float().view(-1, 1, 1)
    ratio = std_x / (std_e + EMO_STD_EPS)
    shift = ip * (mean_x - ratio * mean_e)
    batch, (_, l, k) = ip.shape[0], x.shape
    mixed = torch.empty(batch, l, k, dtype=x.dtype, device=x.device)
    torch.addcmul(x, emo, ip * ratio, out=mixed)
    bias = torch.zeros((), device=x.device) if linear.bias is None else linear.bias.float()
    biases = bias + shift.view(-1, 1) * _row_sums(linear)
    if isinstance(linear, FP8Linear):
        out = [
            fp8_matmul(mixed[i], linear.weight, linear.weight_scale, biases[i].to(linear.out_dtype),
                       linear.out_dtype, linear.fast_accum)
            for i in range(batch)
        ]  # fmt: skip
        return torch.stack(out) if batch > 1 else out[0][None]
    weight = linear.weight
    out = torch.empty(batch, l, weight.shape[0], dtype=weight.dtype, device=x.device)
    for i in range(batch):
        torch.addmm(biases[i].to(weight.dtype), mixed[i].to(weight.dtype), weight.t(), out=out[i])
    return out


def _row_sums(linear: nn.Module) -> torch.Tensor:
    """[N] float32 sums over the input dimension of the weight the layer multiplies by, cached on the
    layer while its weight tensor stays the same."""
    weight = linear.weight
    key = (weight.data_ptr(), weight.dtype, weight.shape)
    cached = getattr(linear, "_row_sums", None)
    if cached is None or cached[0] != key:
        if isinstance(linear, FP8Linear):
            sums = linear.dequantized_weight().sum(dim=1)
        else:
            sums = weight.sum(dim=1, dtype=torch.float32)
        cached = (key, sums)
        linear._row_sums = cached
    return cached[1]


def _is_fp8(*linears: nn.Module) -> bool:
    return all(isinstance(m, FP8Linear) for m in linears)


def _linear_gelu(linear: nn.Module, h: torch.Tensor | Fp8Activation) -> torch.Tensor:
    """GELU(tanh)(linear(h)) for a bf16 layer on CUDA with the GELU in cuBLASLt's epilogue (the
    hidden [L, ffn_dim] tensor is written once, computed from the float32 accumulator); elsewhere
    the two steps."""
    if isinstance(linear, FP8Linear) or isinstance(h, Fp8Activation) or not h.is_cuda or linear.bias is None:
        return F.gelu(linear(h), approximate="tanh")
    rows = h.to(linear.weight.dtype).reshape(-1, h.shape[-1])
    out = torch._addmm_activation(linear.bias, rows, linear.weight.t(), use_gelu=True)
    return out.view(*h.shape[:-1], linear.out_features)


class DiTBlock(nn.Module):
    """One transformer block: modulated self-attention, unmodulated cross-attention, modulated FFN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        qk_norm: bool,
        cross_attn_norm: bool,
        eps: float,
        emo_dim: int,
        clip_tokens: int,
    ):
        super().__init__()
        self.norm1 = Fp32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = Fp32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = I2VCrossAttention(dim, num_heads, qk_norm, eps, emo_dim, clip_tokens)
        self.norm2 = Fp32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            CastLinear(dim, ffn_dim), nn.GELU(approximate="tanh"), CastLinear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lens: torch.Tensor | None,
        context: torch.Tensor,
        emo_proj: torch.Tensor | None,
        ip_scale: torch.Tensor | None,
        *,
        fast: bool = False,
    ) -> torch.Tensor:
        """x: [B, L, dim] float32 residual stream; e0: [B, 6, dim] float32 time modulation.
        Returns the updated stream [B, L, dim] float32.
        fast: the fused path (module docstring); x and e0 may then have batch 1 while context,
        emo_proj and ip_scale have B (samples sharing the stream), and the result has B rows once
        they differ."""
        # float32 modulation (reference: autocast(float32) region, bf16 parameter + float32 e0).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation.float() + e0).chunk(
            6, dim=1
        )
        if fast:
            return self._forward_fast(x, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp),
                                      rope, k_lens, context, emo_proj, ip_scale)  # fmt: skip
        y = self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope, k_lens)
        x = x + y.float() * gate_msa
        # Cross-attention: no modulation and no gate (reference block order).
        x = x + self.cross_attn(self.norm3(x), context, emo_proj, ip_scale).float()
        y = self.ffn(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x + y.float() * gate_mlp

    def _forward_fast(
        self,
        x: torch.Tensor,
        modulation: tuple[torch.Tensor, ...],
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lens: torch.Tensor | None,
        context: torch.Tensor,
        emo_proj: torch.Tensor | None,
        ip_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        attn, cross, (first, _, second) = self.self_attn, self.cross_attn, self.ffn
        dtype = compute_dtype(attn.o)
        if k_lens is not None:
            k_lens = k_lens[: x.shape[0]]  # the same count for every sample (WanDiT)
        h = layernorm_modulate(
            x, shift_msa, scale_msa, eps=self.norm1.eps, out_dtype=dtype, fp8=_is_fp8(attn.q, attn.k, attn.v)
        )
        y = attn(h, rope, k_lens, fast=True)
        if isinstance(self.norm3, nn.LayerNorm):
            x, h = residual_layernorm_modulate(
                x, y, gate_msa, weight=self.norm3.weight, bias=self.norm3.bias, eps=self.norm3.eps,
                out_dtype=dtype, fp8=_is_fp8(cross.q),
            )  # fmt: skip
        else:
            x = gated_residual(x, y, gate_msa)
            h = x
        y = cross(h, context, emo_proj, ip_scale, fast=True)
        # Samples that shared the stream split here when the cross-attention differs between them.
        own = x.shape[0] == y.shape[0]
        x, h = residual_layernorm_modulate(
            _to_batch(x, y.shape[0]), y, None, shift_mlp, scale_mlp, eps=self.norm2.eps, out_dtype=dtype,
            fp8=_is_fp8(first), inplace=own,
        )  # fmt: skip
        if isinstance(second, FP8Linear):
            y = second(quantize_fp8(first(h), "gelu_tanh"))
        else:
            y = second(_linear_gelu(first, h))
        return gated_residual(x, y, gate_mlp, inplace=True)


class Head(nn.Module):
    """Output head: LayerNorm, modulation by (head.modulation + e), linear to patch pixels, float32."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = Fp32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = Fp32Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
        """x: [B, L, dim] float32; e: [B, dim] float32 (the time embedding, not e0; fast: [1, dim]
        when shared). Returns [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        if fast:
            return self.head(layernorm_modulate(x, shift, scale, eps=self.norm.eps, out_dtype=torch.float32))
        return self.head(self.norm(x) * (1 + scale) + shift)


class ImageProjection(nn.Module):
    """Reference MLPProj for CLIP features: LayerNorm, Linear, GELU (exact erf), Linear, LayerNorm,
    both norms with torch's default eps 1e-5. Keys `img_emb.proj.{0,1,3,4}`."""

    def __init__(self, clip_dim: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Sequential(
            Fp32LayerNorm(clip_dim, eps),
            CastLinear(clip_dim, clip_dim),
            nn.GELU(),
            CastLinear(clip_dim, dim),
            Fp32LayerNorm(dim, eps),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        """clip_fea: [B, clip_tokens, clip_dim] -> [B, clip_tokens, dim] float32."""
        return self.proj(clip_fea)

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.models.attention import attention
from flashportrait.models.rope import apply_rope

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

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lens: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [B, L, dim] (any float dtype); rope: (cos, sin) [L, 1, head_dim/2]; k_lens: [B] real
        token counts (keys past them are masked, queries are all computed) or None.
        Returns [B, L, dim] in the weight dtype."""
        cos, sin = rope
        q = apply_rope(_heads(self.norm_q(self.q(x)), self.num_heads), cos, sin)
        k = apply_rope(_heads(self.norm_k(self.k(x)), self.num_heads), cos, sin)
        v = _heads(self.v(x), self.num_heads)
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
        x: torch.Tensor,
        context: torch.Tensor,
        emo_proj: torch.Tensor | None,
        ip_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [B, L, dim]; context: [B, clip_tokens + text_len, dim] (image tokens first);
        emo_proj: [B, F, K, emo_dim] expression tokens per latent frame, or None;
        ip_scale: [B] float32 weight of the expression branch, or None (branch skipped).
        Returns [B, L, dim] in the weight dtype."""
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
    ) -> torch.Tensor:
        """x: [B, L, dim] float32 residual stream; e0: [B, 6, dim] float32 time modulation.
        Returns the updated stream [B, L, dim] float32."""
        # float32 modulation (reference: autocast(float32) region, bf16 parameter + float32 e0).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation.float() + e0).chunk(
            6, dim=1
        )
        y = self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope, k_lens)
        x = x + y.float() * gate_msa
        # Cross-attention: no modulation and no gate (reference block order).
        x = x + self.cross_attn(self.norm3(x), context, emo_proj, ip_scale).float()
        y = self.ffn(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x + y.float() * gate_mlp


class Head(nn.Module):
    """Output head: LayerNorm, modulation by (head.modulation + e), linear to patch pixels, float32."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = Fp32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = Fp32Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim] float32; e: [B, dim] float32 (the time embedding, not e0).
        Returns [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
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

"""FlashPortrait's portrait encoder: per-frame expression features to 24 expression tokens per frame.

Reference: `wan.models.portrait_encoder.PortraitEncoder.get_adapter_proj` (REFERENCE.md 1.1, 2.6).
A video frame's feature is `[headpose 6, eye 6, emotion 30, mouth 512]` (554 values, from the
PD-FGC motion encoder). Three sub-modules turn it into tokens of width 2048:

* `proj_model` (MultiProjModel): one bias-free Linear per part, each followed by the SAME LayerNorm,
  giving 4 tokens in the order headpose, eye, emotion, mouth;
* `mouth_proj_model`: a Perceiver Resampler with 16 learned queries over the 512-d mouth feature;
* `emo_proj_model`: a Perceiver Resampler with 4 learned queries over the 30-d emotion feature.

Per frame the tokens are `[4 projection tokens, 16 mouth tokens, 4 emotion tokens]`, flattened over
frames to `[B, 24 * F, 2048]`. The release keeps this encoder in float32.

`portrait_encoder.pt` is a flat dict whose keys carry the sub-module prefixes `proj_model.`,
`mouth_proj_model.` and `emo_proj_model.`; the reference loads each sub-module strictly and ignores
any other key. Our parameter names are exactly those prefixed keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flashportrait.models.attention import attention
from flashportrait.weights import LoadReport, TensorSource, load_into, module_tensor_shapes, open_checkpoint

SUBMODULE_PREFIXES = ("proj_model.", "mouth_proj_model.", "emo_proj_model.")


@dataclass(frozen=True)
class ResamplerConfig:
    """A Perceiver Resampler (IP-Adapter style). Defaults: the release's mouth resampler."""

    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16
    embedding_dim: int = 512
    output_dim: int = 2048
    ff_mult: int = 4


@dataclass(frozen=True)
class PortraitEncoderConfig:
    """The release: `PortraitEncoder(adapter_in_dim=768, adapter_proj_dim=2048)` (adapter_in_dim unused).

    feature_split: sizes of the parts of a frame's feature, in order headpose, eye, emotion, mouth.
    cross_attention_dim: the token width (the DiT's `emo_k_proj` input).
    """

    # `tuple[int, ...]` (checked to hold 4 sizes) because `from_mapping` mis-converts fixed-arity tuples.
    feature_split: tuple[int, ...] = (6, 6, 30, 512)
    cross_attention_dim: int = 2048
    mouth_resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    emo_resampler: ResamplerConfig = field(
        default_factory=lambda: ResamplerConfig(num_queries=4, embedding_dim=30)
    )

    def __post_init__(self) -> None:
        if len(self.feature_split) != 4:
            raise ValueError(
                f"feature_split needs 4 sizes (headpose, eye, emotion, mouth), got {self.feature_split}"
            )
        _, _, emotion, mouth = self.feature_split
        parts = (("mouth", self.mouth_resampler, mouth), ("emo", self.emo_resampler, emotion))
        for name, cfg, width in parts:
            if cfg.embedding_dim != width:
                raise ValueError(
                    f"{name}_resampler.embedding_dim {cfg.embedding_dim} != feature size {width}"
                )
            if cfg.output_dim != self.cross_attention_dim:
                raise ValueError(
                    f"{name}_resampler.output_dim {cfg.output_dim} != cross_attention_dim "
                    f"{self.cross_attention_dim}"
                )

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_split)

    @property
    def tokens_per_frame(self) -> int:
        return len(self.feature_split) + self.mouth_resampler.num_queries + self.emo_resampler.num_queries


class MultiProjModel(nn.Module):
    """4 bias-free projections sharing one LayerNorm; parameter names as the release."""

    def __init__(self, feature_split: tuple[int, ...], dim: int):
        super().__init__()
        headpose, eye, emotion, mouth = feature_split
        self.feature_split = feature_split
        # Registration order as the reference (state-dict order); the forward order differs.
        self.eye_proj = nn.Linear(eye, dim, bias=False)
        self.emo_proj = nn.Linear(emotion, dim, bias=False)
        self.mouth_proj = nn.Linear(mouth, dim, bias=False)
        self.headpose_proj = nn.Linear(headpose, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, F, 554] -> [B, F, 4, dim], tokens in order headpose, eye, emotion, mouth."""
        headpose, eye, emotion, mouth = torch.split(features, list(self.feature_split), dim=-1)
        projections = (self.headpose_proj, self.eye_proj, self.emo_proj, self.mouth_proj)
        parts = (headpose, eye, emotion, mouth)
        return torch.stack(
            [self.norm(proj(part)) for proj, part in zip(projections, parts, strict=True)], dim=2
        )


class PerceiverAttention(nn.Module):
    """Latent queries attend to [inputs, latents] (keys/values from both); no biases."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: [N, Lx, dim], latents: [N, Lq, dim] -> [N, Lq, dim]."""
        n, lq, _ = latents.shape
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents).view(n, lq, self.heads, self.dim_head)
        kv = self.to_kv(torch.cat([x, latents], dim=1))
        k, v = kv.view(n, kv.shape[1], 2, self.heads, self.dim_head).unbind(2)
        # The reference scales q and k by dim_head^-1/4 each: the usual dim_head^-1/2 overall.
        out = attention(q, k, v)
        return self.to_out(out.reshape(n, lq, self.heads * self.dim_head))


class Resampler(nn.Module):
    """Perceiver Resampler: learned queries refined by `depth` (attention, FFN) layers, then projected.

    Parameter names follow the release: `layers.<i>.0` is the attention, `layers.<i>.1.{0,1,3}` the
    FFN's LayerNorm and its two bias-free Linears (index 2 is the GELU).
    """

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim**0.5)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        inner = cfg.dim * cfg.ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads),
                    nn.Sequential(
                        nn.LayerNorm(cfg.dim),
                        nn.Linear(cfg.dim, inner, bias=False),
                        nn.GELU(),
                        nn.Linear(inner, cfg.dim, bias=False),
                    ),
                ]
            )
            for _ in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, Lx, embedding_dim] -> [N, num_queries, output_dim]."""
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ffn in self.layers:
            latents = attn(x, latents) + latents
            latents = ffn(latents) + latents
        return self.norm_out(self.proj_out(latents))


class PortraitEncoder(nn.Module):
    """Expression features to expression tokens (see the module docstring)."""

    def __init__(self, cfg: PortraitEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PortraitEncoderConfig()
        self.proj_model = MultiProjModel(cfg.feature_split, cfg.cross_attention_dim)
        self.mouth_proj_model = Resampler(cfg.mouth_resampler)
        self.emo_proj_model = Resampler(cfg.emo_resampler)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, F, 554] float32 -> tokens [B, F * 24, 2048] (per frame: 4 proj, 16 mouth, 4 emo)."""
        b, f, c = features.shape
        dim = self.cfg.cross_attention_dim
        if c != self.cfg.feature_dim:
            raise ValueError(
                f"expression features have {c} values per frame, expected {self.cfg.feature_dim}"
            )
        _, _, emotion, mouth = torch.split(features, list(self.cfg.feature_split), dim=-1)
        # Each Resampler sees one input token per frame.
        mouth_tokens = self.mouth_proj_model(mouth.reshape(b * f, 1, -1)).view(b, f, -1, dim)
        emo_tokens = self.emo_proj_model(emotion.reshape(b * f, 1, -1)).view(b, f, -1, dim)
        tokens = torch.cat([self.proj_model(features), mouth_tokens, emo_tokens], dim=2)
        return tokens.reshape(b, f * self.cfg.tokens_per_frame, dim)


def load_portrait_encoder(
    checkpoint: str | Path | TensorSource,
    cfg: PortraitEncoderConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PortraitEncoder:
    """Build the encoder on the meta device and load `portrait_encoder.pt` (or any source) strictly.

    Keys outside the three sub-module prefixes are ignored, as the reference does; a missing,
    unexpected or mis-shaped key under them raises `CheckpointMismatchError` naming the keys.
    """
    source = open_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    with torch.device("meta"):
        model = PortraitEncoder(cfg)
    load_portrait_encoder_weights(model, source, device=device, dtype=dtype)
    return model.eval()


def load_portrait_encoder_weights(
    model: PortraitEncoder,
    source: TensorSource,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> LoadReport:
    """Load a flat, prefixed state dict into `model` (strict under the sub-module prefixes)."""

    def other(key: str) -> bool:
        return not key.startswith(SUBMODULE_PREFIXES)

    return load_into(model, source, strict=True, dtype=dtype, device=device, ignore=other)


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the full-size encoder (the `portrait_encoder.pt` key space), built on meta."""
    dim = int(manifest.get("ctor", {}).get("adapter_proj_dim", 2048))
    # The reference hard-codes its Resamplers (1280 wide, depth 4, 20 heads) with output width
    # `adapter_proj_dim`; our defaults are those sizes.
    cfg = PortraitEncoderConfig(
        cross_attention_dim=dim,
        mouth_resampler=ResamplerConfig(output_dim=dim),
        emo_resampler=ResamplerConfig(num_queries=4, embedding_dim=30, output_dim=dim),
    )
    with torch.device("meta"):
        model = PortraitEncoder(cfg)
    return module_tensor_shapes(model)


__all__ = [
    "MultiProjModel",
    "PerceiverAttention",
    "PortraitEncoder",
    "PortraitEncoderConfig",
    "Resampler",
    "ResamplerConfig",
    "load_portrait_encoder",
    "load_portrait_encoder_weights",
    "manifest_shapes",
]

"""The CLIP ViT-H/14 image tower as Wan2.1's I2V path uses it (open-clip XLM-RoBERTa ViT-H/14).

    CLIPVisionTower(config).encode(images [B, 3, H, W] float in [-1, 1]) -> tokens [B, 257, 1280]

Reference (`wan.models.wan_image_encoder.CLIPModel`, golden case `clip_visual_tiny`, REFERENCE.md 2.4):
- each image, given in [-1, 1] at any size, is resized bicubically (align_corners False) to
  `image_size` square, ignoring the aspect ratio, ON the [-1, 1] values; then mapped to [0, 1] and
  normalised with the OpenAI CLIP mean/std;
- patch embedding (Conv2d, no bias), class token prepended, position embedding added, pre-norm;
- all transformer blocks but the last (`use_31_block=True`), pre-norm blocks with exact GELU;
- no post-norm and no head: the hidden states themselves are the image tokens.

LayerNorms run in float32 and cast back, as the reference's LayerNorm (and its autocast) does.

The release file `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` holds `visual.*`,
`textual.*` (an XLM-RoBERTa text tower) and `log_scale`; the reference loader prepends `model.` and
loads all of it. We load the blocks we run and ACCEPT the rest without reading it: the text tower,
`log_scale`, the visual head, the post-norm and the last block. Their names and shapes are checked
against the explicit spec below (`unused_shapes`), so a different CLIP is still refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.config import ConfigError
from flashportrait.models.attention import attention
from flashportrait.weights import (
    CheckpointMismatchError,
    LoadReport,
    TensorSource,
    compare_keys,
    load_into,
    module_tensor_shapes,
    open_checkpoint,
    strip_prefix,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the reference's CLIPModel.from_pretrained prepends this to every key of the release file
REFERENCE_PREFIX = "model."


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int
    patch_size: int
    hidden_dim: int
    mlp_ratio: int
    num_heads: int
    num_layers: int  # blocks in the checkpoint
    layers_applied: int  # blocks run: the I2V path skips the last one
    embed_dim: int  # output width of the (unused) visual head; checked, never loaded
    norm_eps: float = 1e-5
    pixel_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of {self.patch_size}"
            )
        if self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"CLIPVisionConfig: hidden_dim {self.hidden_dim} not divisible by {self.num_heads}"
            )
        if not 0 <= self.layers_applied <= self.num_layers:
            raise ConfigError(
                f"CLIPVisionConfig: layers_applied {self.layers_applied} not in [0, {self.num_layers}]"
            )

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class XLMRobertaTowerSpec:
    """Sizes of the checkpoint's text tower. We never build it; it only names the keys we accept."""

    vocab_size: int
    max_text_len: int
    type_size: int
    dim: int
    num_layers: int
    out_dim: int  # the CLIP embedding width the text head projects to
    mlp_ratio: int = 4


VIT_H14 = CLIPVisionConfig(
    image_size=224,
    patch_size=14,
    hidden_dim=1280,
    mlp_ratio=4,
    num_heads=16,
    num_layers=32,
    layers_applied=31,
    embed_dim=1024,
)
XLM_ROBERTA_LARGE = XLMRobertaTowerSpec(
    vocab_size=250002, max_text_len=514, type_size=1, dim=1024, num_layers=24, out_dim=1024
)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32 (weights included), result in x's dtype, as the reference computes it."""
    w = norm.weight.float()
    b = norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).type_as(x)


class CLIPSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim] -> [B, L, dim]; no mask, scale 1/sqrt(head_dim)."""
        b, length, dim = x.shape
        q, k, v = self.to_qkv(x).view(b, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v).reshape(b, length, dim))


class CLIPBlock(nn.Module):
    """Pre-norm ViT block: x + proj(attn(LN1(x))); x + fc2(GELU(fc1(LN2(x))))."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        dim = config.hidden_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = CLIPSelfAttention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        # indices 0 and 2 are the checkpoint's keys (mlp.1 is the exact GELU)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * config.mlp_ratio), nn.GELU(), nn.Linear(dim * config.mlp_ratio, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_layer_norm(self.norm1, x))
        return x + self.mlp(_layer_norm(self.norm2, x))


class CLIPVisionTower(nn.Module):
    """The blocks of `visual.*` the I2V path runs; state-dict keys are the file's minus `visual.`."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_dim
        self.patch_embedding = nn.Conv2d(3, dim, config.patch_size, stride=config.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        self.pre_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.transformer = nn.ModuleList(CLIPBlock(config) for _ in range(config.layers_applied))

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, 3, H, W] or a list of [3, H_i, W_i], float in [-1, 1] -> [B, 3, S, S] float32 normalised."""
        size = (self.config.image_size, self.config.image_size)
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
            batch = [images.float()]
        else:
            batch = [image.float()[None] for image in images]
        # The reference resizes each image of its list separately, on the [-1, 1] values.
        x = torch.cat([F.interpolate(u, size=size, mode="bicubic", align_corners=False) for u in batch])
        x = x * 0.5 + 0.5
        mean = torch.tensor(self.config.pixel_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.pixel_std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> tokens after the pre-norm [B, 1 + (S/p)^2, dim]."""
        b = pixels.shape[0]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(b, -1, -1).to(x.dtype), x], dim=1)
        return _layer_norm(self.pre_norm, x + self.pos_embedding.to(x.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> hidden states after the applied blocks [B, L, dim]."""
        x = self.embed(pixels)
        for block in self.transformer:
            x = block(x)
        return x

    @torch.no_grad()
    def encode(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images in [-1, 1] ([B, 3, H, W] or a list of [3, H, W]) -> [B, 257, 1280] in weight dtype."""
        device = self.patch_embedding.weight.device
        if isinstance(images, torch.Tensor):
            images = images.to(device)
        else:
            images = [image.to(device) for image in images]
        return self(self.preprocess(images))


def build_clip_vision(config: CLIPVisionConfig, *, device: torch.device | str = "meta") -> CLIPVisionTower:
    with torch.device(device):
        return CLIPVisionTower(config)


def xlm_roberta_shapes(spec: XLMRobertaTowerSpec) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the text tower in the release file (`textual.` prefix not included)."""
    dim, ffn = spec.dim, spec.dim * spec.mlp_ratio
    mid = (spec.dim + spec.out_dim) // 2
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (spec.vocab_size, dim),
        "type_embedding.weight": (spec.type_size, dim),
        "pos_embedding.weight": (spec.max_text_len, dim),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.0.weight": (mid, dim),
        "head.2.weight": (spec.out_dim, mid),
    }
    for i in range(spec.num_layers):
        block = f"blocks.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{block}attn.{proj}.weight"] = (dim, dim)
            shapes[f"{block}attn.{proj}.bias"] = (dim,)
        for norm in ("norm1", "norm2"):
            shapes[f"{block}{norm}.weight"] = (dim,)
            shapes[f"{block}{norm}.bias"] = (dim,)
        shapes[f"{block}ffn.0.weight"] = (ffn, dim)
        shapes[f"{block}ffn.0.bias"] = (ffn,)
        shapes[f"{block}ffn.2.weight"] = (dim, ffn)
        shapes[f"{block}ffn.2.bias"] = (dim,)
    return shapes


def unused_shapes(config: CLIPVisionConfig, text: XLMRobertaTowerSpec) -> dict[str, tuple[int, ...]]:
    """Keys of the release file (its own layout, no `model.`) that we accept and never load."""
    dim = config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {
        "log_scale": (),
        "visual.head": (dim, config.embed_dim),
        "visual.post_norm.weight": (dim,),
        "visual.post_norm.bias": (dim,),
    }
    with torch.device("meta"):
        block = module_tensor_shapes(CLIPBlock(config))
    for i in range(config.layers_applied, config.num_layers):
        shapes.update({f"visual.transformer.{i}.{k}": s for k, s in block.items()})
    shapes.update({f"textual.{k}": s for k, s in xlm_roberta_shapes(text).items()})
    return shapes


def release_layout(source: TensorSource) -> TensorSource:
    """The file's own layout: `visual.*`, `textual.*`, `log_scale`.

    A state dict saved from the reference's CLIPModel has every key under `model.`; that prefix is
    removed. Anything else is left as is (and reported by the loader if it does not fit).
    """
    if len(source) and all(key.startswith(REFERENCE_PREFIX) for key in source):
        return strip_prefix(source, REFERENCE_PREFIX)
    return source


def load_clip_vision(
    checkpoint: str | Path | TensorSource,
    config: CLIPVisionConfig = VIT_H14,
    text: XLMRobertaTowerSpec = XLM_ROBERTA_LARGE,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[CLIPVisionTower, LoadReport]:
    """Load the image tower from `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`.

    Every key of the applied blocks and embeddings must be present with its shape. The accepted
    unused keys may be absent, but when present their shapes must match the spec; any other key is
    unexpected. A mismatch raises `CheckpointMismatchError` naming the keys. Unused tensors are never
    read (torch pickles are memory-mapped).
    """
    source = release_layout(
        checkpoint if isinstance(checkpoint, TensorSource) else open_checkpoint(checkpoint)
    )
    model = build_clip_vision(config)
    loaded = {f"visual.{k}": s for k, s in module_tensor_shapes(model).items()}
    accepted = unused_shapes(config, text)
    report = compare_keys({**loaded, **accepted}, source, target="CLIPVisionTower", allow_missing=accepted)
    if not report.ok:
        raise CheckpointMismatchError(report)
    visual_report = load_into(
        model,
        strip_prefix(source, "visual."),
        dtype=dtype,
        device=device,
        ignore=lambda key: f"visual.{key}" in accepted,
    )
    report.loaded = visual_report.loaded
    report.ignored = sorted(k for k in source if k in accepted)
    return model.eval(), report


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Our full-size tower's keys plus the accepted text tower etc., in the reference's `model.` space."""
    loaded = {f"visual.{k}": s for k, s in module_tensor_shapes(build_clip_vision(VIT_H14)).items()}
    shapes = {**loaded, **unused_shapes(VIT_H14, XLM_ROBERTA_LARGE)}
    return {REFERENCE_PREFIX + k: s for k, s in shapes.items()}

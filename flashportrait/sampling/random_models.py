"""Samplers with random weights, built directly on the target device: for tests and benchmarks.

Shapes and arithmetic are those of the real models at any size (the release's full size included), so
timings and memory are the real ones; only the values are random. Nothing is read from disk and a
full-size model never exists on the host: every module is built on the meta device, allocated on
`device` and filled there, each parameter from its own generator seeded by (seed, parameter index).

Initial values keep activations finite through the untrained networks: matrices and convolution
kernels N(0, 1/fan_in), biases N(0, 0.02^2), norm scales and the Wan VAE's `gamma`s 1 (+ N(0, 0.1^2)
for vector scales), free parameters (embeddings, resampler latents) N(0, 1/last dim). The DiT uses
`dit_loading.random_dit`, the golden cases' scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from flashportrait.components.config import DeploymentConfig
from flashportrait.models.clip import CLIPVisionConfig, CLIPVisionTower
from flashportrait.models.dit_loading import random_dit
from flashportrait.models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig, ResamplerConfig
from flashportrait.models.tiny_vae import TinyVaeConfig, TinyVaeDecoder
from flashportrait.models.transformer import DiTConfig
from flashportrait.models.wan_vae import WanVAE, WanVaeConfig
from flashportrait.sampling.sampler import Sampler


@dataclass(frozen=True)
class SamplerSizes:
    """The architectures a sampler needs (a `components.DeploymentConfig` has the same fields)."""

    dit: DiTConfig
    wan_vae: WanVaeConfig
    tiny_vae: TinyVaeConfig
    clip: CLIPVisionConfig
    portrait_encoder: PortraitEncoderConfig

    @classmethod
    def release(cls) -> SamplerSizes:
        """FlashPortrait on Wan2.1-I2V-14B: the full-size models (`DeploymentConfig.release()`'s)."""
        return cls.of(DeploymentConfig.release())

    @classmethod
    def of(cls, config: Any) -> SamplerSizes:
        """The sampler's part of a deployment config (any object with these fields)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @classmethod
    def tiny(cls, width: int = 32) -> SamplerSizes:
        """Two-layer models of `width` channels that keep every interface of the release (16 latent
        channels, 36 DiT input channels, text_len 512, 257 CLIP tokens, 24 expression tokens per
        frame, 554 feature values)."""
        resampler = ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, ff_mult=2, output_dim=width)
        return cls(
            dit=DiTConfig(
                dim=width,
                ffn_dim=2 * width,
                num_heads=2,
                num_layers=2,
                in_dim=36,
                out_dim=16,
                freq_dim=32,
                text_len=512,
                text_dim=16,
                clip_dim=width,
                emo_dim=width,
            ),
            wan_vae=WanVaeConfig(base_channels=4),
            tiny_vae=TinyVaeConfig(decoder_widths=(16, 8, 8, 8), encoder_width=8),
            clip=CLIPVisionConfig(
                image_size=32,
                patch_size=2,
                hidden_dim=width,
                mlp_ratio=2,
                num_heads=2,
                num_layers=2,
                layers_applied=1,
                embed_dim=8,
            ),
            portrait_encoder=PortraitEncoderConfig(
                cross_attention_dim=width,
                mouth_resampler=resampler,
                emo_resampler=replace(resampler, num_queries=4, embedding_dim=30),
            ),
        )


@torch.no_grad()
def randomize(module: nn.Module, *, seed: int, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Allocate a meta-device `module` on `device` in `dtype` and fill it (see the module docstring)."""
    module = module.to(dtype).to_empty(device=device)
    for index, (name, param) in enumerate(module.named_parameters()):
        generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + index)
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = noise * 0.02
        elif leaf == "gamma":
            value = torch.ones_like(noise)
        elif param.dim() == 1:
            value = 1.0 + 0.1 * noise
        elif leaf == "weight":
            value = noise / math.sqrt(math.prod(param.shape[1:]))
        else:
            value = noise / math.sqrt(param.shape[-1])
        param.copy_(value.to(param.dtype))
    return module.eval()


def random_sampler(
    sizes: SamplerSizes | Any,
    *,
    mode: str = "fast",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    decode_chunk_latents: int = 4,
) -> Sampler:
    """A sampler of `sizes` with random weights: DiT, Wan VAE, CLIP and decoder in `dtype` (the
    serving dtype), the portrait encoder in float32 (as the release keeps it). Fast mode decodes with
    the tiny VAE, quality mode with the Wan VAE."""
    dit = random_dit(sizes.dit, seed=seed, dtype=dtype, device=device)
    with torch.device("meta"):
        vae = WanVAE(sizes.wan_vae)
        clip = CLIPVisionTower(sizes.clip)
        encoder = PortraitEncoder(sizes.portrait_encoder)
        tiny = TinyVaeDecoder(sizes.tiny_vae) if mode == "fast" else None
    vae = randomize(vae, seed=seed + 1, device=device, dtype=dtype)
    clip = randomize(clip, seed=seed + 2, device=device, dtype=dtype)
    encoder = randomize(encoder, seed=seed + 3, device=device, dtype=torch.float32)
    decoder = vae if tiny is None else randomize(tiny, seed=seed + 4, device=device, dtype=dtype)
    return Sampler(
        dit, vae, clip, encoder, decoder, mode=mode, device=device, decode_chunk_latents=decode_chunk_latents
    )

"""Classifier-free guidance exactly as the reference long pipeline combines it (REFERENCE.md 2.7 step 3).

Every pass runs the DiT on the same window latents, `y`, CLIP features and expression chunks; passes
differ only in the text context (prompt or negative prompt) and in `ip_scale` (the weight of the
expression cross-attention; 0 removes the expression condition). The reference runs the passes one by
one; we run them as one batch (pass-major along the batch axis) and combine the split results with the
reference's formula, term by term in its order so float32 results round the same way (emo =
emo_cfg_scale, text = text_cfg_scale):

| emo  | text | passes                | prediction                                              |
|------|------|-----------------------|---------------------------------------------------------|
| > 1  | == 1 | posi, no_emo          | no_emo + emo*(posi - no_emo)                            |
| > 1  | != 1 | posi, no_emo, no_cond | no_cond + text*(no_emo - no_cond) + emo*(posi - no_emo) |
| <= 1 | != 1 | posi, no_text         | no_text + text*(posi - no_text)                         |
| <= 1 | == 1 | posi                  | posi                                                    |

with posi = (prompt, ip_scale), no_emo = (prompt, 0), no_cond = (negative, 0), no_text = (negative,
ip_scale). The fast default (emo 4, text 1) is two passes. `guidance_scale` of the reference script
only decides whether the negative prompt is encoded; it plays no part here (quirk 14).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance scales of one request (the reference script's defaults)."""

    emo_cfg_scale: float = 4.0
    text_cfg_scale: float = 1.0
    ip_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("emo_cfg_scale", "text_cfg_scale", "ip_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")

    @property
    def emotion_guidance(self) -> bool:
        # The reference tests `emo_cfg_scale and emo_cfg_scale > 1.0`.
        return self.emo_cfg_scale > 1.0

    @property
    def text_guidance(self) -> bool:
        return self.text_cfg_scale != 1.0


@dataclass(frozen=True)
class GuidancePass:
    """One DiT pass: which text context it reads and the expression-attention weight."""

    name: str  # "posi", "no_emo", "no_cond" or "no_text" (the reference's variable names)
    negative_prompt: bool
    ip_scale: float


def guidance_passes(config: GuidanceConfig) -> tuple[GuidancePass, ...]:
    """The passes one batched DiT call must run, in the order `combine_guidance` expects them."""
    posi = GuidancePass("posi", negative_prompt=False, ip_scale=config.ip_scale)
    if config.emotion_guidance:
        no_emo = GuidancePass("no_emo", negative_prompt=False, ip_scale=0.0)
        if config.text_guidance:
            return posi, no_emo, GuidancePass("no_cond", negative_prompt=True, ip_scale=0.0)
        return posi, no_emo
    if config.text_guidance:
        return posi, GuidancePass("no_text", negative_prompt=True, ip_scale=config.ip_scale)
    return (posi,)


def combine_guidance(config: GuidanceConfig, predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The guided prediction from the per-pass predictions (same order as `guidance_passes`).

    predictions: one [B, 16, C, h, w] tensor per pass. Returns [B, 16, C, h, w] in their dtype.
    """
    expected = len(guidance_passes(config))
    if len(predictions) != expected:
        raise ValueError(f"{expected} pass prediction(s) expected for {config}, got {len(predictions)}")
    emo, text = config.emo_cfg_scale, config.text_cfg_scale
    if config.emotion_guidance:
        if config.text_guidance:
            posi, no_emo, no_cond = predictions
            return no_cond + text * (no_emo - no_cond) + emo * (posi - no_emo)
        posi, no_emo = predictions
        return no_emo + emo * (posi - no_emo)
    if config.text_guidance:
        posi, no_text = predictions
        return no_text + text * (posi - no_text)
    (posi,) = predictions
    return posi


def combine_batched(config: GuidanceConfig, batched: torch.Tensor) -> torch.Tensor:
    """`combine_guidance` for one batched DiT output [P*B, 16, C, h, w] (pass-major) -> [B, 16, C, h, w]."""
    num_passes = len(guidance_passes(config))
    total = batched.shape[0]
    if total % num_passes:
        raise ValueError(f"batch of {total} is not {num_passes} passes of equal size")
    return combine_guidance(config, batched.chunk(num_passes, dim=0))

"""What conditions every window of a request: the resized reference image, its CLIP tokens, the I2V
first-frame condition `y`, and the text contexts of the guidance passes.

Reference (REFERENCE.md 1.2, 2.3, 2.4, quirk 6; golden `pipeline_tiny` debug tensors):

- the reference image is scaled so its longer side is `max_size` (sides truncated with int(), small
  images upscaled), each side rounded UP to a multiple of 16, and resized with PIL LANCZOS; the same
  resized image is the I2V first frame and the CLIP input;
- CLIP sees `to_tensor(image) * 2 - 1` ([-1, 1]); the tower resizes and normalises it itself;
- `y = cat(mask_latents, vae_latents)` [1, 4 + 16, C, h, w] for a window of C latent frames: the
  conditioning clip is the image followed by `4(C-1)` mid-grey (zero) frames, VAE-encoded (normalised
  posterior mode); the mask latents are 1 on latent frame 0 and 0 elsewhere. The reference builds `y`
  ONCE per request for a clip of `sub_num_frames = 4(C-1)+1` frames and gives the same `y` to every
  window, so every window is generated as if its first latent frame were the reference image;
- text: each prompt's embeddings are cut to their real token count; the DiT zero-pads them to
  `text_len` rows before its text embedding and attends every row (quirk 9). For one batched DiT call
  the passes' contexts are stacked, zero-padded to the longest, with their lengths (`WanDiT.forward`
  zeroes rows past a length, which is the reference's padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flashportrait.models.clip import CLIPVisionTower
from flashportrait.models.wan_vae import WanVAE
from flashportrait.sampling.guidance import GuidancePass
from flashportrait.sampling.windows import FRAMES_PER_LATENT, scaled_image_size


def resize_reference(image: np.ndarray, max_size: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [H', W', 3] uint8 RGB resized as fast_infer.py does (see module docstring).

    PIL returns an unchanged copy when the size already fits, as in the reference.
    """
    check_image(image)
    height, width, _ = image.shape
    new_width, new_height = scaled_image_size(width, height, max_size)
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.LANCZOS)
    return np.array(resized, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = list(getattr(image, "shape", []))
        kind = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"the reference image must be [H, W, 3] uint8 RGB, got {kind} {shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"the reference image is empty ({image.shape[1]}x{image.shape[0]})")


def image_to_signed(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [-1, 1]: `x / 255` then `2x - 1` (to_tensor and
    VaeImageProcessor.normalize; CLIP's `(x - 0.5) / 0.5` is the same float32 value)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float() / 255.0
    return 2.0 * x - 1.0


def mask_latents(
    context_size: int, height: int, width: int, channels: int = FRAMES_PER_LATENT
) -> torch.Tensor:
    """The I2V mask channels [1, channels, C, h, w] float32: 1 on latent frame 0, 0 elsewhere.

    The reference binarises a mask that is 0 on video frame 0 and 1 after it, repeats frame 0 four
    times, groups frames by four into channels, takes `1 - mask` and trilinearly resizes latent frame 0
    and the rest separately; the fields are constant, so the resize gives exactly these values.
    """
    mask = torch.zeros(1, channels, context_size, height, width, dtype=torch.float32)
    mask[:, :, 0] = 1.0
    return mask


@torch.no_grad()
def first_frame_condition(vae: WanVAE, image: np.ndarray, context_size: int) -> torch.Tensor:
    """y [1, temporal_factor + 16, C, h, w] float32 on the VAE's device for windows of C latent frames.

    image: the RESIZED reference [H, W, 3] uint8 (sides multiples of the VAE's spatial factor).
    """
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    r = vae.temporal_factor
    frames = r * (context_size - 1) + 1  # the reference's sub_num_frames
    first = image_to_signed(image, vae.device)
    channels, height, width = first.shape
    # `video * (mask < 0.5)` on the [-1, 1] clip: the image in frame 0, zeros (mid-grey) after it.
    clip = first.new_zeros(1, channels, frames, height, width)
    clip[:, :, 0] = first
    latents = vae.encode(clip)
    _, _, latent_frames, h, w = latents.shape
    if latent_frames != context_size:
        raise AssertionError(
            f"{frames} frames encoded to {latent_frames} latent frames, expected {context_size}"
        )
    mask = mask_latents(context_size, h, w, r).to(latents.device)
    return torch.cat([mask, latents], dim=1)


@torch.no_grad()
def clip_tokens(clip: CLIPVisionTower, image: np.ndarray) -> torch.Tensor:
    """CLIP image tokens [1, 257, clip_dim] (the tower's dtype) of the resized reference image."""
    device = clip.patch_embedding.weight.device
    return clip.encode([image_to_signed(image, device)])


@dataclass(frozen=True)
class Conditioning:
    """Per-request conditioning shared by every window.

    image: the resized reference [H, W, 3] uint8 RGB; y: [1, 4 + 16, C, h, w] float32;
    clip: [1, 257, clip_dim] in the CLIP tower's dtype.
    """

    image: np.ndarray
    y: torch.Tensor
    clip: torch.Tensor

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latent grid."""
        _, _, _, h, w = self.y.shape
        return h, w


def build_conditioning(
    vae: WanVAE, clip: CLIPVisionTower, image: np.ndarray, *, max_size: int, context_size: int
) -> Conditioning:
    """Resize the reference image and build `y` and the CLIP tokens from it (once per request)."""
    resized = resize_reference(image, max_size)
    return Conditioning(
        resized, first_frame_condition(vae, resized, context_size), clip_tokens(clip, resized)
    )


def check_text(embeds: torch.Tensor, text_dim: int, text_len: int, name: str) -> torch.Tensor:
    """Validate one prompt's embeddings [L, text_dim] (1 <= L <= text_len); returns them float32."""
    if not isinstance(embeds, torch.Tensor):
        embeds = torch.as_tensor(np.asarray(embeds))
    if embeds.dim() != 2 or embeds.shape[1] != text_dim:
        raise ValueError(f"{name} must be [L, {text_dim}] text embeddings, got {list(embeds.shape)}")
    length = embeds.shape[0]
    if not 1 <= length <= text_len:
        raise ValueError(f"{name} has {length} rows; the DiT takes 1 to {text_len}")
    if not embeds.is_floating_point() or not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} must be finite floating-point values")
    return embeds.float()


def pass_contexts(
    passes: Sequence[GuidancePass], prompt: torch.Tensor, negative: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text context of each pass, stacked: ([P, L_max, text_dim] float32 zero-padded, lengths [P] int64).

    prompt / negative: [L, text_dim] embeddings cut to their token count (the negative one is needed
    only by passes that read it).
    """
    rows = []
    for guidance_pass in passes:
        if guidance_pass.negative_prompt and negative is None:
            raise ValueError(f"guidance pass {guidance_pass.name!r} needs the negative prompt's embeddings")
        rows.append(negative if guidance_pass.negative_prompt else prompt)
    longest = max(row.shape[0] for row in rows)
    context = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=torch.float32)
    for i, row in enumerate(rows):
        context[i, : row.shape[0]] = row
    lengths = torch.tensor([row.shape[0] for row in rows], dtype=torch.int64)
    return context, lengths

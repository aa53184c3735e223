"""`load_components`: every model of a deployment, loaded from a weights folder in the release layout.

Set-up follows the reference (REFERENCE.md 1.1, `golden/manifests/README.md`):
- DiT: the Wan shards with FlashPortrait's `transformer.pt` on top (strict: every parameter from
  exactly these files), in the serving dtype. Fast mode merges the step-distillation LoRA
  (`W += strength * up @ down`, plus the `diff` terms) in the DiT's own dtype, so with the bf16 DiT the
  merge rounds in bf16 as the reference's does;
- Wan VAE, umT5 and CLIP in the serving dtype; the portrait encoder and the motion encoder in float32
  (the reference never casts them);
- fast mode: the TAEHV tiny VAE replaces only the decoder (the Wan VAE still encodes the reference
  image), in the serving dtype as the reference's `WanVAE_tiny` casts it;
- the face models are ONNX files run by ONNX Runtime: their paths are returned, not loaded.

Deviation from the reference, on purpose: a missing fast-mode file (the LoRA or the tiny VAE) is an
error naming it, where `fast_infer.py` silently falls back to the 30-step sampler or the full VAE
(REFERENCE.md quirk 17). Every file the mode and parts need is checked before anything is read.

The architecture is `config` if given, else `<root>/flashportrait_config.json`, else the release
preset; when the DiT is loaded the Wan `config.json` must agree with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flashportrait.components.config import DeploymentConfig, check_wan_config
from flashportrait.components.layout import (
    ALL_PARTS,
    Mode,
    WeightPaths,
    check_files,
    check_mode,
    check_parts,
)
from flashportrait.models.clip import CLIPVisionTower, load_clip_vision
from flashportrait.models.decoding import StreamingDecoder
from flashportrait.models.dit_loading import load_dit
from flashportrait.models.lora import LoraMergeReport, merge_lora
from flashportrait.models.motion_encoder import MotionEncoder, load_motion_encoder
from flashportrait.models.portrait_encoder import PortraitEncoder, load_portrait_encoder
from flashportrait.models.t5 import TextEncoder, load_umt5_encoder
from flashportrait.models.tiny_vae import TinyVaeDecoder, load_tiny_vae
from flashportrait.models.tokenizer import UMT5Tokenizer
from flashportrait.models.transformer import WanDiT
from flashportrait.models.wan_vae import WanVAE, load_wan_vae

if TYPE_CHECKING:
    from flashportrait.components.prepared import PreparedPaths


@dataclass(frozen=True)
class FaceModelPaths:
    """The release's ONNX face models (run by `flashportrait.face`)."""

    detector: Path  # face_det.onnx
    landmarks: Path  # face_landmark.onnx


@dataclass
class Components:
    """The loaded models; a part that was not requested (or not used by the mode) is None."""

    config: DeploymentConfig
    mode: str
    paths: WeightPaths | PreparedPaths
    dit: WanDiT | None = None
    lora: LoraMergeReport | None = None  # what the fast-mode merge did
    vae: WanVAE | None = None
    tiny_vae: TinyVaeDecoder | None = None
    text_encoder: TextEncoder | None = None
    clip: CLIPVisionTower | None = None
    portrait_encoder: PortraitEncoder | None = None
    motion_encoder: MotionEncoder | None = None
    face: FaceModelPaths | None = None

    @property
    def decoder(self) -> StreamingDecoder | None:
        """The latent decoder of the mode: the tiny VAE in fast mode, the Wan VAE in quality mode."""
        return self.tiny_vae if self.mode == "fast" else self.vae


def resolve_config(paths: WeightPaths, config: DeploymentConfig | None = None) -> DeploymentConfig:
    """`config`, else the folder's `flashportrait_config.json`, else the release preset."""
    if config is not None:
        return config
    if paths.config.is_file():
        return DeploymentConfig.from_json_file(paths.config)
    return DeploymentConfig.release()


def load_components(
    weights: str | Path | WeightPaths,
    *,
    mode: Mode = "fast",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    parts: Iterable[str] = ALL_PARTS,
    config: DeploymentConfig | None = None,
    lora_strength: float = 1.0,
    lora_compute_dtype: torch.dtype | None = None,
    text_cache_size: int = 0,
) -> Components:
    """Load `parts` (names in `layout.PARTS`; see `layout.SAMPLER_PARTS` etc.) for `mode`.

    weights: the weights root in the release layout, or `WeightPaths` with overrides, or a prepared
        folder (it has a `manifest.json`; handed to `prepared.load_prepared`, bf16 DiT files).
    dtype: the serving dtype of the DiT, VAEs, umT5 and CLIP (bf16 on the GPU; float32 for CPU tests).
    lora_strength: scale of the fast-mode LoRA merge; lora_compute_dtype: None merges in the DiT's
        dtype (the reference), float32 computes each update in float32 and rounds once.
    text_cache_size: prompts the text encoder keeps (0: none).
    Raises `MissingWeightsError` (every absent file at once), `ConfigError` (sizes, config.json) and
    `CheckpointMismatchError` (a file whose keys or shapes do not fit), each naming the file.
    """
    if not isinstance(weights, WeightPaths):
        from flashportrait.components.prepared import is_prepared, load_prepared

        if is_prepared(weights):
            return load_prepared(weights, mode=mode, device=device, dtype=dtype, parts=parts, config=config,
                                 lora_strength=lora_strength, lora_compute_dtype=lora_compute_dtype,
                                 text_cache_size=text_cache_size)  # fmt: skip
    check_mode(mode)
    parts = check_parts(parts)
    paths = weights if isinstance(weights, WeightPaths) else WeightPaths.under(weights)
    cfg = resolve_config(paths, config)
    check_files(paths, mode, parts)
    if "dit" in parts:
        check_wan_config(paths.wan_config, cfg.dit)
    out = Components(config=cfg, mode=mode, paths=paths)
    if "dit" in parts:
        out.dit = load_dit(paths.dit_base(), paths.transformer, config=cfg.dit, dtype=dtype, device=device)
        if mode == "fast":
            out.lora = merge_lora(
                out.dit, paths.fast_lora, strength=lora_strength, compute_dtype=lora_compute_dtype
            )
    if "vae" in parts:
        out.vae = load_wan_vae(paths.wan_vae, cfg.wan_vae, dtype=dtype, device=device)
    if "tiny_vae" in parts and mode == "fast":
        out.tiny_vae = load_tiny_vae(paths.fast_vae, cfg.tiny_vae, dtype=dtype, device=device)
    if "text_encoder" in parts:
        tokenizer = UMT5Tokenizer.from_folder(paths.tokenizer, max_length=cfg.dit.text_len)
        encoder, _ = load_umt5_encoder(paths.t5, cfg.text_encoder, dtype=dtype, device=device)
        out.text_encoder = TextEncoder(tokenizer, encoder, cache_size=text_cache_size)
    if "clip" in parts:
        out.clip, _ = load_clip_vision(paths.clip, cfg.clip, cfg.clip_text, dtype=dtype, device=device)
    if "portrait_encoder" in parts:
        out.portrait_encoder = load_portrait_encoder(
            paths.portrait_encoder, cfg.portrait_encoder, device=device, dtype=torch.float32
        )
    if "motion_encoder" in parts:
        out.motion_encoder, _ = load_motion_encoder(paths.motion_encoder, cfg.motion_encoder, device=device)
    if "face" in parts:
        out.face = FaceModelPaths(detector=paths.face_detector, landmarks=paths.face_landmarks)
    return out


__all__ = ["Components", "FaceModelPaths", "load_components", "resolve_config"]

"""What a generation takes and what it streams back (the public types of `sampler.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from flashportrait.sampling.params import GenerationParams


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One generation.

    image: the reference portrait [H, W, 3] uint8 RGB, any size (resized by `params.max_size`).
    features: [N, 554] float32 expression features, one row per driving frame (N >= 5), gaps already
        filled (the face pipeline's `VideoFeatures.features`); only the first find_replacement(N) rows
        are used, as the reference truncates the driving video.
    prompt_embeds: [L, text_dim] the prompt's text-encoder output cut to its token count.
    negative_prompt_embeds: [L', text_dim], needed only when text_cfg_scale != 1.
    fps: the driving video's frame rate; not used by the sampling, carried for the caller's writer.
    request_id: for messages and logs.
    """

    image: np.ndarray
    features: np.ndarray | torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    fps: Fraction | None = None
    request_id: str = ""


@dataclass(frozen=True, eq=False)
class VideoChunk:
    """Output frames [frame_start, frame_stop) of `frames_total`; chunks come in order, each frame once.

    frames: [T, H, W, 3] uint8 RGB (CPU numpy). Output frame i is the reference pipeline's frame i + 1
    (its frame 0, the reconstructed portrait, is dropped as the reference script drops it).
    """

    frame_start: int
    frames: np.ndarray
    frames_total: int

    @property
    def frame_stop(self) -> int:
        return self.frame_start + int(self.frames.shape[0])


@dataclass(frozen=True)
class GenerationProgress:
    """Progress after the conditioning (units_done 0, window/step None) and after every window-step.

    units_done / units_total: window-steps; frames_emitted / frames_total: output frames sent so far;
    live_latent_frames: latent frames held by the sampler (bounded, independent of the video length);
    unit_s: wall seconds of this unit (DiT, solver, blend, and decoding of frames it finalised; the
    conditioning for the first event); elapsed_s: since `generate` started.
    """

    units_done: int
    units_total: int
    window: int | None
    step: int | None
    frames_emitted: int
    frames_total: int
    live_latent_frames: int
    unit_s: float
    elapsed_s: float

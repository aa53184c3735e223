"""The reference denoising loop written plainly, step-major: the oracle for the wavefront executor.

For every step, for every window in order (REFERENCE.md 2.7):

1. x = latents[:, :, window] - the latents from the START of the step;
2. the scheduler steps the window with the (guidance-combined) prediction;
3. for window w > 0 at steps s > 0 the first L frames of the result are blended with what window w-1
   wrote for this step over their L shared frames: `new*w_j + prev*(1 - w_j)`, w_j = float32 j/(L-1),
   `1 - w_j` in float32 (quirk 3, 4: no blend at step 0, windows simply overwrite);
4. the window result overwrites `pred_latents` at its frames; after all windows `latents = pred_latents`.

This keeps the whole video in memory and outputs nothing until the last step; it exists to define the
numbers (tests and the pipeline golden compare against it), not to serve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flashportrait.sampling.wavefront import BlendCast, Denoiser, SchedulerLike


def denoise_step_major(
    windows: Sequence[Sequence[int]],
    denoiser: Denoiser,
    scheduler: SchedulerLike,
    latents: torch.Tensor,
    *,
    blend_cast: BlendCast = BlendCast.NONE,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise a whole latent video window by window, step by step.

    windows: latent frame indices per window, in order (`WindowPlan.windows()`).
    latents: [B, 16, F, h, w] float32 initial noise, F = the generated length.
    on_step: called with (step, latents after that step [B, 16, F, h, w]).
    Returns the latents after the last step, [B, 16, F, h, w].
    """
    num_steps = len(scheduler.timesteps)
    # One solver state per window (ours); the reference's single scheduler object shares multistep
    # history between windows (quirk 5, reproduced only by the schedulers golden kind).
    states: list[Any] = [scheduler.init_state() for _ in windows]
    for step in range(num_steps):
        pred_latents = torch.zeros_like(latents)
        for w, window in enumerate(windows):
            index = list(window)
            x = latents[:, :, index]
            prediction = denoiser(w, step, x)
            out, states[w] = scheduler.step(prediction, step, x, states[w])
            if w > 0 and step > 0:
                prev = list(windows[w - 1])
                overlap = len(set(index) & set(prev))
                weight = torch.zeros(1, 1, overlap, 1, 1, dtype=out.dtype, device=out.device)
                for j in range(overlap):
                    weight[:, :, j] = j / (overlap - 1)
                new = out[:, :, :overlap]
                written = pred_latents[:, :, prev[len(prev) - overlap :]]  # what window w-1 wrote
                out[:, :, :overlap] = new * weight + written * (1 - weight)
                if blend_cast is BlendCast.BF16_ROUNDTRIP:
                    out = out.to(torch.bfloat16).to(pred_latents.dtype)
            pred_latents[:, :, index] = out
        latents = pred_latents
        if on_step is not None:
            on_step(step, latents)
    return latents

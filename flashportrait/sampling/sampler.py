"""The streaming sampler: reference image + per-frame expression features + text embeddings -> video.

    sampler = Sampler.from_components(components)
    for event in sampler.generate(GenerationRequest(image, features, prompt_embeds)):
        if isinstance(event, VideoChunk):      # output frames [frame_start, frame_stop), in order
            write(event.frames)                # [T, H, W, 3] uint8 RGB
        else:                                  # GenerationProgress
            report(event.units_done, event.units_total, event.frames_emitted)

Per request (REFERENCE.md 2.1-2.9): the driving frames are cut to 4k+1 (`find_replacement`), the
reference image resized and encoded ONCE into the shared conditioning (`conditioning.py`), the latent
video planned into windows (`windows.py`), denoised in wavefront order (`wavefront.py`; one batched
DiT call per window and step over the guidance passes of `guidance.py`), and every latent frame that
becomes final is decoded at once (`decode_stream.py`) and handed out, pipeline frame 0 dropped.
Latents stay float32 (the reference's bf16 blend cast is not applied: `BlendCast.NONE`). With
`GenerationParams.alp` most window-steps forecast the passes instead of calling the DiT (`alp.py`).

Deviation: initial noise. The reference draws the whole [1, 16, T, h, w] noise tensor with one
`randn` from a generator seeded with the seed. That tensor grows with the video and its values depend
on T, so a streamed hour-long video would need it all up front. We draw each latent frame's noise
[1, 16, 1, h, w] from its own CPU generator seeded by a hash of (seed, frame) (`frame_noise`): a seed
gives a different video than the reference's, but the same one on every device and for every video
length (frame f's noise does not depend on how long the video is). Tests and the golden pass explicit
noise through `Sampler.denoise(initial_latents=...)`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flashportrait.models.clip import CLIPVisionTower
from flashportrait.models.decoding import StreamingDecoder
from flashportrait.models.emo_split import EmotionSplitPlan, plan_emotion_split, split_emotion_tokens
from flashportrait.models.portrait_encoder import PortraitEncoder
from flashportrait.models.transformer import WanDiT
from flashportrait.models.wan_vae import WanVAE
from flashportrait.sampling.alp import AdaptiveLatentPredictor, ALPConfig
from flashportrait.sampling.conditioning import (
    Conditioning,
    build_conditioning,
    check_image,
    check_text,
    pass_contexts,
)
from flashportrait.sampling.decode_stream import VideoDecodeStream, to_uint8
from flashportrait.sampling.guidance import GuidanceConfig, GuidancePass, combine_batched, guidance_passes
from flashportrait.sampling.params import MODES, GenerationError, GenerationParams
from flashportrait.sampling.request import GenerationProgress, GenerationRequest, VideoChunk
from flashportrait.sampling.schedulers import Scheduler, build_scheduler
from flashportrait.sampling.wavefront import (
    BlendCast,
    FinalLatents,
    InitialLatents,
    Progress,
    SamplingCancelled,
    StepLatents,
    run_wavefront,
)
from flashportrait.sampling.windows import (
    FrameCounts,
    WindowPlan,
    frame_counts,
    plan_windows,
    scaled_image_size,
)

LATENT_CHANNELS = 16
# Rows of the feature array checked for finiteness at a time (bounds the temporary mask's memory).
_CHECK_ROWS = 4096


@dataclass(frozen=True, eq=False)
class PreparedRequest:
    """A validated request with everything shared by its windows (built once by `Sampler.prepare`).

    features: [num_frames, 554] float32 CPU (the 4k+1 driving frames used); context: [P, L, text_dim]
    float32 and context_lens [P] per guidance pass; ip_scales [P] float32; alp: the request's Adaptive
    Latent Prediction (None: every window-step calls the DiT).
    """

    request: GenerationRequest
    counts: FrameCounts
    plan: WindowPlan
    scheduler: Scheduler
    guidance: GuidanceConfig
    passes: tuple[GuidancePass, ...]
    conditioning: Conditioning
    features: torch.Tensor
    context: torch.Tensor
    context_lens: torch.Tensor
    ip_scales: torch.Tensor
    alp: ALPConfig | None = None

    @property
    def num_steps(self) -> int:
        return self.scheduler.num_steps

    @property
    def units_total(self) -> int:
        return self.plan.num_windows * self.num_steps


def frame_noise(seed: int, frame: int, height: int, width: int) -> torch.Tensor:
    """Initial noise of latent frame `frame`: [1, 16, 1, h, w] float32 CPU, N(0, 1), from a CPU
    generator seeded by blake2b(seed, frame) (see the module docstring)."""
    digest = hashlib.blake2b(f"flashportrait-noise:{seed}:{frame}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randn(1, LATENT_CHANNELS, 1, height, width, generator=generator, dtype=torch.float32)


class WindowDenoiser:
    """The `Denoiser` of `run_wavefront` for one request: one batched DiT call per (window, step); with
    `prepared.alp`, only at the steps where ALP runs the model and a forecast at the others (`alp`: the
    predictor, holding one history per window in flight).

    The expression tokens of a window are computed when the window first runs (its step 0) and
    dropped after its last step, so only the windows in flight hold them.
    on_passes: called with (window, step, per-pass predictions [P, 16, C, h, w] float32) before the
    guidance combination (the golden runner records them).
    """

    def __init__(
        self,
        sampler: Sampler,
        prepared: PreparedRequest,
        on_passes: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> None:
        self.sampler = sampler
        self.prepared = prepared
        self.on_passes = on_passes
        device = sampler.device
        cond = prepared.conditioning
        self._tokens: dict[int, torch.Tensor] = {}
        self._split: EmotionSplitPlan | None = None
        passes = len(prepared.passes)
        self._y = cond.y.to(device).expand(passes, -1, -1, -1, -1)
        self._clip = cond.clip.to(device).expand(passes, -1, -1)
        self._context = prepared.context.to(device)
        self._context_lens = prepared.context_lens.to(device)
        self._ip = prepared.ip_scales.to(device)
        self._uses_expression = bool((prepared.ip_scales != 0).any())
        self.alp = None if prepared.alp is None else AdaptiveLatentPredictor(prepared.alp, prepared.num_steps)
        self._timesteps = prepared.scheduler.timesteps.to(device)
        h, w = cond.latent_size
        pt, ph, pw = sampler.dit.config.patch_size
        # seq_len = ceil(h/2 * w/2 * C) as the reference computes it: the token count of a window.
        self._seq_len = math.ceil(h / ph * w / pw * prepared.plan.context_size / pt)

    @property
    def split_plan(self) -> EmotionSplitPlan | None:
        """The per-latent-frame token split (known once a window's tokens were computed)."""
        return self._split

    @torch.no_grad()
    def expression_tokens(self, window: int) -> torch.Tensor:
        """emo_proj of `window`: [1, C, K, emo_dim] float32 (K = 97 for the release's encoder).

        The portrait encoder runs on the window's driving frames `[w0*4, w_last*4 + 1)` and its
        tokens are split per latent frame (`emo_split.py`).
        """
        cached = self._tokens.get(window)
        if cached is not None:
            return cached
        plan = self.prepared.plan
        rows = self.prepared.features[plan.feature_frames(window)]
        encoder = self.sampler.portrait_encoder
        weight = next(encoder.parameters())
        tokens = encoder(rows[None].to(device=weight.device, dtype=weight.dtype))
        _, num_tokens, _ = tokens.shape
        if self._split is None:
            self._split = plan_emotion_split(num_tokens, rows.shape[0])
        chunks, _ = split_emotion_tokens(tokens, rows.shape[0], plan=self._split)
        if chunks.shape[1] != plan.context_size:
            raise AssertionError(f"{chunks.shape[1]} expression chunks for a window of {plan.context_size}")
        chunks = chunks.to(self.sampler.device)
        self._tokens[window] = chunks
        return chunks

    @torch.no_grad()
    def predict_passes(self, window: int, step: int, x: torch.Tensor) -> torch.Tensor:
        """x: [1, 16, C, h, w] float32 -> per-pass flow predictions [P, 16, C, h, w] float32."""
        passes = len(self.prepared.passes)
        # With every pass at ip_scale 0 the expression branch adds nothing (WanDiT skips it).
        emo = self.expression_tokens(window).expand(passes, -1, -1, -1) if self._uses_expression else None
        t = self._timesteps[step].reshape(1).expand(passes)
        out = self.sampler.dit(
            x.to(self.sampler.device).expand(passes, -1, -1, -1, -1),
            t,
            self._context,
            self._clip,
            self._y,
            emo,
            context_lens=self._context_lens,
            ip_scale=self._ip,
            seq_len=self._seq_len,
        )
        return out.float()

    def __call__(self, window: int, step: int, x: torch.Tensor) -> torch.Tensor:
        if self.alp is None:
            predictions = self.predict_passes(window, step, x)
        else:
            predictions = self.alp(window, step, x, lambda: self.predict_passes(window, step, x))
        if self.on_passes is not None:
            self.on_passes(window, step, predictions)
        if step == self.prepared.num_steps - 1:
            self._tokens.pop(window, None)
        return combine_batched(self.prepared.guidance, predictions)


class Sampler:
    """The loaded models of one sampler instance (see the module docstring).

    dit: WanDiT (bf16 on the GPU; the fast mode's LoRA already merged); vae: the Wan VAE (encodes the
    first-frame condition); clip: the CLIP image tower; portrait_encoder: float32; decoder: the
    streaming decoder of the mode (tiny VAE in fast mode, the Wan VAE in quality mode); mode: which
    of `params.MODES` the models were loaded for. Every module runs in its own dtype.
    decode_chunk_latents: latent frames per decoder call.
    """

    def __init__(
        self,
        dit: WanDiT,
        vae: WanVAE,
        clip: CLIPVisionTower,
        portrait_encoder: PortraitEncoder,
        decoder: StreamingDecoder,
        *,
        mode: str = "fast",
        device: torch.device | str | None = None,
        decode_chunk_latents: int = 4,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.dit = dit
        self.vae = vae
        self.clip = clip
        self.portrait_encoder = portrait_encoder
        self.decoder = decoder
        self.mode = mode
        self.device = torch.device(device) if device is not None else dit.device
        self.decode_chunk_latents = decode_chunk_latents

    @classmethod
    def from_components(cls, components: Any, **kwargs: Any) -> Sampler:
        """From `flashportrait.components.load_components(..., parts=SAMPLER_PARTS)`."""
        return cls(
            components.dit,
            components.vae,
            components.clip,
            components.portrait_encoder,
            components.decoder,
            mode=components.mode,
            **kwargs,
        )

    # -- preparation ---------------------------------------------------------------------------------

    def prepare(
        self, request: GenerationRequest, conditioning: Conditioning | None = None
    ) -> PreparedRequest:
        """Validate `request` (GenerationError with a clear message), then build its shared conditioning.

        conditioning: reuse one built for the same image, max_size and context_size (e.g. by an
        earlier `prepare`); its sizes are checked against the request's.
        """
        try:
            checked = self._validate(request)
            if conditioning is not None:
                _check_conditioning(conditioning, request, checked["plan"].context_size)
        except ValueError as exc:  # GenerationError, and the checks of windows/conditioning/config
            prefix = f"request {request.request_id}: " if request.request_id else ""
            raise GenerationError(f"{prefix}{exc}") from exc
        if conditioning is None:
            conditioning = build_conditioning(
                self.vae,
                self.clip,
                request.image,
                max_size=request.params.max_size,
                context_size=checked["plan"].context_size,
            )
        return PreparedRequest(request=request, conditioning=conditioning, **checked)

    def _validate(self, request: GenerationRequest) -> dict[str, Any]:
        params = request.params
        if not isinstance(params, GenerationParams):
            raise GenerationError(f"params must be GenerationParams, got {type(params).__name__}")
        scheduler = build_scheduler(params.scheduler_config(self.mode))
        guidance = params.guidance()
        passes = guidance_passes(guidance)
        check_image(request.image)
        features = self._check_features(request.features)
        counts = frame_counts(features.shape[0])
        plan = plan_windows(counts.latent_length, params.context_size, params.context_overlap)
        cfg = self.dit.config
        prompt = check_text(request.prompt_embeds, cfg.text_dim, cfg.text_len, "prompt_embeds")
        negative = None
        if any(p.negative_prompt for p in passes):
            if request.negative_prompt_embeds is None:
                raise GenerationError(
                    f"text_cfg_scale {params.text_cfg_scale} != 1 needs negative_prompt_embeds"
                )
            negative = check_text(
                request.negative_prompt_embeds, cfg.text_dim, cfg.text_len, "negative_prompt_embeds"
            )
        context, lens = pass_contexts(passes, prompt, negative)
        return dict(
            counts=counts,
            plan=plan,
            scheduler=scheduler,
            guidance=guidance,
            passes=passes,
            features=features[: counts.num_frames],
            context=context,
            context_lens=lens,
            ip_scales=torch.tensor([p.ip_scale for p in passes], dtype=torch.float32),
            alp=params.alp_config(self.mode),
        )

    def _check_features(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[N, 554] float -> float32 CPU tensor (no copy for float32 numpy input)."""
        tensor = torch.as_tensor(features)
        width = self.portrait_encoder.cfg.feature_dim
        if tensor.dim() != 2 or tensor.shape[1] != width:
            raise GenerationError(
                f"features must be [N, {width}] (one row per driving frame), got {list(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise GenerationError(f"features must be floating point, got {tensor.dtype}")
        tensor = tensor.to(device="cpu", dtype=torch.float32)
        for start in range(0, tensor.shape[0], _CHECK_ROWS):
            block = tensor[start : start + _CHECK_ROWS]
            if not bool(torch.isfinite(block).all()):
                bad = start + int((~torch.isfinite(block)).any(dim=1).nonzero()[0])
                raise GenerationError(f"features of driving frame {bad} are not finite")
        return tensor

    # -- sampling ------------------------------------------------------------------------------------

    def initial_noise(self, prepared: PreparedRequest) -> Callable[[int, int], torch.Tensor]:
        """(frame_start, frame_stop) -> [1, 16, stop - start, h, w] float32 noise on the device."""
        h, w = prepared.conditioning.latent_size
        seed = prepared.request.params.seed

        def noise(start: int, stop: int) -> torch.Tensor:
            frames = [frame_noise(seed, f, h, w) for f in range(start, stop)]
            return torch.cat(frames, dim=2).to(self.device)

        return noise

    def denoise(
        self,
        prepared: PreparedRequest,
        *,
        initial_latents: InitialLatents | None = None,
        blend_cast: BlendCast = BlendCast.NONE,
        emit_steps: bool = False,
        should_cancel: Callable[[], bool] | None = None,
        on_passes: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Iterator[FinalLatents | StepLatents | Progress]:
        """The wavefront over `prepared`'s windows (events of `run_wavefront`); latents float32.

        initial_latents: [1, 16, generated_length, h, w] or a callable (default: `frame_noise`).
        """
        noise = self.initial_noise(prepared) if initial_latents is None else initial_latents
        denoiser = WindowDenoiser(self, prepared, on_passes)
        yield from run_wavefront(
            prepared.plan,
            denoiser,
            prepared.scheduler,
            noise,
            blend_cast=blend_cast,
            should_cancel=should_cancel,
            emit_steps=emit_steps,
        )

    def generate(
        self, request: GenerationRequest, should_cancel: Callable[[], bool] | None = None
    ) -> Iterator[VideoChunk | GenerationProgress]:
        """Stream the output video of `request` (see the module docstring).

        Raises GenerationError before anything is yielded for a bad request, and SamplingCancelled
        between two units of work once `should_cancel()` returns True.
        """
        started = time.monotonic()
        _check_cancel(should_cancel)
        prepared = self.prepare(request)
        total_frames = prepared.counts.output_frames
        mark = self._mark()
        yield GenerationProgress(
            0, prepared.units_total, None, None, 0, total_frames, 0, mark - started, mark - started
        )
        mark = time.monotonic()
        stream = VideoDecodeStream(self.decoder, chunk_latents=self.decode_chunk_latents)
        emitted = 0
        for event in self.denoise(prepared, should_cancel=should_cancel):
            if isinstance(event, FinalLatents):
                for decoded in stream.push(event.frame_start, event.latents):
                    _check_cancel(should_cancel)
                    chunk = _chunk(decoded.frame_start, decoded.frames, total_frames)
                    emitted = chunk.frame_stop
                    yield chunk
            elif isinstance(event, Progress):
                now = self._mark()
                yield GenerationProgress(
                    event.units_done,
                    event.units_total,
                    event.window,
                    event.step,
                    emitted,
                    total_frames,
                    event.live_frames,
                    now - mark,
                    now - started,
                )
                mark = time.monotonic()
        for decoded in stream.finish():
            chunk = _chunk(decoded.frame_start, decoded.frames, total_frames)
            emitted = chunk.frame_stop
            yield chunk
        if emitted != total_frames:
            raise AssertionError(f"emitted {emitted} of {total_frames} frames")

    def _mark(self) -> float:
        """Now, after the device finished its queued work (so unit times are true compute times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.monotonic()


def _chunk(frame_start: int, unit_frames: torch.Tensor, total: int) -> VideoChunk:
    """[1, 3, t, H, W] float in [0, 1] -> VideoChunk with [t, H, W, 3] uint8 on the CPU."""
    frames = to_uint8(unit_frames)[0].cpu().numpy()
    return VideoChunk(frame_start, frames, total)


def _check_conditioning(conditioning: Conditioning, request: GenerationRequest, context_size: int) -> None:
    height, width, _ = request.image.shape
    size = scaled_image_size(width, height, request.params.max_size)
    have_h, have_w, _ = conditioning.image.shape
    _, _, frames, _, _ = conditioning.y.shape
    if (have_w, have_h) != size or frames != context_size:
        raise ValueError(
            f"the conditioning given is for a {have_w}x{have_h} image and {frames} latent frames; "
            f"the request needs {size[0]}x{size[1]} and {context_size}"
        )


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise SamplingCancelled("cancelled")


__all__ = [
    "GenerationError",
    "GenerationParams",
    "GenerationProgress",
    "GenerationRequest",
    "PreparedRequest",
    "Sampler",
    "SamplingCancelled",
    "VideoChunk",
    "WindowDenoiser",
    "frame_noise",
]

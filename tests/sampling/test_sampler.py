"""The streaming sampler end to end with tiny random models on the CPU (golden parity: `pipeline`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashportrait.models.decoding import decode_all
from flashportrait.sampling.decode_stream import to_uint8, to_unit_range
from flashportrait.sampling.guidance import GuidanceConfig, guidance_passes
from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler
from flashportrait.sampling.sampler import (
    GenerationError,
    GenerationProgress,
    GenerationRequest,
    SamplingCancelled,
    VideoChunk,
    WindowDenoiser,
    frame_noise,
)
from flashportrait.sampling.stepmajor import denoise_step_major
from flashportrait.sampling.wavefront import FinalLatents
from flashportrait.sampling.windows import find_replacement

TEXT_DIM = 16
# Windows of 5 latent frames overlapping by 2, 3 Euler steps: several windows on a short video.
PARAMS = GenerationParams(max_size=32, context_size=5, context_overlap=2, scheduler="euler", steps=3, seed=7)


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    return random_sampler(SamplerSizes.tiny(), mode="fast", seed=1, decode_chunk_latents=2)


def _request(frames=23, params=PARAMS, seed=0, **changes) -> GenerationRequest:
    def rng(stream: int) -> np.random.Generator:  # one stream per input: sizes do not shift others
        return np.random.default_rng([seed, stream])

    fields = dict(
        image=rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8),
        features=rng(1).standard_normal((frames, 554)).astype(np.float32),
        prompt_embeds=torch.from_numpy(rng(2).standard_normal((6, TEXT_DIM)).astype(np.float32)),
        negative_prompt_embeds=torch.from_numpy(rng(3).standard_normal((3, TEXT_DIM)).astype(np.float32)),
        params=params,
        request_id="req-1",
    )
    fields.update(changes)
    return GenerationRequest(**fields)


def _collect(events):
    chunks, progress = [], []
    for event in events:
        (chunks if isinstance(event, VideoChunk) else progress).append(event)
    return chunks, progress


def test_generate_streams_every_output_frame_once_in_order(sampler):
    request = _request(frames=23)  # 21 frames used (4k+1): 6 latent frames, windows [0,5) and [1,6)
    chunks, progress = _collect(sampler.generate(request))
    total = find_replacement(23) - 1
    assert total == 20
    position = 0
    for chunk in chunks:
        assert chunk.frame_start == position and chunk.frames_total == total
        assert chunk.frames.dtype == np.uint8 and chunk.frames.shape[1:] == (32, 32, 3)
        position = chunk.frame_stop
    assert position == total
    assert all(isinstance(p, GenerationProgress) for p in progress)
    assert progress[0].units_done == 0 and progress[0].window is None
    assert [p.units_done for p in progress] == list(range(progress[0].units_total + 1))
    assert progress[-1].frames_emitted == total and progress[-1].live_latent_frames == 0
    assert progress[0].units_total == 2 * 3


def test_output_is_the_step_major_reference_decoded(sampler):
    """Final latents = the plain step-major loop with the same denoiser, bit for bit; the streamed
    frames = whole-video decoding of them, first frame dropped, truncated to uint8."""
    request = _request(frames=33)
    prepared = sampler.prepare(request)
    finals = [e for e in sampler.denoise(prepared) if isinstance(e, FinalLatents)]
    streamed = torch.cat([f.latents for f in finals], dim=2)
    noise = sampler.initial_noise(prepared)(0, prepared.plan.generated_length)
    expected = denoise_step_major(
        prepared.plan.windows(), WindowDenoiser(sampler, prepared), prepared.scheduler, noise
    )
    assert torch.equal(streamed, expected)

    chunks, _ = _collect(sampler.generate(request))
    video = np.concatenate([c.frames for c in chunks])
    whole = to_uint8(to_unit_range(decode_all(sampler.decoder, expected)))[0, 1:].numpy()
    assert video.shape == whole.shape == (32, 32, 32, 3)
    # Chunked decoding batches frames differently (float rounding ~1e-6): at most one level apart.
    difference = np.abs(video.astype(np.int16) - whole.astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_batched_guidance_passes_equal_separate_dit_calls(sampler):
    params = GenerationParams(
        max_size=32, context_size=5, context_overlap=2, scheduler="euler", steps=3, text_cfg_scale=2.0
    )
    prepared = sampler.prepare(_request(params=params))
    passes = guidance_passes(prepared.guidance)
    assert [p.name for p in passes] == ["posi", "no_emo", "no_cond"]
    denoiser = WindowDenoiser(sampler, prepared)
    x = torch.randn(1, 16, 5, 4, 4)
    batched = denoiser.predict_passes(1, 2, x)
    request, cond = prepared.request, prepared.conditioning
    emo = denoiser.expression_tokens(1)
    for i, guidance_pass in enumerate(passes):
        text = request.negative_prompt_embeds if guidance_pass.negative_prompt else request.prompt_embeds
        with torch.no_grad():
            alone = sampler.dit(
                x,
                prepared.scheduler.timesteps[2:3],
                [text],
                cond.clip,
                cond.y,
                emo,
                ip_scale=guidance_pass.ip_scale,
            )
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def _first_chunk(events) -> VideoChunk:
    return next(e for e in events if isinstance(e, VideoChunk))


def test_same_seed_same_video_and_the_start_does_not_depend_on_the_length(sampler):
    # 14 latent frames: windows start at 0, 3, 6, 9; the first chunk (latent frames [0, 3)) depends on
    # windows 0..2 (window 0 at step 2 reads window 1's step 1, which read window 2's step 0).
    first = _first_chunk(sampler.generate(_request(frames=53)))
    again = _first_chunk(sampler.generate(_request(frames=53)))
    assert np.array_equal(first.frames, again.frames)
    other_seed = GenerationParams(**{**PARAMS.__dict__, "seed": 8})
    different = _first_chunk(sampler.generate(_request(frames=53, params=other_seed)))
    assert not np.array_equal(first.frames, different.frames)
    # A longer driving video with the same first frames (20 latent frames: windows 0, 3, 6, 9, ...)
    # starts with the same frames, because each latent frame's noise depends on (seed, frame) only.
    features = _request(frames=53).features
    extra = np.random.default_rng(5).standard_normal((24, 554)).astype(np.float32)
    longer = _first_chunk(sampler.generate(_request(frames=77, features=np.concatenate([features, extra]))))
    assert longer.frames_total == 76 and first.frames_total == 52
    assert np.array_equal(longer.frames, first.frames)


def test_frame_noise_is_deterministic_and_distinct_per_frame():
    a = frame_noise(42, 3, 4, 5)
    assert a.shape == (1, 16, 1, 4, 5) and a.dtype == torch.float32
    assert torch.equal(a, frame_noise(42, 3, 4, 5))
    assert not torch.equal(a, frame_noise(42, 4, 4, 5))
    assert not torch.equal(a, frame_noise(43, 3, 4, 5))
    many = torch.cat([frame_noise(0, f, 16, 16) for f in range(8)])
    assert abs(float(many.mean())) < 0.05 and abs(float(many.std()) - 1) < 0.05


def test_short_video_uses_one_extended_window(sampler):
    request = _request(frames=9)  # 3 latent frames < context 5
    prepared = sampler.prepare(request)
    assert prepared.plan.short_video and prepared.plan.generated_length == 5
    chunks, _ = _collect(sampler.generate(request))
    assert sum(c.frames.shape[0] for c in chunks) == 8


def test_cancellation_between_units(sampler):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 4

    events = []
    with pytest.raises(SamplingCancelled):
        for event in sampler.generate(_request(frames=33), should_cancel=should_cancel):
            events.append(event)
    assert len(calls) == 5
    done = [e.units_done for e in events if isinstance(e, GenerationProgress)]
    assert done and max(done) < 6 * 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(features=np.zeros((4, 554), np.float32)), "at least 5"),
        (dict(features=np.zeros((9, 500), np.float32)), r"\[N, 554\]"),
        (dict(features=np.full((9, 554), np.nan, np.float32)), "driving frame 0 are not finite"),
        (dict(prompt_embeds=torch.zeros(3, 7)), "prompt_embeds must be"),
        (dict(prompt_embeds=torch.zeros(600, TEXT_DIM)), "1 to 512"),
        (dict(image=np.zeros((10, 10), np.uint8)), "uint8 RGB"),
        (
            dict(negative_prompt_embeds=None, params=GenerationParams(text_cfg_scale=3.0)),
            "negative_prompt_embeds",
        ),
        (dict(params=GenerationParams(mode="quality")), "loaded in 'fast' mode"),
        (dict(params=GenerationParams(scheduler="step_distill", steps=5)), "exactly 4 steps"),
    ],
)
def test_bad_requests_are_clear_errors_before_any_work(sampler, changes, message):
    request = _request(frames=9, **changes)
    events = sampler.generate(request)
    with pytest.raises(GenerationError, match=message) as info:
        next(events)
    assert "request req-1" in str(info.value)


def test_expression_tokens_are_dropped_after_a_windows_last_step(sampler):
    prepared = sampler.prepare(_request(frames=33))
    denoiser = WindowDenoiser(sampler, prepared)
    x = torch.zeros(1, 16, 5, 4, 4)
    denoiser(0, 0, x)
    assert set(denoiser._tokens) == {0}
    denoiser(0, prepared.num_steps - 1, x)
    assert not denoiser._tokens


def test_guidance_config_of_the_params():
    assert PARAMS.guidance() == GuidanceConfig(4.0, 1.0, 1.0)

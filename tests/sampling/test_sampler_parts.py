"""Generation parameters, conditioning and the decode stream, each on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait.models.decoding import decode_all
from flashportrait.models.tiny_vae import TinyVaeDecoder
from flashportrait.models.wan_vae import WanVAE
from flashportrait.sampling.conditioning import (
    first_frame_condition,
    image_to_signed,
    mask_latents,
    pass_contexts,
    resize_reference,
)
from flashportrait.sampling.decode_stream import VideoDecodeStream, to_uint8, to_unit_range
from flashportrait.sampling.guidance import GuidanceConfig, guidance_passes
from flashportrait.sampling.params import GenerationError, GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, randomize
from flashportrait.sampling.schedulers import SchedulerConfig

# ---------------------------------------------------------------------------------------------------
# parameters


def test_defaults_are_the_reference_scripts_except_max_size():
    params = GenerationParams()
    assert (params.emo_cfg_scale, params.text_cfg_scale, params.ip_scale) == (4.0, 1.0, 1.0)
    assert (params.context_size, params.context_overlap, params.shift, params.seed) == (51, 30, 5.0, 42)
    assert params.max_size == 512
    assert params.scheduler_config("fast") == SchedulerConfig("step_distill", 4, 5.0)
    assert params.scheduler_config("quality") == SchedulerConfig("euler", 30, 5.0)
    assert GenerationParams(scheduler="euler", steps=7).scheduler_config("fast") == SchedulerConfig(
        "euler", 7, 5.0
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(steps=0), "steps must be between 1 and 100"),
        (dict(steps=101), "steps must be between 1 and 100"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(emo_cfg_scale=-1.0), "emo_cfg_scale must be between 0 and 20"),
        (dict(text_cfg_scale=math.nan), "text_cfg_scale"),
        (dict(ip_scale=math.inf), "ip_scale"),
        (dict(seed=-1), "seed must be between"),
        (dict(seed=True), "seed must be an integer"),
        (dict(max_size=2000), "max_size must be between 16 and 1280"),
        (dict(max_size=8), "max_size"),
        (dict(context_size=1), "context_size must be between 2 and 81"),
        (dict(context_overlap=51), "context_overlap must be between 0 and 50"),
        (dict(context_overlap=1), "context_overlap 1 is not allowed"),
        (dict(shift=0.0), "shift must be positive"),
        (dict(mode="turbo"), "mode must be one of"),
        (dict(scheduler="ddim"), "scheduler must be one of"),
    ],
)
def test_bad_parameters_are_clear_errors(changes, message):
    with pytest.raises(GenerationError, match=message):
        GenerationParams(**changes)


def test_step_count_and_mode_are_checked_against_the_sampler():
    with pytest.raises(GenerationError, match="exactly 4 steps"):
        GenerationParams(steps=30).scheduler_config("fast")
    with pytest.raises(GenerationError, match="loaded in 'quality' mode"):
        GenerationParams(mode="fast").scheduler_config("quality")


def test_from_mapping_parses_strings_and_refuses_unknown_names():
    params = GenerationParams.from_mapping(
        {
            "steps": "12",
            "scheduler": "euler",
            "emo_cfg_scale": "3.5",
            "seed": "9223372036854775807",
            "mode": "",
        }
    )
    assert (params.steps, params.scheduler, params.emo_cfg_scale, params.seed) == (
        12,
        "euler",
        3.5,
        2**63 - 1,
    )
    assert params.mode is None
    assert GenerationParams.from_mapping({"max_size": "720.0", "steps": None}).max_size == 720
    assert GenerationParams.from_mapping({"context_size": ""}).context_size == 51
    with pytest.raises(GenerationError, match=r"unknown generation parameter\(s\) \['guidance'\]"):
        GenerationParams.from_mapping({"guidance": 3})
    with pytest.raises(GenerationError, match="steps must be an integer, got 'four'"):
        GenerationParams.from_mapping({"steps": "four"})
    with pytest.raises(GenerationError, match="seed must be an integer"):
        GenerationParams.from_mapping({"seed": "1.5"})


def test_guidance_passes_follow_the_scales():
    assert len(guidance_passes(GenerationParams().guidance())) == 2
    assert len(guidance_passes(GenerationParams(text_cfg_scale=2.0).guidance())) == 3
    assert GenerationParams(emo_cfg_scale=1.0).guidance() == GuidanceConfig(1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# conditioning


@pytest.mark.parametrize(
    ("size", "max_size", "expected"), [((1092, 1280), 512, (448, 512)), ((40, 24), 32, (32, 32))]
)
def test_reference_image_resized_like_the_script(size, max_size, expected):
    width, height = size
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    resized = resize_reference(image, max_size)
    assert resized.shape == (expected[1], expected[0], 3) and resized.flags.writeable
    by_pil = np.asarray(Image.fromarray(image).resize(expected, Image.Resampling.LANCZOS))
    assert np.array_equal(resized, by_pil)
    unchanged = resize_reference(resized, max(expected))
    assert np.array_equal(unchanged, resized)


def test_image_to_signed_matches_to_tensor_then_normalise():
    image = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    signed = image_to_signed(image)
    reference = (torch.from_numpy(image).permute(2, 0, 1).float() / 255).sub(0.5).div(0.5)
    assert torch.equal(signed, reference)
    assert float(signed.min()) == -1.0 and float(signed.max()) == 1.0


def test_first_frame_condition_is_mask_plus_latents_of_the_masked_clip():
    sizes = SamplerSizes.tiny()
    with torch.device("meta"):
        vae = WanVAE(sizes.wan_vae)
    vae = randomize(vae, seed=3, device="cpu", dtype=torch.float32)
    image = np.random.default_rng(1).integers(0, 256, size=(16, 32, 3), dtype=np.uint8)
    y = first_frame_condition(vae, image, context_size=3)
    assert y.shape == (1, 4 + 16, 3, 2, 4)
    assert torch.equal(y[:, :4], mask_latents(3, 2, 4))
    assert torch.equal(y[:, :4, 0], torch.ones(1, 4, 2, 4)) and not y[:, :4, 1:].any()
    clip = torch.zeros(1, 3, 9, 16, 32)
    clip[:, :, 0] = image_to_signed(image)
    with torch.no_grad():
        assert torch.equal(y[:, 4:], vae.encode(clip))


def test_pass_contexts_pad_each_pass_with_its_own_length():
    prompt, negative = torch.randn(5, 8), torch.randn(2, 8)
    passes = guidance_passes(GuidanceConfig(4.0, 2.0, 1.0))
    context, lens = pass_contexts(passes, prompt, negative)
    assert context.shape == (3, 5, 8) and lens.tolist() == [5, 5, 2]
    assert torch.equal(context[2, :2], negative) and not context[2, 2:].any()
    with pytest.raises(ValueError, match="needs the negative prompt"):
        pass_contexts(passes, prompt, None)


# ---------------------------------------------------------------------------------------------------
# decode stream


class _CountingDecoder:
    """A decoder that returns each latent frame's channel-0 mean as grey frames (1 then 4 per latent)."""

    temporal_factor = 4
    spatial_factor = 1

    def begin(self, batch):
        return {"first": True}

    def decode(self, latents, state):
        frames = []
        for i in range(latents.shape[2]):
            value = latents[:, :1, i : i + 1].mean(dim=(3, 4), keepdim=True)
            count = 1 if state["first"] else 4
            state["first"] = False
            frames.append(value.expand(-1, 3, count, 2, 2))
        return torch.cat(frames, dim=2), state

    def finish(self, state):
        return torch.zeros(1, 3, 0, 2, 2)


def test_decode_stream_drops_frame_zero_and_numbers_frames_in_order():
    latents = torch.linspace(-1, 1, 6).view(1, 1, 6, 1, 1).expand(1, 16, 6, 2, 2).contiguous()
    stream = VideoDecodeStream(_CountingDecoder(), chunk_latents=2)
    decoded = [*stream.push(0, latents[:, :, :3]), *stream.push(3, latents[:, :, 3:]), *stream.finish()]
    assert [(d.frame_start, d.frame_stop) for d in decoded] == [(0, 4), (4, 8), (8, 16), (16, 20)]
    values = torch.cat([d.frames for d in decoded], dim=2)[0, 0, :, 0, 0]
    expected = to_unit_range(torch.linspace(-1, 1, 6)[1:].repeat_interleave(4))
    assert torch.allclose(values, expected)
    with pytest.raises(RuntimeError, match="finished"):
        list(stream.push(6, latents[:, :, :1]))
    with pytest.raises(ValueError, match="in order"):
        list(VideoDecodeStream(_CountingDecoder()).push(1, latents))


def test_decode_stream_equals_whole_video_decoding():
    sizes = SamplerSizes.tiny()
    with torch.device("meta"):
        decoder = TinyVaeDecoder(sizes.tiny_vae)
    decoder = randomize(decoder, seed=2, device="cpu", dtype=torch.float32)
    latents = torch.randn(1, 16, 7, 2, 3)
    stream = VideoDecodeStream(decoder, chunk_latents=3)
    pieces = [*stream.push(0, latents[:, :, :2]), *stream.push(2, latents[:, :, 2:]), *stream.finish()]
    streamed = torch.cat([p.frames for p in pieces], dim=2)
    whole = to_unit_range(decode_all(decoder, latents))[:, :, 1:]
    assert streamed.shape == whole.shape == (1, 3, 24, 16, 24)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


def test_uint8_conversion_truncates_like_the_reference_writer():
    unit = torch.tensor([0.0, 0.5, 0.999, 1.0, 254.9 / 255]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    out = to_uint8(unit)
    assert out.shape == (1, 5, 1, 1, 3)
    assert out[0, :, 0, 0, 0].tolist() == [0, 127, 254, 255, 254]
    assert torch.equal(
        to_unit_range(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])), torch.tensor([0, 0, 0.5, 1, 1])
    )

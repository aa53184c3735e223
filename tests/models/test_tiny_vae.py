"""TAEHV tiny VAE decoder: streaming equals whole-video decoding, bounded state, fast_vae.pth loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flashportrait.golden import GoldenCase
from flashportrait.models.decoding import StreamingDecoder, decode_all, frames_for, output_span
from flashportrait.models.tiny_vae import (
    TinyVaeConfig,
    TinyVaeDecoder,
    encoder_shapes,
    load_tiny_vae,
    manifest_shapes,
)
from flashportrait.models.wan_vae import WanVAE, WanVaeConfig
from flashportrait.weights import CheckpointError, CheckpointMismatchError

GOLDEN_CONFIG = TinyVaeConfig(decoder_widths=(32, 16, 8, 8))  # the golden case's reduced widths
SMALL = TinyVaeConfig(decoder_widths=(8, 8, 4, 4))


@pytest.fixture(scope="module")
def golden(golden_dir) -> GoldenCase:
    return GoldenCase.load(golden_dir / "tiny_vae_decoder.json")


@pytest.fixture(scope="module")
def golden_decoder(golden) -> TinyVaeDecoder:
    return load_tiny_vae(golden.params(), GOLDEN_CONFIG, dtype=torch.float32)


def _random_decoder(config: TinyVaeConfig = SMALL, seed: int = 0) -> TinyVaeDecoder:
    torch.manual_seed(seed)
    return TinyVaeDecoder(config).eval()


def _fast_vae_file(decoder: TinyVaeDecoder, config: TinyVaeConfig) -> dict[str, torch.Tensor]:
    """A state dict in the release's fast_vae.pth layout: encoder.* and decoder.* keys."""
    encoder = {k: torch.randn(shape) for k, shape in encoder_shapes(config).items()}
    return {**encoder, **{k: v.clone() for k, v in decoder.state_dict().items()}}


def test_is_a_streaming_decoder(golden_decoder):
    assert isinstance(golden_decoder, StreamingDecoder)
    assert (golden_decoder.temporal_factor, golden_decoder.spatial_factor) == (4, 8)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_golden_latents_chunked_equal_whole_video(golden, golden_decoder, chunk):
    latents = golden.tensor("input/latents")
    whole = decode_all(golden_decoder, latents)
    chunked = decode_all(golden_decoder, latents, chunk=chunk)
    assert chunked.shape == whole.shape == (1, 3, 9, 64, 64)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, golden.tensor("output/video_need_scaled_false"), rtol=1e-4, atol=1e-4)


def test_irregular_chunks_trim_and_line_up():
    decoder = _random_decoder()
    torch.manual_seed(1)
    latents = torch.randn(2, 16, 7, 3, 2)
    whole = decode_all(decoder, latents)
    assert whole.shape == (2, 3, frames_for(7, 4), 24, 16)
    state, start = decoder.begin(2), 0
    for size in (1, 2, 3, 1):
        frames, state = decoder.decode(latents[:, :, start : start + size], state)
        lo, hi = output_span(start, size, decoder.temporal_factor)
        assert frames.shape[2] == hi - lo
        torch.testing.assert_close(frames, whole[:, :, lo:hi], rtol=0, atol=1e-5)
        start += size
    assert decoder.finish(state).shape == (2, 3, 0, 24, 16)
    # The raw stream (before the trim) is the same whatever the chunking.
    raw = decoder.decode_raw(latents, decoder.begin(2))
    state = decoder.begin(2)
    pieces = [decoder.decode_raw(latents[:, :, i : i + 2], state) for i in range(0, 7, 2)]
    torch.testing.assert_close(torch.cat(pieces, 2), raw, rtol=0, atol=1e-5)
    assert raw.shape[2] == 4 * 7


def test_concurrent_streams_keep_separate_state():
    decoder = _random_decoder()
    torch.manual_seed(2)
    a, b = torch.randn(1, 16, 4, 2, 2), torch.randn(1, 16, 4, 2, 2)
    sa, sb = decoder.begin(1), decoder.begin(1)
    out_a, out_b = [], []
    for i in range(4):
        out_a.append(decoder.decode(a[:, :, i : i + 1], sa)[0])
        out_b.append(decoder.decode(b[:, :, i : i + 1], sb)[0])
    torch.testing.assert_close(torch.cat(out_a, 2), decode_all(decoder, a), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(out_b, 2), decode_all(decoder, b), rtol=0, atol=1e-5)


def test_streaming_state_does_not_grow_with_video_length():
    decoder = _random_decoder()
    torch.manual_seed(3)

    def state_sizes(latent_frames: int) -> list[int]:
        latents = torch.randn(1, 16, latent_frames, 2, 2)
        state, sizes = decoder.begin(1), []
        for i in range(latent_frames):
            decoder.decode(latents[:, :, i : i + 1], state)
            sizes.append(state.nbytes())
        return sizes

    short, long = state_sizes(3), state_sizes(15)
    # One frame per MemBlock from the first chunk on; 5x longer video, same bytes.
    assert len(set(short + long)) == 1 and short[0] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_peak_gpu_memory_does_not_grow_with_video_length():
    decoder = _random_decoder().cuda()

    def peak(latent_frames: int) -> int:
        latents = torch.randn(1, 16, latent_frames, 8, 8, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        state = decoder.begin(1)
        for i in range(latent_frames):
            frames, state = decoder.decode(latents[:, :, i : i + 1], state)
            del frames
        decoder.finish(state)
        return torch.cuda.max_memory_allocated() - base

    peak(2)
    assert peak(15) <= peak(3) * 1.05


def test_need_scaled_denormalises_first(golden):
    latents = golden.tensor("input/latents")
    decoder = load_tiny_vae(
        golden.params(), dataclasses.replace(GOLDEN_CONFIG, need_scaled=True), dtype=torch.float32
    )
    torch.testing.assert_close(
        decode_all(decoder, latents, chunk=2),
        golden.tensor("output/video_need_scaled_true"),
        rtol=1e-4,
        atol=1e-4,
    )


def test_loads_fast_vae_layout_and_ignores_the_encoder(tmp_path):
    decoder = _random_decoder()
    path = tmp_path / "fast_vae.pth"
    torch.save(_fast_vae_file(decoder, SMALL), path)
    loaded = load_tiny_vae(path, SMALL, dtype=torch.float32)
    assert not any(k.startswith("encoder.") for k in loaded.state_dict())
    latents = torch.randn(1, 16, 2, 2, 2)
    torch.testing.assert_close(decode_all(loaded, latents), decode_all(decoder, latents), rtol=0, atol=0)
    bf16 = load_tiny_vae(path, SMALL)  # the production dtype
    assert bf16.dtype == torch.bfloat16 and decode_all(bf16, latents).dtype == torch.float32


def test_tgrow_patch_keeps_the_last_output_channels(tmp_path):
    full = _random_decoder()
    path = tmp_path / "fast_vae.pth"
    torch.save(_fast_vae_file(full, SMALL), path)
    reduced = dataclasses.replace(SMALL, time_upscale=(False, True))
    loaded = load_tiny_vae(path, reduced, dtype=torch.float32)
    width = SMALL.decoder_widths[1]
    torch.testing.assert_close(loaded.decoder[13].conv.weight, full.decoder[13].conv.weight[-width:])
    assert loaded.temporal_factor == 2
    assert decode_all(loaded, torch.randn(1, 16, 3, 2, 2)).shape[2] == frames_for(3, 2)


def test_wrong_files_fail_clearly(tmp_path):
    wan = tmp_path / "Wan2.1_VAE.pth"  # the other VAE file of the release
    torch.manual_seed(0)
    torch.save(WanVAE(WanVaeConfig(base_channels=2, channel_multipliers=(1, 1, 1, 1))).state_dict(), wan)
    with pytest.raises(CheckpointError, match="not a TAEHV tiny VAE checkpoint"):
        load_tiny_vae(wan, SMALL)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth"):
        load_tiny_vae(text, SMALL)
    wider = tmp_path / "wider.pth"
    torch.save(_fast_vae_file(_random_decoder(GOLDEN_CONFIG), GOLDEN_CONFIG), wider)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_tiny_vae(wider, SMALL)
    incomplete = tmp_path / "incomplete.pth"
    state = _fast_vae_file(_random_decoder(), SMALL)
    del state["decoder.22.bias"]
    torch.save(state, incomplete)
    with pytest.raises(CheckpointMismatchError, match=r"decoder\.22\.bias"):
        load_tiny_vae(incomplete, SMALL)


def test_real_bf16_latents_decode_to_the_right_shapes(shared_dir):
    latents = torch.load(
        shared_dir / "data/latents/taehv_test_latents_wan.pth", weights_only=True, map_location="cpu"
    )
    assert latents.shape == (1, 16, 16, 40, 64) and latents.dtype == torch.bfloat16
    decoder = _random_decoder(TinyVaeConfig(decoder_widths=(4, 4, 2, 2)))
    latents = latents[:, :, :, :20, :32]  # every frame, a quarter of the picture (CPU time)
    state, total = decoder.begin(1), 0
    for start in range(0, 16, 5):
        frames, state = decoder.decode(latents[:, :, start : start + 5], state)
        assert frames.dtype == torch.float32 and frames.shape[3:] == (160, 256)
        assert frames.abs().max() <= 1.0
        total += frames.shape[2]
    assert total == frames_for(16, 4) == 61


def test_manifest_and_expected_state_dict(shared_dir):
    manifest = json.loads((shared_dir / "golden/manifests/tiny_vae.json").read_text())
    expected = json.loads((shared_dir / "weights/taew2_1_expected_state_dict.json").read_text())["keys"]
    shapes = manifest_shapes(manifest)
    assert shapes == {k: tuple(v) for k, v in manifest["keys"].items()}
    assert shapes == {k: tuple(v) for k, v in expected.items()}
    with torch.device("meta"):
        decoder = TinyVaeDecoder(TinyVaeConfig.taew2_1())
    assert sum(p.numel() for p in decoder.parameters()) == 9844611

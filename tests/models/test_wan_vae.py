"""Wan 2.1 VAE: streaming decode equals whole-video decode, bounded state, causal encoder, loading."""

from __future__ import annotations

import pytest
import torch

from flashportrait.golden import GoldenCase
from flashportrait.models.decoding import (
    StreamingDecoder,
    decode_all,
    frames_for,
    latent_frame_of,
    output_span,
)
from flashportrait.models.wan_vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    WanVAE,
    WanVaeConfig,
    load_wan_vae,
    manifest_shapes,
)
from flashportrait.weights import CheckpointError, CheckpointMismatchError

GOLDEN_CONFIG = WanVaeConfig(base_channels=8)  # the golden case: real topology, base width 8
# Small and fast on a CPU, still with a channel change after each upsampling level.
SMALL = WanVaeConfig(base_channels=4, channel_multipliers=(1, 1, 1, 1), res_blocks_per_level=1)


@pytest.fixture(scope="module")
def golden(golden_dir) -> GoldenCase:
    return GoldenCase.load(golden_dir / "wan_vae_tiny.json")


@pytest.fixture(scope="module")
def golden_vae(golden) -> WanVAE:
    return load_wan_vae(golden.params(), GOLDEN_CONFIG, dtype=torch.float32)


def _random_vae(config: WanVaeConfig = SMALL, seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so a wrong gamma shape or order would show
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return vae


def _decode_raw_chunks(vae: WanVAE, latents: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state = vae.begin(latents.shape[0])
    z = vae.denormalize(latents)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(vae.decode_raw(z[:, :, start : start + size], state))
        start += size
    assert start == latents.shape[2]
    return torch.cat(pieces, dim=2)


def test_is_a_streaming_decoder(golden_vae):
    assert isinstance(golden_vae, StreamingDecoder)
    assert (golden_vae.temporal_factor, golden_vae.spatial_factor) == (4, 8)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_golden_latents_chunked_equal_whole_video(golden, golden_vae, chunk):
    latents = golden.tensor("input/latents")
    whole = decode_all(golden_vae, latents)
    chunked = decode_all(golden_vae, latents, chunk=chunk)
    assert chunked.shape == whole.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, golden.tensor("output/dec_video"), rtol=5e-5, atol=5e-5)


def test_irregular_chunks_equal_whole_video_and_frames_line_up():
    vae = _random_vae()
    torch.manual_seed(1)
    latents = torch.randn(2, 16, 7, 2, 3)
    whole = _decode_raw_chunks(vae, latents, [7])
    assert whole.shape == (2, 3, frames_for(7, 4), 16, 24)
    torch.testing.assert_close(_decode_raw_chunks(vae, latents, [1, 2, 3, 1]), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(_decode_raw_chunks(vae, latents, [3, 4]), whole, rtol=0, atol=1e-5)
    # Each chunk yields exactly the frames `output_span` names, matching the whole video there.
    state, start = vae.begin(2), 0
    for size in (2, 1, 4):
        frames, state = vae.decode(latents[:, :, start : start + size], state)
        lo, hi = output_span(start, size, vae.temporal_factor)
        assert frames.shape[2] == hi - lo
        torch.testing.assert_close(frames, whole[:, :, lo:hi].clamp(-1, 1), rtol=0, atol=1e-5)
        assert {latent_frame_of(j, 4) for j in range(lo, hi)} == set(range(start, start + size))
        start += size
    assert vae.finish(state).shape == (2, 3, 0, 16, 24)
    with pytest.raises(RuntimeError, match="finished"):
        vae.decode(latents[:, :, :1], state)


def test_concurrent_streams_keep_separate_state():
    vae = _random_vae()
    torch.manual_seed(2)
    a, b = torch.randn(1, 16, 4, 2, 2), torch.randn(1, 16, 4, 2, 2)
    sa, sb = vae.begin(1), vae.begin(1)
    out_a, out_b = [], []
    for i in range(4):  # interleaved, one latent frame at a time
        out_a.append(vae.decode(a[:, :, i : i + 1], sa)[0])
        out_b.append(vae.decode(b[:, :, i : i + 1], sb)[0])
    torch.testing.assert_close(torch.cat(out_a, 2), decode_all(vae, a), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(out_b, 2), decode_all(vae, b), rtol=0, atol=1e-5)


def test_streaming_state_does_not_grow_with_video_length():
    vae = _random_vae()
    torch.manual_seed(3)

    def state_sizes(latent_frames: int) -> list[int]:
        latents = torch.randn(1, 16, latent_frames, 2, 2)
        state, sizes = vae.begin(1), []
        for i in range(latent_frames):
            vae.decode(latents[:, :, i : i + 1], state)
            sizes.append(state.nbytes())
        return sizes

    short, long = state_sizes(3), state_sizes(15)
    # After the first two frames every cache slot holds its final 2 frames; 5x longer, same bytes.
    assert max(long) == max(short) == short[-1] == long[-1] > 0
    assert len(set(long[1:])) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_peak_gpu_memory_does_not_grow_with_video_length():
    vae = _random_vae().cuda()

    def peak(latent_frames: int) -> int:
        latents = torch.randn(1, 16, latent_frames, 8, 8, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        state = vae.begin(1)
        for i in range(latent_frames):
            frames, state = vae.decode(latents[:, :, i : i + 1], state)
            del frames  # a streaming caller sends and drops each chunk
        vae.finish(state)
        return torch.cuda.max_memory_allocated() - base

    peak(2)  # warm-up (cuDNN workspaces)
    assert peak(15) <= peak(3) * 1.05


def test_encoder_matches_reference_chunking_and_is_causal(golden, golden_vae):
    video = golden.tensor("input/video")  # [1, 3, 9, 32, 32]
    latents = golden_vae.encode(video)
    torch.testing.assert_close(latents, golden.tensor("output/enc_latent_mode"), rtol=5e-5, atol=2e-5)
    # Causal: the first 5 frames alone give the first 2 latent frames.
    torch.testing.assert_close(golden_vae.encode(video[:, :, :5]), latents[:, :, :2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="1\\+4k"):
        golden_vae.encode(video[:, :, :4])


def test_normalisation_round_trip_and_constants():
    vae = _random_vae()
    mu = torch.randn(2, 16, 3, 2, 2)
    torch.testing.assert_close(vae.denormalize(vae.normalize(mu)), mu, rtol=1e-6, atol=1e-6)
    expected = (mu - torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)) / torch.tensor(LATENTS_STD).view(
        1, -1, 1, 1, 1
    )
    torch.testing.assert_close(vae.normalize(mu), expected, rtol=1e-6, atol=1e-6)


def test_loads_release_and_wrapper_layouts(tmp_path):
    vae = _random_vae()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    release = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, release)  # the release file: keys without the wrapper's `model.`
    wrapper = tmp_path / "wrapper.pth"
    torch.save({"model." + k: v for k, v in state.items()}, wrapper)
    torch.manual_seed(4)
    latents = torch.randn(1, 16, 3, 2, 2)
    expected = decode_all(vae, latents)
    for path in (release, wrapper):
        loaded = load_wan_vae(path, SMALL, dtype=torch.float32)
        torch.testing.assert_close(decode_all(loaded, latents), expected, rtol=0, atol=0)
    bf16 = load_wan_vae(release, SMALL)  # the production dtype
    assert bf16.dtype == torch.bfloat16 and decode_all(bf16, latents).dtype == torch.float32


def test_wrong_files_fail_clearly(tmp_path):
    other = tmp_path / "fast_vae.pth"
    torch.save(
        {"decoder.1.weight": torch.zeros(4, 16, 3, 3), "encoder.0.weight": torch.zeros(4, 3, 3, 3)}, other
    )
    with pytest.raises(CheckpointError, match=r"not a Wan 2\.1 VAE checkpoint"):
        load_wan_vae(other, SMALL)
    wrong_size = tmp_path / "wrong.pth"
    torch.save(_random_vae(WanVaeConfig(base_channels=2)).state_dict(), wrong_size)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_wan_vae(wrong_size, SMALL)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_wan_vae(tmp_path / "missing.pth", SMALL)


def test_real_bf16_latents_decode_to_the_right_shapes(shared_dir):
    latents = torch.load(
        shared_dir / "data/latents/taehv_test_latents_wan.pth", weights_only=True, map_location="cpu"
    )
    assert latents.shape == (1, 16, 16, 40, 64) and latents.dtype == torch.bfloat16
    vae = _random_vae(WanVaeConfig(base_channels=2, channel_multipliers=(1, 1, 1, 1)))
    frames = decode_all(vae, latents[:, :, :4, :10, :16], chunk=3)  # a crop (CPU time)
    assert frames.shape == (1, 3, 13, 80, 128) and frames.dtype == torch.float32
    assert torch.isfinite(frames).all() and frames.abs().max() <= 1.0


def test_manifest_shapes_has_the_wrapper_prefix(shared_dir):
    import json

    manifest = json.loads((shared_dir / "golden/manifests/wan_vae.json").read_text())
    shapes = manifest_shapes(manifest)
    assert shapes == {k: tuple(v) for k, v in manifest["keys"].items()}
    assert all(k.startswith("model.") for k in shapes)

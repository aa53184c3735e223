"""Portrait encoder: loading `portrait_encoder.pt` in the release layout, strictness, and the token split."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashportrait.config import from_mapping
from flashportrait.models.emo_split import (
    EmotionSplitError,
    emotion_token_ranges,
    plan_emotion_split,
    split_emotion_tokens,
)
from flashportrait.models.portrait_encoder import (
    PortraitEncoder,
    PortraitEncoderConfig,
    load_portrait_encoder,
    manifest_shapes,
)
from flashportrait.weights import CheckpointMismatchError


@pytest.fixture(scope="module")
def golden(golden_dir):
    from flashportrait.golden import GoldenCase

    return GoldenCase.load(golden_dir / "portrait_encoder_tiny.json")


@pytest.fixture(scope="module")
def tiny_config(golden) -> PortraitEncoderConfig:
    neutral = {k: v for k, v in golden.config["neutral"].items() if k != "tokens_per_frame"}
    return from_mapping(PortraitEncoderConfig, neutral)


@pytest.fixture(scope="module")
def release_dict(golden) -> dict[str, torch.Tensor]:
    """The flat, prefixed dict `portrait_encoder.pt` holds."""
    return {k: v.clone() for k, v in golden.params().items()}


def test_release_pt_gives_golden_tokens(tmp_path, golden, tiny_config, release_dict):
    path = tmp_path / "portrait_encoder.pt"
    torch.save(release_dict, path)
    model = load_portrait_encoder(path, tiny_config)
    with torch.no_grad():
        tokens = model(golden.tensor("input/head_emo_feat"))
    expected = golden.tensor("output/adapter_proj")
    assert tokens.shape == expected.shape
    torch.testing.assert_close(tokens, expected, rtol=2e-5, atol=1e-4)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_keys_outside_the_submodules_are_ignored(tmp_path, golden, tiny_config, release_dict):
    path = tmp_path / "portrait_encoder.pt"
    torch.save({**release_dict, "optimizer_step": torch.tensor(3)}, path)
    model = load_portrait_encoder(path, tiny_config)
    torch.testing.assert_close(model.proj_model.norm.weight, release_dict["proj_model.norm.weight"])


def test_missing_and_renamed_keys_are_named(tmp_path, tiny_config, release_dict):
    broken = dict(release_dict)
    broken["mouth_proj_model.layers.1.0.to_q.weights"] = broken.pop("mouth_proj_model.layers.1.0.to_q.weight")
    del broken["emo_proj_model.latents"]
    path = tmp_path / "portrait_encoder.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_portrait_encoder(path, tiny_config)
    message = str(info.value)
    assert "emo_proj_model.latents" in message
    assert "mouth_proj_model.layers.1.0.to_q.weight" in message
    assert "mouth_proj_model.layers.1.0.to_q.weights" in message
    assert set(info.value.report.missing) == {
        "emo_proj_model.latents",
        "mouth_proj_model.layers.1.0.to_q.weight",
    }


def test_wrong_size_is_named(tiny_config, release_dict):
    from flashportrait.weights import InMemorySource

    broken = dict(release_dict, **{"proj_model.eye_proj.weight": torch.zeros(2048, 7)})
    with pytest.raises(CheckpointMismatchError, match=r"proj_model\.eye_proj\.weight"):
        load_portrait_encoder(InMemorySource(broken), tiny_config)


def test_parameter_names_are_the_release_keys(golden, tiny_config):
    model = PortraitEncoder(tiny_config)
    assert set(model.state_dict()) == set(golden.params())


def test_full_size_matches_the_manifest(shared_dir):
    manifest = json.loads((shared_dir / "golden/manifests/portrait_encoder.json").read_text())
    ours = manifest_shapes(manifest)
    assert ours == {k: tuple(v) for k, v in manifest["keys"].items()}
    assert sum(torch.Size(s).numel() for s in ours.values()) == manifest["num_parameters"]


def test_token_order_per_frame(tiny_config):
    """Changing one frame's mouth feature changes only that frame's mouth tokens and its mouth proj token."""
    torch.manual_seed(0)
    model = PortraitEncoder(tiny_config).eval()
    features = torch.randn(1, 3, 554)
    changed = features.clone()
    changed[0, 1, -512:] += 1.0
    with torch.no_grad():
        diff = (model(changed) - model(features)).abs().sum(-1)[0]
    touched = torch.nonzero(diff > 0).flatten().tolist()
    # frame 1 occupies tokens 24..47: [headpose, eye, emo, mouth] proj tokens, 16 mouth, 4 emo tokens.
    assert touched == [24 + 3, *range(24 + 4, 24 + 20)]


def _naive_split(tokens: torch.Tensor, frames: int, expand: int) -> tuple[torch.Tensor, list[int]]:
    """split_tensor_with_padding as the reference describes it: slice, then append all padding."""
    _, length, d = tokens.shape
    chunks, lens = [], []
    for start, end in emotion_token_ranges(length, frames):
        s, e = start - expand, end + expand
        piece = tokens[:, max(s, 0) : min(e, length - 1) + 1]
        pad = (e - s + 1) - piece.shape[1]
        chunks.append(torch.cat([piece, tokens.new_zeros(1, pad, d)], dim=1))
        lens.append(piece.shape[1])
    return torch.stack(chunks, dim=1), lens


@settings(max_examples=40, deadline=None)
@given(frames=st.integers(5, 130), tpf=st.sampled_from([24, 6, 7]), expand=st.integers(0, 3))
def test_vectorised_split_equals_slicing(frames, tpf, expand):
    tokens = torch.arange(frames * tpf * 2, dtype=torch.float32).reshape(1, frames * tpf, 2) + 1
    ours, lens = split_emotion_tokens(tokens, frames, expand_length=expand)
    expected, expected_lens = _naive_split(tokens, frames, expand)
    assert torch.equal(ours, expected)
    assert lens.tolist() == expected_lens
    assert ours.shape[1] == (frames - 1) // 4 + 1


def test_chunk_composition_quirk_24():
    frames, tpf = 9, 24
    tokens = torch.arange(frames * tpf, dtype=torch.float32).reshape(1, -1, 1) + 1  # token t has value t+1
    chunks, lens = split_emotion_tokens(tokens, frames)
    assert chunks.shape == (1, 3, 97, 1)
    assert lens.tolist() == [24, 97, 97]
    values = chunks[0, :, :, 0] - 1
    assert values[0, :24].tolist() == list(range(24)) and (chunks[0, 0, 24:] == 0).all()
    # chunk 1: the last token of frame 0, then frames 1..4
    assert values[1].tolist() == list(range(23, 23 + 97))
    assert values[2, 0].item() == 4 * tpf * 1 + 23


def test_batch_and_plan_reuse():
    plan = plan_emotion_split(21 * 24, 21)
    tokens = torch.randn(2, 21 * 24, 5)
    chunks, _ = split_emotion_tokens(tokens, 21, plan=plan)
    for b in range(2):
        single, _ = split_emotion_tokens(tokens[b : b + 1], 21)
        assert torch.equal(chunks[b : b + 1], single)
    with pytest.raises(EmotionSplitError):
        split_emotion_tokens(tokens[:, :240], 10, plan=plan)


@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_too_few_frames_is_a_clear_error(frames):
    with pytest.raises(EmotionSplitError, match="at least 5 frames"):
        split_emotion_tokens(torch.zeros(1, frames * 24, 4), frames)

"""The window plan: the reference's plan where it is defined, our short-video plan where it is not."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashportrait.sampling.windows import (
    find_replacement,
    frame_counts,
    latent_length_for,
    pipeline_num_frames,
    plan_windows,
    reference_context_step,
    reference_emo_slice,
    reference_windows,
    scaled_image_size,
)


def test_frame_rounding_matches_the_reference_rules():
    assert [find_replacement(n) for n in (-3, 0, 1, 4, 5, 8, 9, 80, 81, 84, 85, 15000)] == [
        0,
        0,
        1,
        1,
        5,
        5,
        9,
        77,
        81,
        81,
        85,
        14997,
    ]
    assert pipeline_num_frames(0) == -3  # Python floor division, as the pipeline computes it
    assert pipeline_num_frames(77) == 77
    assert pipeline_num_frames(80) == 77
    assert latent_length_for(201) == 51
    with pytest.raises(ValueError):
        latent_length_for(200)


def test_frame_counts_of_a_driving_video():
    counts = frame_counts(15000)
    assert (counts.num_frames, counts.latent_length, counts.output_frames) == (14997, 3750, 14996)
    counts = frame_counts(15001)
    assert (counts.num_frames, counts.latent_length, counts.output_frames) == (15001, 3751, 15000)
    assert frame_counts(5).latent_length == 2
    with pytest.raises(ValueError, match="at least 5"):
        frame_counts(4)


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        ((540, 960), 720, (416, 720)),  # 405 rounded up
        ((1000, 999), 720, (720, 720)),  # 719 rounded up
        ((333, 500), 720, (480, 720)),  # upscaled, 479.52 truncated, rounded up
        ((1920, 1080), 512, (512, 288)),
    ],
)
def test_image_size_truncates_then_rounds_up_to_16(size, max_size, expected):
    assert scaled_image_size(*size, max_size) == expected


def test_reference_failure_modes():
    with pytest.raises(ValueError, match="must not be zero"):
        reference_windows(13, 51, 30)  # C/4 < N <= C/2: context_step 0
    assert reference_context_step(1, 21) == -3
    assert reference_windows(1, 21, 10) == [[0] * 21]  # negative step, wrapped
    assert reference_windows(13, 21, 10) == [list(range(5, 13)) + list(range(13))]  # duplicates


def test_the_tiny_pipeline_plan():
    plan = plan_windows(13, 7, 3)
    assert plan.windows() == [list(range(0, 7)), list(range(4, 11)), list(range(6, 13))]
    assert plan.overlaps == (0, 3, 5)
    assert plan.blend_weights(2).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert plan.feature_frames(1) == list(range(16, 41))
    assert not plan.short_video and plan.generated_length == 13


def test_blend_weights_are_float32_quotients():
    weights = plan_windows(25, 21, 10).blend_weights(1)  # overlap 17
    assert weights.dtype == torch.float32
    assert weights.tolist() == [float(torch.tensor(j / 16, dtype=torch.float32)) for j in range(17)]
    thirds = plan_windows(11, 7, 4).blend_weights(1)  # overlap 4: 1/3 is not exact in float32
    assert thirds[1].item() == float(torch.tensor(1 / 3, dtype=torch.float32))


@settings(max_examples=300, deadline=None)
@given(
    context=st.integers(2, 60),
    overlap_frac=st.floats(0, 0.95),
    extra=st.integers(0, 400),
)
def test_plan_is_the_reference_plan_for_long_videos(context, overlap_frac, extra):
    overlap = min(context - 1, int(context * overlap_frac))
    n = context + extra
    try:
        plan = plan_windows(n, context, overlap)
    except ValueError as exc:
        # Only an overlap of exactly one frame is refused (the reference divides by zero there).
        assert "one frame" in str(exc)
        windows = reference_windows(n, context, overlap)
        assert any(len(set(a) & set(b)) == 1 for a, b in itertools.pairwise(windows))
        return
    assert plan.windows() == reference_windows(n, context, overlap)
    assert not plan.short_video and plan.generated_length == n
    covered = set()
    for w, window in enumerate(plan.windows()):
        covered |= set(window)
        start, stop = reference_emo_slice(window)
        assert plan.feature_frames(w) == list(range(start, stop))
        assert len(plan.feature_frames(w)) == 4 * (context - 1) + 1
        if w:
            shared = set(window) & set(plan.windows()[w - 1])
            assert plan.overlaps[w] == len(shared)
            assert sorted(shared) == window[: len(shared)]  # the blend's alignment assumption
            if w < plan.num_windows - 1:
                assert plan.overlaps[w] == overlap
            else:
                assert plan.overlaps[w] >= overlap  # the replaced last window
    assert covered == set(range(n))
    assert plan.windows()[-1] == list(range(n - context, n))


@pytest.mark.parametrize(("n", "context"), [(2, 51), (13, 21), (20, 21), (25, 51), (50, 51), (3, 7)])
def test_short_videos_get_one_full_window_holding_the_last_driving_frame(n, context):
    plan = plan_windows(n, context, context // 2)
    assert plan.short_video
    assert plan.windows() == [list(range(context))]
    assert (plan.latent_length, plan.generated_length) == (n, context)
    features = plan.feature_frames(0)
    last = 4 * (n - 1)
    assert len(features) == 4 * (context - 1) + 1
    assert features == list(range(last + 1)) + [last] * (4 * (context - n))


def test_invalid_requests_are_clear_errors():
    with pytest.raises(ValueError, match="at least 5"):
        plan_windows(1, 21, 10)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(100, 21, 21)
    with pytest.raises(ValueError, match="one frame"):
        plan_windows(100, 21, 1)
    with pytest.raises(IndexError):
        plan_windows(13, 7, 3).last_window_covering(13)


def test_last_window_covering():
    plan = plan_windows(13, 7, 3)
    assert [plan.last_window_covering(f) for f in range(13)] == [0] * 4 + [1] * 2 + [2] * 7

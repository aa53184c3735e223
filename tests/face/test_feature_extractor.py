"""The motion encoder exported as the `feature_extractor` (export/motion_encoder.py): ONNX Runtime
against PyTorch on real crops, dynamic batch, and TensorRT where it is installed.

Weights: the golden case `fan_encoder` (full-size FanEncoder, random weights in the release's key
layout). Crops: the face front end's crops of a real driving clip. Tolerance: the case's fp32 budget
per head (20x the reference's own fp32-vs-fp64 error), see `FP32_TOLERANCE`; measured max relative
error is ~1e-5.
"""

from __future__ import annotations

import importlib.util
from itertools import islice

import numpy as np
import pytest
import torch
from flashportrait.export.motion_encoder import (
    TensorRTUnavailable,
    build_tensorrt_engine,
    compare_features,
    export_onnx,
    onnx_crop_encoder,
    onnx_features,
    reference_features,
    torch_crop_encoder,
)

from flashportrait.face.video import VideoReader
from flashportrait.golden import GoldenCase
from flashportrait.models.motion_encoder import load_motion_encoder


@pytest.fixture(scope="module")
def encoder(golden_dir):
    return load_motion_encoder(GoldenCase.load(golden_dir / "fan_encoder.json").params())[0]


@pytest.fixture(scope="module")
def real_crops(front_end, data_dir) -> np.ndarray:
    with VideoReader(data_dir / "driving" / "liveportrait_d12.mp4") as video:
        return front_end.align_frames(islice(video, 3)).crops


@pytest.fixture(scope="module")
def reference(encoder, real_crops) -> np.ndarray:
    return reference_features(encoder, real_crops)


@pytest.fixture(scope="module")
def exported(encoder, tmp_path_factory):
    return export_onnx(encoder, tmp_path_factory.mktemp("fx") / "model.onnx")


def test_onnx_matches_pytorch_on_real_crops(exported, real_crops, reference):
    parity = compare_features(onnx_features(exported, real_crops), reference)
    assert parity.passed, "\n".join(parity.lines())
    assert max(parity.max_rel.values()) < 1e-4, "\n".join(parity.lines())


def test_features_of_a_clip_through_the_exported_encoder(front_end, encoder, exported, data_dir):
    from dataclasses import replace

    from flashportrait.face.pipeline import FaceFrontEnd

    short = FaceFrontEnd(
        replace(front_end.config, max_frames=3, encoder_batch=2), front_end.detector, front_end.landmarks
    )
    path = data_dir / "driving" / "liveportrait_d19.mp4"
    features = short.extract_features(path, onnx_crop_encoder(exported))
    crops = short.align_video(path).crops
    assert features.features.shape == (3, 554) and features.mask.all()
    parity = compare_features(features.features, reference_features(encoder, crops))
    assert parity.passed, "\n".join(parity.lines())
    torch_features = short.extract_features(path, torch_crop_encoder(encoder))
    np.testing.assert_allclose(torch_features.features, features.features, rtol=1e-4, atol=1e-3)


def test_dynamic_batch(exported, real_crops):
    together = onnx_features(exported, real_crops)
    alone = np.concatenate([onnx_features(exported, real_crops[i : i + 1]) for i in range(len(real_crops))])
    assert together.shape == (len(real_crops), 554)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_float_input_variant(encoder, real_crops, tmp_path):
    from flashportrait.face.warp import encoder_input

    path = export_onnx(encoder, tmp_path / "float.onnx", input_format="float")
    parity = compare_features(
        onnx_features(path, encoder_input(real_crops)), reference_features(encoder, real_crops)
    )
    assert parity.passed, "\n".join(parity.lines())


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_is_a_clear_error(exported, tmp_path):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_tensorrt_engine(exported, tmp_path / "model.plan")


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="needs TensorRT and CUDA",
)
def test_tensorrt_fp16_engine(exported, real_crops, reference, tmp_path):
    from flashportrait.export.motion_encoder import TensorRTFeatureExtractor

    plan = build_tensorrt_engine(exported, tmp_path / "model.plan", min_batch=1, opt_batch=4, max_batch=8)
    run = TensorRTFeatureExtractor(plan)
    ours = run(torch.from_numpy(real_crops).cuda()).cpu().numpy()
    # fp16 engine: per head, normwise relative error under 3e-2 (fp16 rounding is 2^-11 per op; a wrong
    # layout or preprocessing gives errors of order 1).
    for head, lo, hi in (("headpose", 0, 6), ("eye", 6, 12), ("emotion", 12, 42), ("mouth", 42, 554)):
        error = np.linalg.norm(ours[:, lo:hi] - reference[:, lo:hi]) / np.linalg.norm(reference[:, lo:hi])
        assert error < 3e-2, f"{head}: normwise relative error {error:.3g}"

"""PD-FGC motion encoder: pd_fpg.pth loading (strict, with report), golden outputs, ONNX export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from flashportrait.golden import GoldenCase
from flashportrait.models.motion_encoder import MotionFeatures, load_motion_encoder
from flashportrait.weights import CheckpointMismatchError, InMemorySource

GOLDEN_NAMES = dict(
    zip(MotionFeatures._fields, ("headpose_emb", "eye_embed", "emo_embed", "mouth_feat"), strict=True)
)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return GoldenCase.load(golden_dir / "fan_encoder.json")


@pytest.fixture(scope="module")
def release_sd(golden) -> dict[str, torch.Tensor]:
    # pd_fpg.pth holds exactly the FanEncoder state dict (no prefix); the golden stores it in fp16
    params = golden.params()
    return {k: params[k].clone() for k in params}


@pytest.fixture(scope="module")
def model(tmp_path_factory, release_sd):
    path = tmp_path_factory.mktemp("fpg") / "pd_fpg.pth"
    torch.save(release_sd, path)
    encoder, report = load_motion_encoder(path)
    assert report.ok and report.loaded == len(release_sd)
    return encoder


def _assert_golden(features: MotionFeatures, golden: GoldenCase) -> None:
    for field, name in GOLDEN_NAMES.items():
        rtol, atol = golden.rtol_atol(name)
        torch.testing.assert_close(
            getattr(features, field), golden.tensor(f"output/{name}"), rtol=rtol, atol=atol
        )


def test_release_pth_gives_golden_outputs(model, golden):
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    crops = golden.tensor("input/face_crops")
    with torch.no_grad():
        out = model(crops)
    _assert_golden(out, golden)
    flat = out.concatenated()
    assert flat.shape == (crops.shape[0], 554)
    torch.testing.assert_close(flat[:, 12:42], out.emotion)


def test_counters_may_be_absent(release_sd, model):
    # eval-mode BatchNorm never reads num_batches_tracked; an older file may lack the counters
    sd = {k: v for k, v in release_sd.items() if not k.endswith("num_batches_tracked")}
    encoder, report = load_motion_encoder(InMemorySource(sd))
    assert report.ok and report.loaded == len(sd)
    ours, loaded = encoder.state_dict(), model.state_dict()
    assert ours.keys() == loaded.keys()
    assert all(torch.equal(ours[k], loaded[k]) for k in ours if not k.endswith("num_batches_tracked"))
    assert encoder.to_emo[2].num_batches_tracked.device.type == "cpu"


@pytest.mark.parametrize(
    ("damage", "key", "message"),
    [
        ("missing", "to_mouth.2.running_var", "missing"),
        ("missing", "mouth_embed.1.weight", "missing"),
        ("unexpected", "module.model.conv1.weight", "unexpected"),
        ("shape", "emo_embed.1.weight", "shape mismatch"),
    ],
)
def test_wrong_file_names_the_keys(release_sd, damage, key, message):
    sd = dict(release_sd)
    if damage == "missing":
        del sd[key]
    elif damage == "unexpected":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(64, 512)
    with pytest.raises(CheckpointMismatchError, match=message) as info:
        load_motion_encoder(InMemorySource(sd))
    assert key in str(info.value)


def test_onnx_export_with_dynamic_batch_matches_golden(model, golden, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "motion_encoder.onnx"
    crops = golden.tensor("input/face_crops")
    names = list(MotionFeatures._fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model,
            (crops,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["crops"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["crops", *names]},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    assert session.get_inputs()[0].shape == ["batch", 3, 224, 224]
    # the golden batch of 2 and a batch of 1 through the same graph (dynamic batch axis); eval-mode
    # BatchNorm makes every crop independent of the others.
    # Tolerance: the golden's (20x the fp32-vs-fp64 error of this network); ONNX Runtime's kernels
    # only reorder float32 sums.
    for rows in (slice(0, 2), slice(1, 2)):
        got = session.run(None, {"crops": crops[rows].numpy()})
        for field, value in zip(names, got, strict=True):
            name = GOLDEN_NAMES[field]
            rtol, atol = golden.rtol_atol(name)
            np.testing.assert_allclose(
                value, golden.tensor(f"output/{name}")[rows].numpy(), rtol=rtol, atol=atol
            )

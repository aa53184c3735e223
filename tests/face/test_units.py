"""Unit checks of the pieces the golden case does not cover: batched sessions, gap filling, the
smoother's NaN-free static frames, the tracker's box IoU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flashportrait.face.gaps import fill_stream, nearest_face_sources
from flashportrait.face.runtime import create_session, dynamic_batch
from flashportrait.face.smoothing import Smoother222
from flashportrait.face.tracking import box_iou


@pytest.mark.parametrize(("model", "shape"), [("face_det", (3, 272, 160)), ("face_landmark", (3, 128, 128))])
def test_batched_session_is_bit_identical_to_the_release_model(weights_dir, model, shape):
    path = weights_dir / f"{model}.onnx"
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batched = create_session(path)
    x = np.random.default_rng(0).random((5, *shape), dtype=np.float32)
    name = original.get_inputs()[0].name
    together = batched.run(None, {name: x})
    for i in range(len(x)):
        alone = original.run(None, {name: x[i : i + 1]})
        for ours, theirs in zip(together, alone, strict=True):
            np.testing.assert_array_equal(ours[i : i + 1], theirs)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # file untouched
    assert (
        dynamic_batch(onnx.load(str(path))).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    )


def test_nearest_face_sources_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(500):
        mask = rng.random(int(rng.integers(1, 25))) < rng.random()
        if not mask.any():
            with pytest.raises(ValueError):
                nearest_face_sources(mask)
            continue
        faces = np.flatnonzero(mask)
        brute = [int(faces[np.argmin(np.abs(faces - t))]) for t in range(len(mask))]  # earlier on ties
        streamed = [item.source for item in fill_stream([i if m else None for i, m in enumerate(mask)])]
        assert nearest_face_sources(mask).tolist() == brute == streamed


def test_smoother_holds_still_parts_without_nan():
    rng = np.random.default_rng(2)
    base = (rng.random((222, 2)) * 200 + 100).astype(np.float32)
    smoother = Smoother222()
    outputs = [smoother.smooth(base, 300.0)]
    outputs.append(smoother.smooth(base.copy(), 300.0))  # identical frame: the reference gives NaN
    moved = base.copy()
    moved[:9] += 3.0  # contour points outside the part's deciding points 9..23 move alone
    outputs.append(smoother.smooth(moved, 300.0))
    outputs.append(smoother.smooth(moved + 0.5, 300.0))  # then everything moves
    assert all(np.isfinite(o).all() for o in outputs)
    np.testing.assert_array_equal(outputs[1], base)
    np.testing.assert_array_equal(outputs[2][:33], base[:33])  # still part: held (the limit fcmin -> 0)
    np.testing.assert_array_equal(outputs[2][33:], base[33:])
    assert not np.array_equal(outputs[3], outputs[2])


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0

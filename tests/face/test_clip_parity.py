"""Our per-frame face boxes and 222 landmarks against the reference's, on the real driving clips.

`shared/data/face_goldens/<clip>_det_landmarks.npz` holds the reference's `det_landmarks` output
(FlashPortrait's own code, ONNX Runtime CPU, frames read with OpenCV) for every frame of each clip.
We decode with PyAV (bit-identical frames, see test_video.py) and run the same models on the same
runtime, so the results should be exact; the tolerance (1e-3 px) only allows for last-bit
differences of another CPU's SIMD path. On a GPU (CUDA EP) expect differences of a few pixels.

Every frame of all five clips is checked (1,029 frames; about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from flashportrait.face.video import VideoReader, read_image

TOLERANCE_PX = 1e-3
CLIPS = ("liveportrait_d0", "liveportrait_d12", "liveportrait_d20", "liveportrait_d19", "liveportrait_d13")


def _worst(name: str, ours: np.ndarray, golden: np.ndarray) -> tuple[float, str]:
    per_frame = np.abs(ours - golden).reshape(len(golden), -1).max(axis=1)
    frame = int(per_frame.argmax())
    return float(per_frame[frame]), f"{name}: worst frame {frame} differs by {per_frame[frame]:.3g} px"


@pytest.mark.parametrize("clip", CLIPS)
def test_clip_matches_reference_landmarks(front_end, data_dir, clip):
    golden = np.load(data_dir / "face_goldens" / f"{clip}_det_landmarks.npz")
    count = len(golden["landmarks"])  # the largest 4k+1 count, as the reference cut the clip
    with VideoReader(data_dir / "driving" / f"{clip}.mp4") as video:
        aligned = front_end.align_frames(islice(video, count), video.info)
    assert aligned.frame_count == count
    missing = np.flatnonzero(~aligned.mask).tolist()
    assert not missing, f"{clip}: no face found on frames {missing}"
    worst_points, message_points = _worst(f"{clip} landmarks", aligned.landmarks, golden["landmarks"][:count])
    worst_rects, message_rects = _worst(f"{clip} boxes", aligned.rects, golden["rects"][:count])
    assert worst_points <= TOLERANCE_PX, message_points
    assert worst_rects <= TOLERANCE_PX, message_rects
    assert np.array_equal(aligned.source, np.arange(count))
    assert aligned.crops.shape == (count, 224, 224, 3) and aligned.crops.dtype == np.uint8


def test_single_images_match_reference(front_end, data_dir):
    """Detector boxes/scores and one 3-iteration alignment from the detector box, on still images of
    several sizes and aspect ratios (index.json stores points rounded to 0.01 px, scores to 1e-4)."""
    index = json.loads((data_dir / "face_goldens" / "index.json").read_text())["images"]
    model = front_end.landmarks
    for name, expected in index.items():
        if not name.endswith((".jpg", ".png")):
            continue
        image = read_image(data_dir / name)
        assert list(image.shape[:2]) == expected["image_hw"], name
        found = front_end.detector.detect([image])[0]
        assert found.boxes.tolist() == expected["det_boxes"], name
        np.testing.assert_allclose(found.scores, expected["det_scores"], atol=1e-4, err_msg=name)
        if not expected["det_boxes"]:
            continue
        result = model.align([image], [model.initial_matrix(box=found.boxes[0])])[0]
        np.testing.assert_allclose(result.points, expected["pt222"], atol=0.006, err_msg=name)
        np.testing.assert_allclose(result.euler_rad, expected["euler_rad"], atol=1e-4, err_msg=name)
        np.testing.assert_allclose(result.prob, [expected["prob"]], atol=1e-4, err_msg=name)

"""Bounded memory: features of a 60-second video with at most ~2 chunks of frames alive at any time.

The synthetic video loops a real clip (downscaled) for 60 s. The detector and landmark nets are
replaced by fast stand-ins (the golden case's synthetic raw detector heads and a fixed landmark
template), so the test measures the streaming machinery (decode, batch, track, warp, fill, encode)
rather than the networks, whose memory does not depend on the video length. The frame rate is low
(4 fps, 240 frames) only to keep the test fast on 2 CPU cores: what is asserted, at most two chunks of
frames alive and a peak far below the decoded video's size, does not depend on the frame count.
`bench/face.py --long-seconds 60` measures the same with the real models at 25 fps.
"""

from __future__ import annotations

import tracemalloc
import weakref
from dataclasses import replace
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

from flashportrait.face import video as video_module
from flashportrait.face.detector import FaceDetector
from flashportrait.face.landmarks import LandmarkModel
from flashportrait.face.pipeline import FaceFrontEnd
from flashportrait.face.tracking import TrackerConfig
from flashportrait.face.video import VideoReader
from flashportrait.golden import GoldenCase

SECONDS, FPS, SIZE = 60, 4, 160


class _FixedHeads:
    """An ONNX-session stand-in returning the same raw detector heads for every frame of a batch."""

    def __init__(self, heads: list[np.ndarray]) -> None:
        self.heads = heads

    def get_inputs(self):
        return [SimpleNamespace(name="input.1")]

    def run(self, _outputs, feeds):
        (batch,) = feeds.values()
        return [np.repeat(head, len(batch), axis=0) for head in self.heads]


def _template_net(template: np.ndarray):
    flat = np.concatenate([template[:, 0], template[:, 1]])[None].astype(np.float32)

    def net(batch: np.ndarray):
        n = len(batch)
        return np.repeat(flat, n, 0), np.zeros((n, 2), np.float32), np.full((n, 1), 0.9, np.float32)

    return net


@pytest.fixture(scope="module")
def long_video(tmp_path_factory, data_dir):
    with VideoReader(data_dir / "driving" / "liveportrait_d0.mp4") as clip:
        frames = [cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f in clip]
    path = tmp_path_factory.mktemp("long") / "sixty_seconds.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i in range(SECONDS * FPS):
            picture = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="bgr24")
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_sixty_second_features_with_bounded_memory(front_end, golden_dir, long_video, monkeypatch):
    case = GoldenCase.load(golden_dir / "face_numeric.json")
    heads = [case.tensor(f"input/det_raw_scores_stride{s}").numpy() for s in (8, 16, 32)]
    heads += [case.tensor(f"input/det_raw_boxes_stride{s}").numpy() for s in (8, 16, 32)]
    template = case.tensor("input/align_template_normalised").numpy()
    # Small frames: the stand-in faces are under the tracker's default 96 px minimum.
    config = replace(front_end.config, chunk_frames=16, encoder_batch=32, tracker=TrackerConfig(min_face=16))
    fast = FaceFrontEnd(config, FaceDetector(_FixedHeads(heads)), LandmarkModel(_template_net(template)))

    alive = {"now": 0, "max": 0, "total": 0}

    def _gone() -> None:
        alive["now"] -= 1

    convert = video_module.VideoReader._convert

    def counting_convert(self, frame):
        array = convert(self, frame)
        alive["now"] += 1
        alive["total"] += 1
        alive["max"] = max(alive["max"], alive["now"])
        weakref.finalize(array, _gone)
        return array

    monkeypatch.setattr(video_module.VideoReader, "_convert", counting_convert)

    def encoder(crops: np.ndarray) -> np.ndarray:
        return np.repeat(crops.reshape(len(crops), -1).mean(axis=1, keepdims=True), 554, axis=1).astype(
            np.float32
        )

    def peak_of(front_end: FaceFrontEnd):
        tracemalloc.start()
        try:
            result = front_end.extract_features(long_video, encoder)
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short_frames = 10 * FPS  # the first 10 seconds, for reference
    _, short_peak = peak_of(
        FaceFrontEnd(replace(config, max_frames=short_frames), fast.detector, fast.landmarks)
    )
    alive.update(now=0, max=0, total=0)
    features, peak = peak_of(fast)

    frames = SECONDS * FPS
    assert features.features.shape == (frames, 554) and features.mask.all()
    assert features.info.fps == FPS and alive["total"] == frames
    # One chunk being processed plus the next one being decoded.
    assert alive["max"] <= 2 * config.chunk_frames + 1, f"{alive['max']} frames held at once"
    # Six times the frames, the same working memory: only the [N, 554] output grows with the length.
    allowed = 1.25 * short_peak + features.features.nbytes
    assert peak <= allowed, f"peak {peak / 2**20:.1f} MiB for 60 s vs {short_peak / 2**20:.1f} MiB for 10 s"

"""The streaming front end: no-face errors, frames without a face kept aligned and marked, chunks."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import numpy as np
import pytest

from flashportrait.face.errors import MediaError, NoFaceError
from flashportrait.face.pipeline import FaceFrontEnd
from flashportrait.face.video import VideoReader, read_image

BLANK = range(10, 15)  # frames blanked in the middle of the clip


@pytest.fixture(scope="module")
def d0_frames(data_dir) -> list[np.ndarray]:
    with VideoReader(data_dir / "driving" / "liveportrait_d0.mp4") as video:
        return list(islice(video, 30))


def _sharing(front_end: FaceFrontEnd, **changes) -> FaceFrontEnd:
    return FaceFrontEnd(replace(front_end.config, **changes), front_end.detector, front_end.landmarks)


def test_no_face_image_is_a_no_face_error(front_end, data_dir):
    image = read_image(data_dir / "negative" / "liveportrait_s36_alpaca.jpg")
    with pytest.raises(NoFaceError, match="no face found in the image"):
        front_end.align_image(image)


def test_no_frames_is_a_media_error(front_end):
    with pytest.raises(MediaError, match="no frames"):
        front_end.align_frames([])


def test_no_face_video_is_a_no_face_error(front_end, data_dir):
    short = _sharing(front_end, max_frames=6)
    with pytest.raises(NoFaceError, match="no face found in any of the 6 frames"):
        short.align_video(data_dir / "negative" / "taehv_decoded_taew2_1.mp4")
    with pytest.raises(NoFaceError):
        short.extract_features(data_dir / "negative" / "taehv_decoded_taew2_1.mp4", lambda c: c.mean((1, 2)))


def test_blanked_frames_are_marked_and_filled_from_the_nearest_face(front_end, data_dir, d0_frames):
    golden = np.load(data_dir / "face_goldens" / "liveportrait_d0_det_landmarks.npz")["landmarks"]
    frames = [np.zeros_like(f) if i in BLANK else f for i, f in enumerate(d0_frames)]
    aligned = front_end.align_frames(frames)
    assert aligned.frame_count == len(frames)
    assert np.flatnonzero(~aligned.mask).tolist() == list(BLANK)
    # Nearest face: 10, 11, 12 are closer to (or tie with) 9; 13, 14 are closer to 15.
    expected_source = np.arange(len(frames))
    expected_source[[10, 11, 12]] = 9
    expected_source[[13, 14]] = 15
    np.testing.assert_array_equal(aligned.source, expected_source)
    for i in range(len(frames)):
        j = expected_source[i]
        np.testing.assert_array_equal(aligned.crops[i], aligned.crops[j], err_msg=f"crop {i}")
        np.testing.assert_array_equal(aligned.landmarks[i], aligned.landmarks[j], err_msg=f"landmarks {i}")
    # Frames before the gap are the reference's; after it the tracker restarts on the same face.
    np.testing.assert_array_equal(aligned.landmarks[:10], golden[:10])
    after = np.abs(aligned.landmarks[15:] - golden[15:30]).max()
    assert after < 2.0, f"after the gap the landmarks are {after:.2f} px from the unblanked reference"


def test_features_stay_aligned_with_frames(front_end, data_dir, d0_frames, tmp_path):
    """Features of a clip with blanked frames, through a video file: one row per frame, each row the
    encoder's output for that frame's crop (or the nearest face frame's)."""
    import av

    path = tmp_path / "blanked.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        for i, frame in enumerate(d0_frames):
            picture = np.zeros_like(frame) if i in BLANK else frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)

    calls = []

    def encoder(crops: np.ndarray) -> np.ndarray:  # [n, 224, 224, 3] uint8 -> [n, 3]: depends on content
        calls.append(len(crops))
        return crops.reshape(len(crops), -1, 3).mean(axis=1)

    small_batches = _sharing(front_end, encoder_batch=7)
    features = small_batches.extract_features(path, encoder)
    aligned = front_end.align_video(path)
    assert features.frame_count == aligned.frame_count == len(d0_frames)
    np.testing.assert_array_equal(features.mask, aligned.mask)
    assert np.flatnonzero(~features.mask).tolist() == list(BLANK)
    np.testing.assert_array_equal(features.source, aligned.source)
    np.testing.assert_allclose(features.features, encoder(aligned.crops), rtol=1e-6)
    assert sum(calls[:-1]) == len(d0_frames) - len(BLANK) and max(calls[:-1]) <= 7  # faces only


def test_chunks_concatenate_to_the_whole_video(front_end, data_dir):
    short = _sharing(front_end, max_frames=21, chunk_frames=4)
    path = data_dir / "driving" / "liveportrait_d19.mp4"
    chunks = list(short.iter_aligned(path, chunk_frames=5))
    whole = short.align_video(path)
    assert [c.start for c in chunks] == [0, 5, 10, 15, 20]
    np.testing.assert_array_equal(np.concatenate([c.crops for c in chunks]), whole.crops)
    np.testing.assert_array_equal(np.concatenate([c.landmarks for c in chunks]), whole.landmarks)
    assert whole.fps == 30 and whole.frame_count == 21 and whole.info.audio is not None

"""Decoding: PyAV frames equal OpenCV's (the reference's reader), exact frame rates, rotation, audio,
and clear errors for unreadable, empty and corrupt media."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from flashportrait.face.errors import MediaError
from flashportrait.face.video import VideoReader, read_image

CLIPS = ["liveportrait_d0", "liveportrait_d12", "liveportrait_d13", "liveportrait_d19", "liveportrait_d20"]


def _write_clip(path: Path, frames: list[np.ndarray], rate, rotation: int = 0, audio: bool = False) -> None:
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=16000) if audio else None
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(
                np.zeros((1, 16000), np.float32), format="fltp", layout="mono"
            )
            samples.sample_rate = 16000
            for packet in [*sound.encode(samples), *sound.encode()]:
                out.mux(packet)


@pytest.mark.parametrize("clip", CLIPS)
def test_frames_equal_opencv(data_dir, clip):
    path = data_dir / "driving" / f"{clip}.mp4"
    capture = cv2.VideoCapture(str(path))
    cv_fps = capture.get(cv2.CAP_PROP_FPS)
    with VideoReader(path) as video:
        for index, ours in enumerate(video):
            ok, theirs = capture.read()
            assert ok, f"{clip}: OpenCV stops before frame {index}"
            if not np.array_equal(ours, theirs):
                diff = int(cv2.absdiff(ours, theirs).max())
                pytest.fail(f"{clip}: frame {index} differs from OpenCV by up to {diff} levels")
        assert not capture.read()[0], f"{clip}: OpenCV decodes more frames than {video.frames_read}"
        assert float(video.info.fps) == cv_fps
        assert video.info.frame_count_hint == video.frames_read


def test_info_and_audio(data_dir):
    with VideoReader(data_dir / "driving" / "liveportrait_d12.mp4") as video:
        info = video.info
    assert (info.width, info.height, info.fps, info.rotation, info.codec) == (
        512,
        512,
        Fraction(25),
        0,
        "h264",
    )
    assert info.audio is not None
    assert (info.audio.codec, info.audio.sample_rate, info.audio.channels) == ("aac", 44100, 2)
    with VideoReader(data_dir / "driving" / "liveportrait_d0.mp4") as video:
        assert video.info.audio is None


def test_ntsc_rate_is_exact_and_bytes_input_works(tmp_path):
    frames = [np.full((32, 48, 3), 16 * i, np.uint8) for i in range(6)]
    path = tmp_path / "ntsc.mp4"
    _write_clip(path, frames, Fraction(30000, 1001), audio=True)
    with VideoReader(path.read_bytes()) as video:
        decoded = list(video)
        assert video.info.fps == Fraction(30000, 1001)
        assert video.info.audio is not None and video.info.audio.sample_rate == 16000
    assert len(decoded) == 6 and decoded[0].shape == (32, 48, 3)


def test_rotation_metadata(tmp_path):
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:8, :8] = 255  # marker in the top-left corner of the stored picture
    path = tmp_path / "rotated.mp4"
    _write_clip(path, [frame] * 3, 25, rotation=90)  # display: 90 degrees counter-clockwise
    with VideoReader(path) as video:
        upright = next(iter(video))
        assert (video.info.rotation, video.info.rotated) == (270, True)
        assert (video.info.width, video.info.height) == (32, 64)
    ys, xs = np.nonzero(upright[..., 0] > 128)
    assert upright.shape == (64, 32, 3) and ys.min() >= 56 and xs.max() < 8  # top-left -> bottom-left
    with VideoReader(path, apply_rotation=False) as video:  # the reference's (OpenCV 4.11) frames
        assert next(iter(video)).shape == (32, 64, 3)


def _empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: b"", "empty"),
        (lambda d: b"this is not a video at all" * 100, "cannot read"),
        (lambda d: d / "missing.mp4", "does not exist"),
        (lambda d: _empty_file(d / "empty.mp4"), "empty"),
    ],
)
def test_unreadable_media_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(MediaError, match=message):
        VideoReader(make(tmp_path))


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w") as out:
        sound = out.add_stream("aac", rate=16000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 16000
        for packet in [*sound.encode(samples), *sound.encode()]:
            out.mux(packet)
    with pytest.raises(MediaError, match="no video stream"):
        VideoReader(path)


def test_truncated_video_is_a_clear_error_or_decodes_a_prefix(tmp_path, data_dir):
    data = (data_dir / "driving" / "liveportrait_d19.mp4").read_bytes()
    try:
        with VideoReader(data[: len(data) // 3]) as video:
            frames = sum(1 for _ in video)
    except MediaError as exc:
        assert "corrupt" in str(exc) or "cannot read" in str(exc) or "no decodable" in str(exc)
    else:
        assert 0 < frames < 250  # the moov atom is at the front: the readable prefix decodes


def test_corruption_mid_file_is_a_clear_error(data_dir):
    data = bytearray((data_dir / "driving" / "liveportrait_d19.mp4").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 20000] = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    with (
        pytest.raises(MediaError, match=r"is corrupt: decoding failed after frame \d+"),
        VideoReader(bytes(data)) as video,
    ):
        for _ in video:
            pass


def test_read_image(data_dir):
    image = read_image(data_dir / "negative" / "liveportrait_s36_alpaca.jpg")
    assert image.shape == (438, 1030, 3) and image.dtype == np.uint8
    with pytest.raises(MediaError, match="cannot decode"):
        read_image(b"not an image")

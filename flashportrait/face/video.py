"""Streaming decoding of the driving video with PyAV: BGR frames, exact frame rate, rotation, audio info.

The reference reads the driving video with `cv2.VideoCapture` (REFERENCE.md section 1.3). We decode
with PyAV instead, one frame at a time, so a long video is never held in memory, and we report the
frame rate as an exact fraction (30000/1001 stays 30000/1001, so audio stays in sync).

Frames are bit-identical to OpenCV's for the H.264 and MPEG-4 clips in `shared/data` (tested), given
one choice: OpenCV converts YUV to BGR with swscale's default matrix (ITU-R BT.601) whatever the
stream's colour tags say, while PyAV by default honours a BT.709 tag. The motion encoder was trained
on OpenCV's frames, so we convert with BT.601 too (the BT.709-tagged clips `d13` and `d20` differ by
up to 19 levels per channel otherwise).

Deviation: rotation metadata (a phone video's display matrix) is applied, so frames come out upright.
The reference's OpenCV 4.11 leaves `CAP_PROP_ORIENTATION_AUTO` off and hands the detector sideways
frames; `VideoReader(..., apply_rotation=False)` reproduces that.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np
from av.video.reformatter import Colorspace

from flashportrait.face.errors import MediaError

VideoSource = str | Path | bytes | BinaryIO


@dataclass(frozen=True)
class AudioInfo:
    """The first audio stream, kept for muxing the output: codec, rate, channels, duration (seconds)."""

    stream_index: int
    codec: str
    sample_rate: int
    channels: int
    layout: str
    duration: Fraction | None


@dataclass(frozen=True)
class VideoInfo:
    """The video stream as the frames are delivered (width/height after rotation).

    `fps` is exact (ffmpeg's guessed rate: the rate OpenCV reports as a float); `frame_count_hint` is
    the container's frame count, 0 when it does not store one (the decoded count is authoritative);
    `rotation` is the clockwise rotation the stream asks for, in degrees (0, 90, 180, 270);
    `rotated` says whether the frames delivered have it applied.
    """

    width: int
    height: int
    fps: Fraction
    frame_count_hint: int
    duration: Fraction | None
    rotation: int
    rotated: bool
    codec: str
    audio: AudioInfo | None


def _describe(source: VideoSource) -> str:
    if isinstance(source, (str, Path)):
        return f"'{source}'"
    if isinstance(source, bytes):
        return f"the uploaded video ({len(source)} bytes)"
    return "the uploaded video"


def _open(source: VideoSource):
    if isinstance(source, bytes):
        if len(source) == 0:
            raise MediaError("the driving video is empty (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"the driving video {_describe(source)} does not exist")
        if path.stat().st_size == 0:
            raise MediaError(f"the driving video {_describe(source)} is empty (0 bytes)")
        source = str(path)
    return av.open(source, mode="r")


def _rotation(first_frame) -> int:
    """Clockwise degrees that make the picture upright, from the frame's display matrix."""
    degrees = getattr(first_frame, "rotation", 0) or 0
    # PyAV reports the display matrix angle counter-clockwise; OpenCV undoes it (rotates clockwise).
    return round(-degrees) % 360


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate `frame` [H, W, 3] clockwise by `rotation` degrees (a multiple of 90)."""
    if rotation == 90:
        return cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
    if rotation == 180:
        return cv2.rotate(frame, cv2.ROTATE_180)
    if rotation == 270:
        return cv2.rotate(frame, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return frame


class VideoReader:
    """A driving video opened for streaming. Use as a context manager; iterate for BGR frames.

    >>> with VideoReader(path) as video:
    ...     for frame in video:          # [H, W, 3] uint8 BGR, upright
    ...         ...
    """

    def __init__(self, source: VideoSource, threads: int = 0, apply_rotation: bool = True) -> None:
        self._name = _describe(source)
        self._apply_rotation = apply_rotation
        try:
            self._container = _open(source)
        except MediaError:
            raise
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"cannot read {self._name} as a video: {exc}") from exc
        if not self._container.streams.video:
            self._container.close()
            raise MediaError(f"{self._name} contains no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        if threads:
            self._stream.thread_count = threads
        self.frames_read = 0
        self._frames = self._decode()
        self._first = self._next_frame()
        if self._first is None:
            self.close()
            raise MediaError(f"{self._name} contains no decodable video frames (zero-length or corrupt)")
        self.info = self._describe_stream()

    def _decode(self):
        return self._container.decode(self._stream)

    def _next_frame(self):
        try:
            return next(self._frames)
        except StopIteration:
            return None
        except av.FFmpegError as exc:
            where = f"after frame {self.frames_read}" if self.frames_read else "at the first frame"
            raise MediaError(f"{self._name} is corrupt: decoding failed {where} ({exc})") from exc

    def _describe_stream(self) -> VideoInfo:
        stream = self._stream
        rotation = _rotation(self._first)
        width, height = self._first.width, self._first.height
        if self._apply_rotation and rotation in (90, 270):
            width, height = height, width
        fps = stream.guessed_rate or stream.average_rate or stream.base_rate
        if not fps:
            raise MediaError(f"{self._name} has no frame rate")
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = Fraction(stream.duration) * stream.time_base
        return VideoInfo(
            width=width,
            height=height,
            fps=Fraction(fps),
            frame_count_hint=int(stream.frames or 0),
            duration=duration,
            rotation=rotation,
            rotated=self._apply_rotation and rotation != 0,
            codec=stream.codec_context.name,
            audio=self._audio_info(),
        )

    def _audio_info(self) -> AudioInfo | None:
        if not self._container.streams.audio:
            return None
        audio = self._container.streams.audio[0]
        duration = None
        if audio.duration is not None and audio.time_base is not None:
            duration = Fraction(audio.duration) * audio.time_base
        context = audio.codec_context
        return AudioInfo(
            stream_index=audio.index,
            codec=context.name,
            sample_rate=int(context.sample_rate or 0),
            channels=int(context.channels or 0),
            layout=context.layout.name if context.layout is not None else "",
            duration=duration,
        )

    def _convert(self, frame) -> np.ndarray:
        # BT.601 like OpenCV (see the module docstring), then upright like OpenCV.
        bgr = frame.reformat(format="bgr24", src_colorspace=Colorspace.ITU601).to_ndarray()
        return upright(bgr, self.info.rotation) if self.info.rotated else bgr

    def __iter__(self) -> Iterator[np.ndarray]:
        """Frames in display order, each [H, W, 3] uint8 BGR. A reader is iterated once."""
        frame = self._first
        self._first = None
        while frame is not None:
            self.frames_read += 1
            yield self._convert(frame)
            frame = self._next_frame()

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_image(source: str | Path | bytes) -> np.ndarray:
    """A still image as [H, W, 3] uint8 BGR, decoded by OpenCV as the reference reads images."""
    data = source if isinstance(source, bytes) else None
    if data is None:
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"the image '{source}' does not exist")
        data = path.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise MediaError(f"cannot decode {_describe(source)} as an image")
    return image

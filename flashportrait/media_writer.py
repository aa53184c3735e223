"""Writing the output video: H.264 MP4 at an exact rational frame rate, frames streamed in, with the
driving video's audio trimmed to the output and muxed at the end (PyAV).

The reference writes its output with imageio at the driving video's fps as a float and no audio
(REFERENCE.md 1.4, quirk 22). We keep the rate exact (30000/1001 stays 30000/1001: frame i is at
exactly i / fps, so audio stays in sync over long videos) and carry the driving audio over.

Audio alignment: output frame i is the pipeline's frame i + 1, driven by driving frame i + 1 (the
reference drops frame 0), so the output's time t is the driving video's time t + `audio_offset`
(one frame). The audio kept is the driving audio over [offset, offset + duration of the output),
measured from the driving video stream's start, decoded, resampled to the AAC encoder's sample format
and re-encoded sample-accurately (copying packets could only cut at AAC frame boundaries).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.audio.fifo import AudioFifo
from av.audio.resampler import AudioResampler

AUDIO_CODEC = "aac"
AUDIO_FORMAT = "fltp"  # what FFmpeg's AAC encoder takes


class VideoWriter:
    """An MP4 file written frame by frame. Use as a context manager (or call `close`).

    path: output file; width, height: frame size (even, as yuv420p needs); fps: exact rate.
    audio_source: a media file whose first audio stream is muxed in at `close` (None: no audio);
    audio_offset: seconds of that audio, from its video stream's start, that precede output frame 0.
    crf / preset: libx264 quality and speed.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: Fraction,
        *,
        audio_source: str | Path | None = None,
        audio_offset: Fraction = Fraction(0),
        crf: int = 17,
        preset: str = "medium",
    ) -> None:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"frame size {width}x{height} must be positive and even (yuv420p)")
        fps = Fraction(fps)
        if fps <= 0:
            raise ValueError(f"frame rate {fps} must be positive")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.frames_written = 0
        self._audio_source = Path(audio_source) if audio_source is not None else None
        self._audio_offset = Fraction(audio_offset)
        self._container = av.open(str(self.path), mode="w")
        self._video = self._container.add_stream(
            "libx264", rate=fps, options={"crf": str(crf), "preset": preset}
        )
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.codec_context.time_base = 1 / fps
        self._audio = self._add_audio_stream() if self._audio_source is not None else None
        self._closed = False

    def _add_audio_stream(self):
        with av.open(str(self._audio_source)) as source:
            if not source.streams.audio:
                return None
            context = source.streams.audio[0].codec_context
            rate, layout = int(context.sample_rate), context.layout.name
        stream = self._container.add_stream(AUDIO_CODEC, rate=rate, layout=layout)
        return stream

    @property
    def has_audio(self) -> bool:
        return self._audio is not None

    def write(self, frames: np.ndarray) -> None:
        """Append frames [T, H, W, 3] uint8 RGB."""
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            expected = f"[T, {self.height}, {self.width}, 3] uint8"
            raise ValueError(f"frames must be {expected}, got {frames.dtype} {list(frames.shape)}")
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = self.frames_written
            picture.time_base = self._video.codec_context.time_base
            self._container.mux(self._video.encode(picture))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the video, mux the audio, and finish the file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._mux_audio()
        finally:
            self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _mux_audio(self) -> None:
        stream = self._audio
        rate = stream.codec_context.sample_rate
        layout = stream.codec_context.layout.name
        duration = Fraction(self.frames_written) / self.fps
        first = round(self._audio_offset * rate)  # driving-audio sample of output time 0
        stop = first + round(duration * rate)
        resampler = AudioResampler(format=AUDIO_FORMAT, layout=layout, rate=rate)
        fifo = AudioFifo()
        frame_size = stream.codec_context.frame_size or 1024
        written = 0

        def drain(final: bool) -> None:
            nonlocal written
            while fifo.samples >= frame_size or (final and fifo.samples):
                block = fifo.read(frame_size if fifo.samples >= frame_size else fifo.samples)
                block.pts, block.time_base = written, Fraction(1, rate)
                written += block.samples
                self._container.mux(stream.encode(block))

        with av.open(str(self._audio_source)) as source:
            audio = source.streams.audio[0]
            video = source.streams.video[0] if source.streams.video else None
            start = _seconds(video.start_time, video.time_base) if video is not None else Fraction(0)
            position = None  # driving-audio sample index of the next decoded sample
            for decoded in source.decode(audio):
                if position is None:
                    begin = _seconds(decoded.pts, decoded.time_base) if decoded.pts is not None else start
                    position = round((begin - start) * rate)
                for piece in resampler.resample(decoded):
                    position = self._keep(piece, position, first, stop, fifo, layout, rate)
                drain(final=False)
                if position >= stop:
                    break
        drain(final=True)
        self._container.mux(stream.encode(None))

    @staticmethod
    def _keep(piece, position: int, first: int, stop: int, fifo: AudioFifo, layout: str, rate: int) -> int:
        """Write the samples of `piece` (starting at driving sample `position`) inside [first, stop)."""
        count = piece.samples
        lo, hi = max(first, position), min(stop, position + count)
        if hi > lo:
            samples = piece.to_ndarray()[:, lo - position : hi - position]
            kept = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples), format=AUDIO_FORMAT, layout=layout
            )
            kept.sample_rate = rate
            kept.pts = None
            fifo.write(kept)
        return position + count


def _seconds(value: int | None, time_base: Fraction | None) -> Fraction:
    if value is None or time_base is None:
        return Fraction(0)
    return Fraction(value) * time_base

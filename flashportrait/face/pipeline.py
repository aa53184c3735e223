"""The driving-video front end: video -> per-frame 222 landmarks -> 224x224 crops -> expression features.

This is what the Triton `face_align` model calls (`FaceFrontEnd.align_video`) and what the features
path uses (`FaceFrontEnd.extract_features`). Everything streams: frames are decoded, detected and
aligned `chunk_frames` at a time, so memory is bounded by one chunk of frames plus the per-frame
outputs (crops for `align_video`, 554 floats per frame for `extract_features`).

Per chunk: the detector runs on all frames in one batch, new faces are aligned in one batch, then the
two tracking passes advance frame by frame (they are sequential in the reference), then each frame with
a face is warped to its crop (reference: REFERENCE.md section 1.3; deviations: `gaps.py`, `video.py`,
`smoothing.py`, `warp.umeyama`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial
from itertools import islice

import numpy as np

from flashportrait.config import ConfigError
from flashportrait.face.detector import DetectorConfig, FaceDetector
from flashportrait.face.errors import MediaError, NoFaceError
from flashportrait.face.gaps import GapFiller, nearest_face_sources
from flashportrait.face.landmarks import LandmarkConfig, LandmarkModel
from flashportrait.face.runtime import create_session, run_batched
from flashportrait.face.tracking import (
    FrameFaces,
    FrameLandmarks,
    TrackerConfig,
    TwoPassTracker,
    align_new_faces,
)
from flashportrait.face.video import VideoInfo, VideoReader, VideoSource
from flashportrait.face.warp import pd_fgc_matrix, warp_with

# Crops [n, 224, 224, 3] uint8 RGB -> features [n, D] float32 (the motion encoder: D = 554).
CropEncoder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FaceFrontEndConfig:
    detector_model: str  # path of the release's face_det.onnx
    landmark_model: str  # path of the release's face_landmark.onnx
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime, in order of preference
    intra_op_threads: int = 1  # these nets are small: more threads cost more than they gain (0: ORT default)
    chunk_frames: int = 16  # frames decoded and detected per batch (bounds memory)
    max_batch: int = 64  # largest batch per network call
    encoder_batch: int = 32  # crops per motion-encoder call in extract_features
    max_frames: int = 0  # read at most this many frames (0: all)
    apply_rotation: bool = True  # honour rotation metadata (the reference's OpenCV does not)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    landmarks: LandmarkConfig = field(default_factory=LandmarkConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)

    def __post_init__(self) -> None:
        for name in ("chunk_frames", "max_batch", "encoder_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FaceFrontEndConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_frames < 0 or self.intra_op_threads < 0:
            raise ConfigError("FaceFrontEndConfig: max_frames and intra_op_threads cannot be negative")


@dataclass(frozen=True)
class FrameResult:
    """One frame after tracking: the 222 landmarks and 224x224 RGB crop when the frame has a face."""

    index: int
    landmarks: FrameLandmarks | None
    crop: np.ndarray | None  # [224, 224, 3] uint8 RGB


@dataclass(frozen=True)
class AlignedChunk:
    """Consecutive frames `start .. start+n-1`, every frame filled (see `gaps.py`).

    crops [n, 224, 224, 3] uint8 RGB; mask [n] bool (the frame has its own face); landmarks
    [n, 222, 2] float32 frame pixels; rects [n, 4] float32 (x1, y1, x2, y2); source [n] int64 (the
    frame each row comes from, = the frame itself where mask is true).
    """

    start: int
    crops: np.ndarray
    mask: np.ndarray
    landmarks: np.ndarray
    rects: np.ndarray
    source: np.ndarray


@dataclass(frozen=True)
class AlignedVideo:
    """Every frame of a driving video, aligned: the arrays of `AlignedChunk` over the whole video."""

    info: VideoInfo | None  # None for a still image
    crops: np.ndarray
    mask: np.ndarray
    landmarks: np.ndarray
    rects: np.ndarray
    source: np.ndarray

    @property
    def frame_count(self) -> int:
        return int(self.mask.shape[0])

    @property
    def fps(self) -> Fraction | None:
        return None if self.info is None else self.info.fps


@dataclass(frozen=True)
class VideoFeatures:
    """Per-frame expression features: features [N, D] float32 (filled), mask [N] bool, source [N] int64."""

    info: VideoInfo | None
    features: np.ndarray
    mask: np.ndarray
    source: np.ndarray

    @property
    def frame_count(self) -> int:
        return int(self.mask.shape[0])


def _chunks(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    iterator = iter(frames)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _no_face(frames: int, name: str) -> NoFaceError:
    where = "the image" if frames == 1 else f"any of the {frames} frames of the driving video"
    return NoFaceError(
        f"no face found in {where}{name}: the driving input needs a clearly visible human face "
        "(frontal or moderately turned, at least about 100 pixels tall)"
    )


class FaceFrontEnd:
    """The face models (ONNX Runtime sessions created once) and the streaming front end around them."""

    def __init__(
        self,
        config: FaceFrontEndConfig,
        detector: FaceDetector | None = None,
        landmarks: LandmarkModel | None = None,
    ) -> None:
        """Sessions for `config`'s model files, unless a `detector` / `landmarks` model is given (tests,
        other runtimes)."""
        self.config = config
        if detector is None:
            session = create_session(config.detector_model, config.providers, config.intra_op_threads)
            detector = FaceDetector(session, replace(config.detector, max_batch=config.max_batch))
        if landmarks is None:
            session = create_session(config.landmark_model, config.providers, config.intra_op_threads)
            landmarks = LandmarkModel(
                partial(run_batched, session, max_batch=config.max_batch), config.landmarks
            )
        self.detector = detector
        self.landmarks = landmarks

    # -- streaming core --------------------------------------------------------------------------
    def track(self, frames: Iterable[np.ndarray]) -> Iterator[FrameResult]:
        """Landmarks and crop of each frame ([H, W, 3] uint8 BGR), in order, `chunk_frames` at a time."""
        tracker = TwoPassTracker(self.config.tracker)
        index = 0
        for chunk in _chunks(frames, self.config.chunk_frames):
            detections = self.detector.detect(chunk)
            faces = [
                FrameFaces(frame, found.boxes, self.landmarks)
                for frame, found in zip(chunk, detections, strict=True)
            ]
            align_new_faces(self.landmarks, faces)
            for frame_faces in faces:
                result = tracker.step(frame_faces)
                crop = None
                if result is not None:
                    matrix = pd_fgc_matrix(result.points)
                    if np.isfinite(matrix).all():
                        crop = np.ascontiguousarray(warp_with(frame_faces.frame, matrix)[..., ::-1])
                    else:
                        result = None  # degenerate landmarks (all 5 points equal): no usable face
                yield FrameResult(index, result, crop)
                index += 1

    def open(self, source: VideoSource) -> VideoReader:
        return VideoReader(source, apply_rotation=self.config.apply_rotation)

    def _frames(self, video: VideoReader) -> Iterable[np.ndarray]:
        limit = self.config.max_frames
        return islice(video, limit) if limit > 0 else video

    def iter_aligned(self, source: VideoSource, chunk_frames: int | None = None) -> Iterator[AlignedChunk]:
        """Aligned, gap-filled chunks of the driving video, in frame order (`VideoInfo` via `open`).

        Raises MediaError for unreadable media and NoFaceError (at the end) when no frame has a face.
        """
        with self.open(source) as video:
            yield from self._aligned_chunks(self._frames(video), chunk_frames, video.info)

    def _aligned_chunks(
        self, frames, chunk_frames: int | None, info: VideoInfo | None
    ) -> Iterator[AlignedChunk]:
        size = chunk_frames or self.config.chunk_frames
        filler: GapFiller[FrameResult] = GapFiller()
        pending = []
        for result in self.track(frames):
            pending += filler.push(result if result.crop is not None else None)
            while len(pending) >= size:
                yield _pack(pending[:size])
                pending = pending[size:]
        if filler.frames_seen == 0:
            raise MediaError("the driving input has no frames")
        if not filler.any_face:
            raise _no_face(filler.frames_seen, "" if info is None else f" ({info.width}x{info.height})")
        pending += filler.finish()
        while pending:
            yield _pack(pending[:size])
            pending = pending[size:]

    # -- whole-video conveniences ----------------------------------------------------------------
    def align_video(self, source: VideoSource) -> AlignedVideo:
        """All frames of a driving video (path, bytes or file object): crops, mask, landmarks, info."""
        with self.open(source) as video:
            chunks = list(self._aligned_chunks(self._frames(video), None, video.info))
            info = video.info
        return _concat(info, chunks)

    def align_frames(self, frames: Iterable[np.ndarray], info: VideoInfo | None = None) -> AlignedVideo:
        """Already decoded frames ([H, W, 3] uint8 BGR each), aligned like `align_video`."""
        return _concat(info, list(self._aligned_chunks(frames, None, info)))

    def align_image(self, image_bgr: np.ndarray) -> AlignedVideo:
        """One still image ([H, W, 3] uint8 BGR) as a one-frame video; NoFaceError if it has no face."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise MediaError(
                f"expected an [H, W, 3] uint8 image, got {image_bgr.dtype} {list(image_bgr.shape)}"
            )
        return _concat(None, list(self._aligned_chunks([image_bgr], 1, None)))

    def extract_features(self, source: VideoSource, encoder: CropEncoder) -> VideoFeatures:
        """Per-frame features of the driving video: `encoder` runs on the crops of frames with a face
        (`encoder_batch` at a time); frames without a face take the nearest face frame's features."""
        with self.open(source) as video:
            info = video.info
            rows: list[np.ndarray] = []
            mask: list[bool] = []
            batch: list[np.ndarray] = []
            for result in self.track(self._frames(video)):
                mask.append(result.crop is not None)
                if result.crop is not None:
                    batch.append(result.crop)
                if len(batch) >= self.config.encoder_batch:
                    rows.append(np.asarray(encoder(np.stack(batch)), dtype=np.float32))
                    batch = []
        if batch:
            rows.append(np.asarray(encoder(np.stack(batch)), dtype=np.float32))
        mask_array = np.array(mask, dtype=bool)
        if not mask_array.any():
            raise _no_face(len(mask), f" ({info.width}x{info.height})")
        face_features = np.concatenate(rows)
        sources = nearest_face_sources(mask_array)
        row_of_frame = np.cumsum(mask_array) - 1  # row of each face frame in face_features
        return VideoFeatures(info, face_features[row_of_frame[sources]], mask_array, sources)


def _pack(items) -> AlignedChunk:
    return AlignedChunk(
        start=items[0].index,
        crops=np.stack([item.value.crop for item in items]),
        mask=np.array([item.has_face for item in items], dtype=bool),
        landmarks=np.stack([item.value.landmarks.points for item in items]).astype(np.float32, copy=False),
        rects=np.stack([item.value.landmarks.rect for item in items]).astype(np.float32, copy=False),
        source=np.array([item.source for item in items], dtype=np.int64),
    )


def _concat(info: VideoInfo | None, chunks: list[AlignedChunk]) -> AlignedVideo:
    return AlignedVideo(
        info=info,
        crops=np.concatenate([c.crops for c in chunks]),
        mask=np.concatenate([c.mask for c in chunks]),
        landmarks=np.concatenate([c.landmarks for c in chunks]),
        rects=np.concatenate([c.rects for c in chunks]),
        source=np.concatenate([c.source for c in chunks]),
    )

"""Face tracking over a video, reproducing the reference's two-pass `det_landmarks`.

Reference: `wan/models/face_model.py` (`FaceModel.forward`, reset=False) driven by
`wan/models/pdf.py::det_landmarks`. Per frame, `FaceModel` keeps the faces it tracked on the previous
frame (re-aligned from their smoothed points) and adds one new face per detection (aligned from the
detector's box, with a fresh smoother); faces with probability < 1e-4 or a landmark box under 96 px
are dropped, and of two faces overlapping with IoU > 0.12 the smaller is dropped. `det_landmarks`
runs this twice with fresh trackers: pass 1 over all frames picks the largest face's landmark box;
pass 2 over the frames pass 1 kept seeds an empty tracker with that box and returns the largest
face's smoothed points.

Where the work goes: a new face's alignment depends only on its frame and detection box, so it is
computed for many frames in one batch (`align_new_faces`), shared by both passes. A tracked face's
alignment depends on the previous frame's result and is sequential; the two passes usually converge
to the same state after a few frames, and `FrameFaces` then computes that alignment once for both.

Deviation (REFERENCE.md quirk 18): frames that either pass drops are reported (`None`), never removed,
so the caller keeps results aligned with frames. Landmarks of the frames kept are exactly the
reference's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flashportrait.face.landmarks import Alignment, LandmarkModel
from flashportrait.face.smoothing import Smoother222


@dataclass(frozen=True)
class TrackerConfig:
    prob_threshold: float = 0.0001  # FaceModel.face_prob_th
    min_face: int = 96  # FaceModel.min_face: smallest landmark box side, pixels
    overlap_iou: float = 0.12  # two tracked faces overlapping more than this are one face


def _key(array) -> tuple[str, tuple[int, ...], bytes]:
    array = np.asarray(array)
    return array.dtype.str, array.shape, array.tobytes()


class FrameFaces:
    """One frame's detections and the alignments requested for it, each computed once.

    `frame`: [H, W, 3] uint8 BGR; `boxes`: [n, 4] int32 detector boxes.
    """

    def __init__(self, frame: np.ndarray, boxes: np.ndarray, model: LandmarkModel) -> None:
        self.frame = frame
        self.boxes = boxes
        self.model = model
        self._cache: dict[tuple[str, tuple[str, tuple[int, ...], bytes]], Alignment] = {}

    def store(self, kind: str, start, alignment: Alignment) -> None:
        self._cache[(kind, _key(start))] = alignment

    def has(self, kind: str, start) -> bool:
        return (kind, _key(start)) in self._cache

    def from_box(self, box) -> Alignment:
        key = ("box", _key(box))
        if key not in self._cache:
            matrix = self.model.initial_matrix(box=box)
            self._cache[key] = self.model.align([self.frame], [matrix])[0]
        return self._cache[key]

    def from_points(self, points: np.ndarray) -> Alignment:
        self.prefetch_points([points])
        return self._cache[("points", _key(points))]

    def prefetch_points(self, starts: Sequence[np.ndarray]) -> None:
        """Align from each of `starts` ([222, 2] previous points) not yet aligned, in one batch."""
        todo = {}
        for points in starts:
            key = ("points", _key(points))
            if key not in self._cache:
                todo[key] = points
        if not todo:
            return
        matrices = [self.model.initial_matrix(points=p) for p in todo.values()]
        results = self.model.align([self.frame] * len(matrices), matrices)
        self._cache.update(zip(todo.keys(), results, strict=True))


def align_new_faces(model: LandmarkModel, frames: Sequence[FrameFaces]) -> None:
    """Align every detection box of every frame in one batched refinement (the new faces of both passes)."""
    owners, images, matrices = [], [], []
    for faces in frames:
        for box in faces.boxes:
            if not faces.has("box", box):
                owners.append((faces, box))
                images.append(faces.frame)
                matrices.append(model.initial_matrix(box=box))
    for (faces, box), alignment in zip(owners, model.align(images, matrices), strict=True):
        faces.store("box", box, alignment)


@dataclass
class Track:
    """One tracked face (the reference's `tracking_face` dict)."""

    face_rect: list  # x1, y1, x2, y2: the detector box when new, then the landmark box
    face_dis: object  # face size used to normalise the smoother's displacements
    points: np.ndarray | None = None  # `pre_kpt_222`: smoothed [222, 2] float32
    smoother: Smoother222 = field(default_factory=Smoother222)
    prob: np.ndarray | None = None
    euler_rad: np.ndarray | None = None

    @classmethod
    def from_box(cls, box) -> Track:
        return cls(face_rect=box, face_dis=np.sqrt(np.square(box[2] - box[0]) + np.square(box[3] - box[1])))


def _area(box):
    return (box[3] - box[1]) * (box[2] - box[0])


def box_iou(a, b) -> float:
    """IoU of two corner boxes, 0 when they do not intersect (reference `count_iou`)."""
    x_a, y_a = max(a[0], b[0]), max(a[1], b[1])
    x_b, y_b = min(a[2], b[2]), min(a[3], b[3])
    inter = abs(max((x_b - x_a, 0)) * max((y_b - y_a), 0))
    if inter == 0:
        return 0
    area_a = abs((a[2] - a[0]) * (a[3] - a[1]))
    area_b = abs((b[2] - b[0]) * (b[3] - b[1]))
    return inter / float(area_a + area_b - inter)


def largest(tracks: Sequence[Track]) -> Track:
    """The face with the largest box; on ties the last one, as the reference's stable sort."""
    return sorted(tracks, key=lambda t: _area(t.face_rect))[-1]


class FaceTracker:
    """`FaceModel.forward` with `reset=False`: faces carried from frame to frame plus new detections."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.tracks: list[Track] = []

    def starts(self) -> list[np.ndarray]:
        """Previous points of the faces carried into `faces`' frame (to prefetch their alignment)."""
        return [t.points for t in self.tracks if t.points is not None]

    def step(self, faces: FrameFaces, seed_box=None) -> list[Track]:
        """Track one frame. An empty tracker starts from `seed_box` when given, else from the detections."""
        cfg = self.config
        boxes = [seed_box] if (not self.tracks and seed_box is not None) else list(faces.boxes)
        self.tracks.extend(Track.from_box(box) for box in boxes)
        dropped: set[int] = set()
        for index, track in enumerate(self.tracks):
            if track.points is not None:
                result = faces.from_points(track.points)
            else:
                result = faces.from_box(track.face_rect)
            if result.prob < cfg.prob_threshold:
                dropped.add(index)
                continue
            points = track.smoother.smooth(result.points, track.face_dis)
            track.points = points
            x_min, x_max = np.min(points[:, 0]), np.max(points[:, 0])
            y_min, y_max = np.min(points[:, 1]), np.max(points[:, 1])
            face_dis = np.linalg.norm(points[0] - points[32])
            if x_max - x_min < cfg.min_face or y_max - y_min < cfg.min_face:
                dropped.add(index)
            # The smoother's face size grows with head rotation (degrees), as in the reference.
            pitch = np.rad2deg(result.euler_rad[0])
            yaw = np.rad2deg(result.euler_rad[1])
            max_euler = abs(pitch) + (abs(yaw) * 0.6)
            face_dis *= 1.0 + max_euler / 18.0
            track.face_rect = [x_min, y_min, x_max, y_max]
            track.face_dis = face_dis
            track.prob = result.prob
            track.euler_rad = result.euler_rad
        if len(self.tracks) > 1:
            for i, target in enumerate(self.tracks):
                if i in dropped:
                    continue
                for j, other in enumerate(self.tracks):
                    if j in dropped or i == j:
                        continue
                    if box_iou(target.face_rect, other.face_rect) > cfg.overlap_iou:
                        dropped.add(i if _area(target.face_rect) - _area(other.face_rect) < 0 else j)
        self.tracks = [t for i, t in enumerate(self.tracks) if i not in dropped]
        return list(self.tracks)


@dataclass(frozen=True)
class FrameLandmarks:
    """A frame's result: `rect` [4] float32 (pass 1's face box), `points` [222, 2] float32 (pass 2)."""

    rect: np.ndarray
    points: np.ndarray


class TwoPassTracker:
    """`det_landmarks` in one streaming pass: both trackers advance frame by frame in lockstep.

    Pass 2 sees exactly the frames pass 1 kept, in order, and is seeded with pass 1's box of the same
    frame, so running them together gives the reference's results without holding the video.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.first = FaceTracker(config)
        self.second = FaceTracker(config)

    def step(self, faces: FrameFaces) -> FrameLandmarks | None:
        """The frame's landmarks, or None when either pass finds no face in it."""
        faces.prefetch_points(self.first.starts() + self.second.starts())
        found = self.first.step(faces)
        if not found:
            return None
        rect = largest(found).face_rect
        kept = self.second.step(faces, seed_box=rect)
        if not kept:
            return None
        return FrameLandmarks(np.asarray(rect, dtype=np.float32), largest(kept).points)

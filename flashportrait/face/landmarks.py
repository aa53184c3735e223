"""222-point face alignment with the release's `face_landmark.onnx`, refined 3 times, batched over faces.

Reference: `wan/models/face_align.py` (`FaceAlignment.onnx_infer` / `forward`) and `face_utils.py`
(`get_warp_mat_bbox`, `get_warp_mat_bbox_by_gt_pts_float`, `transform_points`), pinned by the golden
case `face_numeric` (cases `get_warp_mat_bbox*`, `face_alignment_forward`).

One alignment: crop 128x128 around a box (or around previous points, rotated by their roll), predict
222 points in the crop, map them back to the frame; then twice more, re-cropping around the new points
rotated by the roll the net's points have *in the previous crop* (reference behaviour). Alignments of
different faces and frames are independent, so `align` runs each refinement step for all of them in
one network call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# The eye corners whose line gives the roll angle.
LEFT_EYE_CORNER = 74
RIGHT_EYE_CORNER = 96

# [B, 3, 128, 128] float32 in [0, 1] (BGR) -> (landmarks [B, 444], euler [B, 2], prob [B, 1]).
LandmarkNet = Callable[[np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class LandmarkConfig:
    crop_size: int = 128
    expand_ratio: float = 0.15
    iterations: int = 3


@dataclass(frozen=True)
class Alignment:
    """One aligned face: `points` [222, 2] float32 frame pixels; `euler_rad` [3] float32 (the net's two
    angles, then the roll in the last crop); `prob` [1] float32 face probability; `matrix` [2, 3] the
    last crop's affine; `crop` [128, 128, 3] uint8 the last crop."""

    points: np.ndarray
    euler_rad: np.ndarray
    prob: np.ndarray
    matrix: np.ndarray
    crop: np.ndarray


def roll_radians(points: np.ndarray):
    """Angle of the line from eye corner 74 to 96 (the 1e-8 keeps a vertical line defined)."""
    left = points[LEFT_EYE_CORNER]
    right = points[RIGHT_EYE_CORNER]
    return np.arctan2(right[1] - left[1], right[0] - left[0] + 0.00000001)


def transform_points(points: np.ndarray, matrix: np.ndarray, invert: bool = False) -> np.ndarray:
    """Apply a 2x3 affine (or its inverse) to points [n, 2]; OpenCV arithmetic, dtype of `points`."""
    if invert:
        matrix = cv2.invertAffineTransform(matrix)
    return np.squeeze(cv2.transform(np.expand_dims(points, axis=1), matrix))


def box_crop_matrix(box, base_angle, dst_size: int = 128, expand_ratio: float = 0.15) -> np.ndarray:
    """2x3 affine: rotate by `base_angle` degrees about the box centre and scale the longer box side to
    `dst_size * (1 - expand_ratio)`, centred in a `dst_size` square. `box`: (x1, y1, x2, y2)."""
    x_min, y_min, x_max, y_max = box
    centre_x = (x_min + x_max) / 2
    centre_y = (y_min + y_max) / 2
    scale = dst_size / max(x_max - x_min, y_max - y_min) * (1 - expand_ratio)
    matrix = cv2.getRotationMatrix2D((centre_x, centre_y), angle=base_angle, scale=scale)
    matrix[:, 2] += [dst_size / 2 - centre_x, dst_size / 2 - centre_y]
    return matrix


def points_crop_matrix(points: np.ndarray, base_angle=0.0, dst_size: int = 128, expand_ratio: float = 0.15):
    """2x3 affine framing `points` [n, 2]: rotate by `base_angle` degrees about their box centre, scale
    the rotated points' longer extent to `dst_size * (1 - expand_ratio)` and centre them.

    Returns (matrix, centre_x, centre_y, scale)."""
    (x_min, y_min), (x_max, y_max) = points.min(axis=0), points.max(axis=0)
    centre_x = (x_min + x_max) / 2
    centre_y = (y_min + y_max) / 2
    rotated = transform_points(
        points, cv2.getRotationMatrix2D((centre_x, centre_y), angle=base_angle, scale=1.0)
    )
    width, height = rotated.max(axis=0) - rotated.min(axis=0)
    scale = dst_size / max(width, height) * (1 - expand_ratio)
    matrix = cv2.getRotationMatrix2D((centre_x, centre_y), angle=base_angle, scale=scale)
    scaled = transform_points(points, matrix)
    scaled_x, scaled_y = (scaled.min(axis=0) + scaled.max(axis=0)) / 2
    matrix = matrix.copy()
    matrix[:, 2] += [dst_size / 2 - scaled_x, dst_size / 2 - scaled_y]
    return matrix, centre_x, centre_y, scale


class LandmarkModel:
    """The 222-point net and its iterative refinement; `net` runs any batch (see `LandmarkNet`)."""

    def __init__(self, net: LandmarkNet, config: LandmarkConfig | None = None) -> None:
        self.net = net
        self.config = config or LandmarkConfig()

    def initial_matrix(self, box=None, points: np.ndarray | None = None) -> np.ndarray:
        """The first crop: around previous `points` [222, 2] (rotated by their roll) if given, else `box`."""
        cfg = self.config
        if points is not None:
            angle = np.rad2deg(roll_radians(points))
            return points_crop_matrix(points, angle, cfg.crop_size, cfg.expand_ratio)[0]
        return box_crop_matrix(box, 0, cfg.crop_size, cfg.expand_ratio)

    def align(self, frames: Sequence[np.ndarray], matrices: Sequence[np.ndarray]) -> list[Alignment]:
        """Align one face per (frame [H, W, 3] uint8 BGR, first-crop matrix [2, 3]); frames may repeat."""
        cfg = self.config
        size = cfg.crop_size
        matrices = list(matrices)
        results: list[Alignment] = []
        for step in range(cfg.iterations):
            if not matrices:
                return []
            crops = np.stack(
                [cv2.warpAffine(f, m, (size, size)) for f, m in zip(frames, matrices, strict=True)]
            )
            batch = crops.transpose((0, 3, 1, 2)).astype(np.float32) / 255.0
            landmarks, euler, prob = self.net(batch)
            results = []
            for i, matrix in enumerate(matrices):
                in_crop = np.reshape(landmarks[i], (2, -1)).transpose((1, 0)) * size
                angles = np.array([euler[i, 0], euler[i, 1], roll_radians(in_crop)], dtype=np.float32)
                points = transform_points(in_crop, matrix, invert=True)
                results.append(Alignment(points, angles, prob[i], matrix, crops[i]))
            if step + 1 < cfg.iterations:
                matrices = [
                    points_crop_matrix(r.points, np.rad2deg(r.euler_rad[2]), size, cfg.expand_ratio)[0]
                    for r in results
                ]
        return results

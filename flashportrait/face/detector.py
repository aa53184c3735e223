"""The release's NanoDet-style (GFL) single-class face detector, `face_det.onnx`, batched over frames.

Reference: `wan/models/face_det.py` (`FaceDet(NanoDetABC)`), pinned by the golden case
`face_numeric` (`get_resize_matrix`, `nanodet`, `hard_nms`, `warp_boxes`). Per frame: letterbox to
160x272 with a perspective warp, normalise, run the net, decode the distance distributions, keep
scores above 0.4, hard NMS, map the boxes back to the frame, clip, truncate to int32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort

from flashportrait.face.runtime import run_batched


@dataclass(frozen=True)
class DetectorConfig:
    input_hw: tuple[int, int] = (272, 160)
    strides: tuple[int, ...] = (8, 16, 32)
    reg_max: int = 7
    prob_threshold: float = 0.4
    iou_threshold: float = 0.3
    num_candidate: int = 1000  # per level, before the threshold
    nms_candidates: int = 200  # highest scores entering NMS
    top_k: int = -1  # boxes kept by NMS (-1: all)
    keep_ratio: bool = True
    mean_bgr: tuple[float, float, float] = (103.53, 116.28, 123.675)
    std_bgr: tuple[float, float, float] = (57.375, 57.12, 58.395)
    max_batch: int = 64


@dataclass(frozen=True)
class Detections:
    """Faces of one frame, best first: `boxes` [n, 4] int32 (x1, y1, x2, y2), `scores` [n] float32."""

    boxes: np.ndarray
    scores: np.ndarray


def resize_matrix(raw_wh: tuple[int, int], dst_wh: tuple[int, int], keep_ratio: bool) -> np.ndarray:
    """3x3 matrix from the frame to the network input: centre, scale (uniformly if `keep_ratio`), shift."""
    raw_w, raw_h = raw_wh
    dst_w, dst_h = dst_wh
    centre = np.eye(3)
    centre[0, 2] = -raw_w / 2
    centre[1, 2] = -raw_h / 2
    scale = np.eye(3)
    if keep_ratio:
        ratio = min(dst_w / raw_w, dst_h / raw_h)
        scale[0, 0] *= ratio
        scale[1, 1] *= ratio
    else:
        scale[0, 0] *= dst_w / raw_w
        scale[1, 1] *= dst_h / raw_h
    shift = np.eye(3)
    shift[0, 2] = 0.5 * dst_w
    shift[1, 2] = 0.5 * dst_h
    return shift @ scale @ centre


def iou_of(boxes_a: np.ndarray, boxes_b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """IoU of corner boxes [..., 4] (broadcast), with `eps` in the denominator as the reference."""
    top_left = np.maximum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = np.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    overlap = _area(top_left, bottom_right)
    return overlap / (
        _area(boxes_a[..., :2], boxes_a[..., 2:]) + _area(boxes_b[..., :2], boxes_b[..., 2:]) - overlap + eps
    )


def _area(top_left: np.ndarray, bottom_right: np.ndarray) -> np.ndarray:
    wh = np.clip(bottom_right - top_left, 0.0, None)
    return wh[..., 0] * wh[..., 1]


def hard_nms(
    box_scores: np.ndarray, iou_threshold: float, top_k: int = -1, candidates: int = 200
) -> np.ndarray:
    """Greedy NMS on [n, 5] rows (x1, y1, x2, y2, score): keep the best, drop overlaps above the threshold."""
    scores = box_scores[:, -1]
    boxes = box_scores[:, :-1]
    order = np.argsort(scores)[-candidates:]
    picked: list[int] = []
    while len(order) > 0:
        best = order[-1]
        picked.append(int(best))
        if 0 < top_k == len(picked) or len(order) == 1:
            break
        order = order[:-1]
        overlaps = iou_of(boxes[order, :], np.expand_dims(boxes[best, :], axis=0))
        order = order[overlaps <= iou_threshold]
    return box_scores[picked, :]


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Map corner boxes [n, 4] through a 3x3 `matrix`; the bounding box of the 4 mapped corners,
    clipped to [0, width] x [0, height], as float32."""
    n = len(boxes)
    if n == 0:
        return boxes
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    corners = corners @ matrix.T
    corners = (corners[:, :2] / corners[:, 2:3]).reshape(n, 8)
    xs = corners[:, [0, 2, 4, 6]]
    ys = corners[:, [1, 3, 5, 7]]
    out = np.concatenate((xs.min(1), ys.min(1), xs.max(1), ys.max(1))).reshape(4, n).T
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - np.amax(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


class FaceDetector:
    """`face_det.onnx` with the reference's pre- and post-processing; one session, many frames per run."""

    def __init__(self, session: ort.InferenceSession, config: DetectorConfig | None = None) -> None:
        self.session = session
        self.config = config or DetectorConfig()
        in_h, in_w = self.config.input_hw
        # Cell centres per level: (col*stride, row*stride), no half-cell offset; ceil(H/stride) rows.
        self._centres = []
        for stride in self.config.strides:
            xs = np.arange(math.ceil(in_w / stride)) * stride
            ys = np.arange(math.ceil(in_h / stride)) * stride
            grid_x, grid_y = np.meshgrid(xs, ys)
            self._centres.append(np.stack((grid_x.flatten(), grid_y.flatten()), axis=-1))

    def preprocess(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`frame`: [H, W, 3] uint8 BGR -> (network input [3, 272, 160] float32, the 3x3 resize matrix)."""
        in_h, in_w = self.config.input_hw
        height, width = frame.shape[:2]
        matrix = resize_matrix((width, height), (in_w, in_h), self.config.keep_ratio)
        resized = cv2.warpPerspective(frame, matrix, dsize=(in_w, in_h))
        mean = np.array(self.config.mean_bgr, dtype=np.float32).reshape(1, 1, 3) / 255
        std = np.array(self.config.std_bgr, dtype=np.float32).reshape(1, 1, 3) / 255
        normalised = (resized.astype(np.float32) / 255 - mean) / std
        return normalised.transpose(2, 0, 1), matrix

    def detect(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        """Faces in each of `frames` ([H, W, 3] uint8 BGR, sizes may differ), one network run per batch."""
        if len(frames) == 0:
            return []
        prepared = [self.preprocess(frame) for frame in frames]
        batch = np.stack([p[0] for p in prepared])
        outputs = run_batched(self.session, batch, self.config.max_batch)
        levels = len(self.config.strides)
        results = []
        for i, frame in enumerate(frames):
            raw = [out[i : i + 1] for out in outputs]
            height, width = frame.shape[:2]
            results.append(self.postprocess(raw[:levels], raw[levels:], prepared[i][1], width, height))
        return results

    def postprocess(
        self,
        scores: Sequence[np.ndarray],
        distributions: Sequence[np.ndarray],
        resize: np.ndarray,
        width: int,
        height: int,
    ) -> Detections:
        """Raw heads of one frame (`scores` [1, cells, 1] and `distributions` [1, cells, 32] per level,
        sigmoid already applied) -> boxes in frame pixels."""
        cfg = self.config
        in_h, in_w = cfg.input_hw
        bins = cfg.reg_max + 1
        level_boxes, level_scores = [], []
        for stride, centres, score, dist in zip(
            cfg.strides, self._centres, scores, distributions, strict=True
        ):
            score = score[0]
            dist = _softmax(dist[0].reshape(-1, bins), axis=1)
            distances = dist.dot(np.arange(bins)).reshape(-1, 4) * stride  # expectation over the bins
            if 0 < cfg.num_candidate < score.shape[0]:
                keep = score.max(axis=1).argsort()[::-1][: cfg.num_candidate]
                centres, distances, score = centres[keep], distances[keep], score[keep]
            boxes = np.stack(
                [
                    np.clip(centres[:, 0] - distances[:, 0], 0, in_w),
                    np.clip(centres[:, 1] - distances[:, 1], 0, in_h),
                    np.clip(centres[:, 0] + distances[:, 2], 0, in_w),
                    np.clip(centres[:, 1] + distances[:, 3], 0, in_h),
                ],
                axis=-1,
            )
            level_boxes.append(boxes)
            level_scores.append(score)
        boxes = np.concatenate(level_boxes)
        confidence = np.concatenate(level_scores)[:, 0]
        keep = confidence > cfg.prob_threshold
        if not keep.any():
            return Detections(np.zeros((0, 4), np.int32), np.zeros((0,), np.float32))
        picked = hard_nms(
            np.concatenate([boxes[keep], confidence[keep, None]], axis=1),
            cfg.iou_threshold,
            cfg.top_k,
            cfg.nms_candidates,
        )
        mapped = warp_boxes(picked[:, :4], np.linalg.inv(resize), width, height)
        return Detections(mapped.astype(np.int32), picked[:, 4].astype(np.float32))

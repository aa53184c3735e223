"""Temporal smoothing of the 222 landmarks: per-facial-part One-Euro filters (`Smoother222`).

Reference: `wan/models/face_model.py` (`OneEuroFilter`, `Smoother222`), after Casiez et al., "1 Euro
Filter", CHI 2012, with the frame period `t_e` replaced by an adaptive `fcmin` per part. The golden
case `face_numeric` pins both (cases `one_euro_filter` and `smoother222`).

Deviation (REFERENCE.md quirk 18): when a part does not move at all between two frames the reference
divides by `fcmin = 0` and returns NaN for the rest of the video. We return the continuous limit of
the reference's formula as `fcmin -> 0` instead (see `OneEuroFilter.__call__`); every frame with
motion is computed exactly as the reference computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _smoothing_factor(t_e, cutoff):
    """alpha = r / (r + 1), r = 2*pi*cutoff*t_e (1 Euro filter, Eq. 3 with tau = 1/(2*pi*cutoff))."""
    r = 2 * math.pi * cutoff * t_e
    return r / (r + 1)


class OneEuroFilter:
    """One-Euro filter over arrays of points, fed the previous *output* as `x_prev` each call."""

    def __init__(self, dx0: float = 0.0, d_cutoff: float = 1.0) -> None:
        self.d_cutoff = float(d_cutoff)
        self.dx_prev = float(dx0)

    def __call__(self, x: np.ndarray, x_prev: np.ndarray | None, fcmin=1.0, min_cutoff=1.0, beta=0.0):
        """`x`, `x_prev`: [n, 2] float32 -> the filtered [n, 2] (same dtype promotion as the reference)."""
        if x_prev is None:
            return x
        if fcmin == 0:
            # Limit fcmin -> 0 of the update below: alpha_d * dx -> 2*pi*d_cutoff*(x - x_prev) and
            # alpha -> 0, so the output holds the previous value (the reference divides by zero here).
            self.dx_prev = self.dx_prev + 2 * math.pi * self.d_cutoff * (x - x_prev)
            return x_prev.copy()
        alpha_d = _smoothing_factor(fcmin, self.d_cutoff)
        dx = (x - x_prev) / fcmin
        dx_hat = alpha_d * dx + (1 - alpha_d) * self.dx_prev
        cutoff = min_cutoff + beta * abs(dx_hat)
        alpha = _smoothing_factor(fcmin, cutoff)
        x_hat = alpha * x + (1 - alpha) * x_prev
        self.dx_prev = dx_hat
        return x_hat


@dataclass(frozen=True)
class _Part:
    """One facial part of the 222-point layout and its adaptive filter schedule.

    `motion` is the mean displacement of the `decide` points since the previous output, divided by
    the face size. Below `still` the filter parameter (both fcmin and beta) ramps linearly from 0 to
    `slow`; between `still` and `fast_at` from `slow` to `fast`; above it is `fast`.
    """

    start: int
    stop: int
    still: float
    slow: float
    fast: float
    decide: tuple[int, int] | None = None
    fast_at: float = 0.02

    def parameter(self, motion):
        if motion < self.still:
            ratio = motion / self.still
            return self.slow * ratio
        if motion < self.fast_at:
            ratio = (motion - self.still) / (self.fast_at - self.still)
            return self.slow + (self.fast - self.slow) * ratio
        return self.fast


# Reference order and constants (face contour decided by its lower part 9..23 only).
PARTS_222: tuple[_Part, ...] = (
    _Part(0, 33, still=0.005, slow=0.05, fast=0.3, decide=(9, 24)),  # face contour
    _Part(33, 48, still=0.003, slow=0.03, fast=0.7),  # nose
    _Part(48, 74, still=0.003, slow=0.02, fast=0.5),  # eyebrows
    _Part(74, 96, still=0.003, slow=0.03, fast=0.7),  # left eye
    _Part(96, 118, still=0.003, slow=0.03, fast=0.7),  # right eye
    _Part(118, 182, still=0.003, slow=0.05, fast=0.7),  # mouth
    _Part(182, 202, still=0.003, slow=0.03, fast=0.7),  # left pupil
    _Part(202, 222, still=0.003, slow=0.03, fast=0.7),  # right pupil
)


class Smoother222:
    """Per-part One-Euro smoothing of one tracked face's 222 landmarks, frame after frame."""

    def __init__(self) -> None:
        self.filters = [OneEuroFilter() for _ in PARTS_222]
        self.prev_points: np.ndarray | None = None

    def smooth(self, points: np.ndarray, face_dis) -> np.ndarray:
        """`points`: [222, 2] float32 pixels, `face_dis`: face size in pixels -> smoothed [222, 2].

        The first call returns `points` itself (not a copy), as the reference does.
        """
        if self.prev_points is None:
            self.prev_points = points.copy()
            return points
        prev = self.prev_points
        displacement = np.sqrt(np.square(points[:, 0] - prev[:, 0]) + np.square(points[:, 1] - prev[:, 1]))
        displacement = displacement / face_dis
        out = points.copy()
        for part, one_euro in zip(PARTS_222, self.filters, strict=True):
            lo, hi = part.decide or (part.start, part.stop)
            p = part.parameter(np.mean(displacement[lo:hi]))
            span = slice(part.start, part.stop)
            out[span] = one_euro(points[span], prev[span], fcmin=p, beta=p)
        self.prev_points = out
        return out

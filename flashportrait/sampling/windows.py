"""The sliding-window plan of the reference long-video pipeline, and the sizes that feed it.

A video of N latent frames is denoised as overlapping windows of C latent frames (C is the window the
I2V condition `y` is built for: `(sub_num_frames - 1) / 4 + 1`). Everything here is integer bookkeeping;
golden `context_windows` pins it down.

Reference behaviour (`WanI2VLongPipeline.__call__`, REFERENCE.md 2.5, quirks 2, 3, 7):

- raw windows start at 0, C-O, 2(C-O), ... while the start is below N-O, each C frames long, indices
  taken modulo N (`context_scheduler(step=0, ..., context_stride=1)`; for N <= C it yields range(N));
- `context_step = min(1, ceil(log2(N / C)) + 1)` and the LAST window is then replaced by
  `range(N - C*context_step, N, context_step) % N`: for N >= C the C frames ending at N-1, so the last
  overlap is usually larger than O;
- window w > 0 is blended with window w-1 over their L shared frames (the first L of w, the last L of
  w-1) with float32 weights j/(L-1) for the new window; L == 1 divides by zero;
- window w reads the driving features `[w0*4, w_last*4 + 1)`: 4(C-1)+1 frames for a contiguous window.

Where the reference is defined and correct (N >= C) our plan is exactly its plan. Where it fails or
degrades (N < C: duplicate indices with the reference image conditioning the wrong frame and misaligned
expression chunks for C/2 < N < C, `ValueError` for C/4 < N <= C/2, reversed wrapped windows below) we
define a SHORT-VIDEO plan instead: one window of the normal C latent frames over a video extended to C
frames, whose driving features hold the last real driving frame over the extension; only the first N
latent frames are output. Every model call therefore keeps the shapes it has for long videos (the same
`y`, sequence length and expression-chunk count), the extension frames only continue the last pose,
and they are dropped before decoding. A video with fewer than 5 driving frames (N < 2) has nothing to
output once the reference's first-frame drop is applied, and is refused with a clear error; so is any
plan whose blend would divide by zero (an overlap of exactly one frame).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

import torch

# One latent frame covers 4 video frames, except the first (the Wan VAE's causal time compression).
FRAMES_PER_LATENT = 4
# Image sides are rounded up to a multiple of this (VAE stride 8 times the DiT's 2x2 patch).
SIZE_MULTIPLE = 16


# ---------------------------------------------------------------------------------------------------
# Frame counts and image size (fast_infer.py / infer.py)


def find_replacement(num_video_frames: int) -> int:
    """Largest n <= num_video_frames with n % 4 == 1, 0 if there is none (fast_infer.find_replacement)."""
    if num_video_frames <= 0:
        return 0
    return (num_video_frames - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT + 1


def pipeline_num_frames(num_frames: int) -> int:
    """The pipeline's own rounding to 4k+1, `(n - 1) // 4 * 4 + 1` unless already 4k+1 (Python `//`)."""
    if num_frames % FRAMES_PER_LATENT == 1:
        return num_frames
    return (num_frames - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT + 1


def latent_length_for(num_frames: int) -> int:
    """Latent frames of a 4k+1-frame video: k + 1 (first latent frame = one video frame)."""
    if num_frames < 1 or num_frames % FRAMES_PER_LATENT != 1:
        raise ValueError(f"a video of {num_frames} frames has no latent length: it needs 4k+1 frames, k >= 0")
    return (num_frames - 1) // FRAMES_PER_LATENT + 1


@dataclass(frozen=True)
class FrameCounts:
    """How many driving frames are used and how many frames come out (the reference drops frame 0)."""

    video_frames: int
    num_frames: int  # driving frames used: find_replacement(video_frames), 4k+1
    latent_length: int  # N = (num_frames - 1) / 4 + 1
    output_frames: int  # num_frames - 1


def frame_counts(video_frames: int) -> FrameCounts:
    """The frame bookkeeping of fast_infer.py for a driving video; at least 5 frames are required."""
    num_frames = find_replacement(video_frames)
    if num_frames < 1 + FRAMES_PER_LATENT:
        raise ValueError(
            f"the driving video has {video_frames} frame(s); at least {1 + FRAMES_PER_LATENT} are needed "
            "(the first generated frame is the reference image and is dropped)"
        )
    return FrameCounts(video_frames, num_frames, latent_length_for(num_frames), num_frames - 1)


def scaled_image_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) of the reference image as fast_infer.py resizes it.

    `scale = max_size / max(w, h)`, sides truncated with int() (so small images are upscaled), then each
    side rounded UP to a multiple of 16, which slightly changes the aspect ratio.
    """
    if width <= 0 or height <= 0 or max_size <= 0:
        raise ValueError(f"image size {width}x{height} with max_size {max_size} is not positive")
    scale = max_size / max(width, height)
    scaled_w, scaled_h = int(width * scale), int(height * scale)
    return _round_up(scaled_w, SIZE_MULTIPLE), _round_up(scaled_h, SIZE_MULTIPLE)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------------------
# The reference's own window construction, failures included (the golden kind checks these)


def reference_context_step(latent_length: int, context_size: int) -> int:
    """`min(1, int(ceil(log2(N / C))) + 1)`: 1 for N > C/2, 0 or negative below."""
    return min(1, math.ceil(math.log2(latent_length / context_size)) + 1)


def reference_raw_windows(latent_length: int, context_size: int, context_overlap: int) -> list[list[int]]:
    """`context_scheduler(0, 31, N, C, context_stride=1, context_overlap=O)` before the replacement."""
    n, c, o = latent_length, context_size, context_overlap
    if n <= c:
        return [list(range(n))]
    # ordered_halving(step=0) is 0, so there is no padding offset and only stride 1 is used.
    return [[e % n for e in range(start, start + c)] for start in range(0, n - o, c - o)]


def reference_windows(latent_length: int, context_size: int, context_overlap: int) -> list[list[int]]:
    """The reference's windows, raising where it raises (`range()` with step 0 for C/4 < N <= C/2)."""
    n, c = latent_length, context_size
    windows = reference_raw_windows(n, c, context_overlap)
    step = reference_context_step(n, c)
    windows[-1] = [e % n for e in range(n - c * step, n, step)]
    return windows


def reference_emo_slice(window: list[int]) -> tuple[int, int]:
    """Driving-frame slice `[w0*4, w_last*4 + 1)` the reference feeds to the portrait encoder."""
    return window[0] * FRAMES_PER_LATENT, window[-1] * FRAMES_PER_LATENT + 1


def emo_positions(num_emo_frames: int) -> int:
    """Latent positions `split_audio_adapter_sequence` makes of a feature slice: int((F-1)/4) + 1."""
    return int((num_emo_frames - 1) / FRAMES_PER_LATENT) + 1


def blend_weights(overlap: int) -> torch.Tensor:
    """Weights of the NEW window over an overlap of L frames: float32 j/(L-1), j = 0..L-1.

    The reference fills a float32 tensor with the Python quotient (a double rounded once to float32);
    the previous window gets `1 - w` computed in float32. `overlap == 1` divides by zero, as there.
    """
    weights = torch.zeros(overlap, dtype=torch.float32)
    for j in range(overlap):
        weights[j] = j / (overlap - 1)
    return weights


# ---------------------------------------------------------------------------------------------------
# Our plan


@dataclass(frozen=True)
class WindowPlan:
    """Windows over a latent video, as contiguous frame ranges in denoising order.

    `latent_length` is N, the latent frames of the output. `generated_length` is the length the sampler
    works on: N, or C for the short-video plan (then frames N..C-1 are an extension that is never
    output). Window w covers latent frames `[starts[w], starts[w] + context_size)`; starts increase
    strictly, so consecutive windows share their first/last `overlaps[w]` frames (`overlaps[0] == 0`).
    """

    latent_length: int
    context_size: int
    context_overlap: int
    starts: tuple[int, ...]
    overlaps: tuple[int, ...]
    short_video: bool
    _weights: tuple[torch.Tensor, ...] = field(repr=False, compare=False)

    @property
    def generated_length(self) -> int:
        return self.starts[-1] + self.context_size

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    @property
    def num_feature_frames(self) -> int:
        """Driving frames behind the output: 4(N-1)+1."""
        return (self.latent_length - 1) * FRAMES_PER_LATENT + 1

    def window(self, w: int) -> range:
        """Latent frames of window w (global indices in the generated video)."""
        return range(self.starts[w], self.starts[w] + self.context_size)

    def windows(self) -> list[list[int]]:
        return [list(self.window(w)) for w in range(self.num_windows)]

    def bounds(self) -> list[tuple[int, int]]:
        return [(start, start + self.context_size) for start in self.starts]

    def blend_weights(self, w: int) -> torch.Tensor:
        """float32 [overlaps[w]] weights of window w over its overlap with window w-1 (empty for w=0)."""
        return self._weights[w]

    def feature_frames(self, w: int) -> list[int]:
        """Driving-frame index per feature row of window w: 4(C-1)+1 entries.

        Exactly the reference slice `[w0*4, w_last*4 + 1)` for normal plans; for the short-video plan
        the indices past the last driving frame hold it (clamped).
        """
        start, stop = reference_emo_slice(list(self.window(w)))
        last = self.num_feature_frames - 1
        return [min(i, last) for i in range(start, stop)]

    def last_window_covering(self, frame: int) -> int:
        """The last window that writes latent frame `frame` in a denoising step."""
        if not 0 <= frame < self.generated_length:
            raise IndexError(f"latent frame {frame} outside [0, {self.generated_length})")
        return bisect.bisect_right(self.starts, frame) - 1


def plan_windows(latent_length: int, context_size: int, context_overlap: int) -> WindowPlan:
    """The window plan for N latent frames: the reference's for N >= C, the short-video plan below."""
    n, c, o = latent_length, context_size, context_overlap
    if c < 1 or not 0 <= o < c:
        raise ValueError(f"context_size {c} and context_overlap {o} need 0 <= overlap < size")
    if n < 2:
        raise ValueError(
            f"{n} latent frame(s) leave no output frame (the first frame is dropped); "
            f"the driving video needs at least {1 + FRAMES_PER_LATENT} frames"
        )
    if n < c:
        return _make_plan(n, c, o, starts=(0,), short_video=True)
    windows = reference_windows(n, c, o)
    starts = tuple(window[0] for window in windows)
    for window in windows:
        # For N >= C only the last raw window can wrap (the others start below N - C), and it is
        # replaced by [N-C, N): every window is C contiguous frames. A violation is a bug here.
        if window != list(range(window[0], window[0] + c)):
            raise AssertionError(f"non-contiguous window {window} for N={n}, C={c}, O={o}")
    return _make_plan(n, c, o, starts=starts, short_video=False)


def _make_plan(n: int, c: int, o: int, *, starts: tuple[int, ...], short_video: bool) -> WindowPlan:
    overlaps = [0] + [max(0, prev + c - cur) for prev, cur in itertools.pairwise(starts)]
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise AssertionError(f"window starts {starts} do not increase")
    if 1 in overlaps:
        raise ValueError(
            f"N={n}, C={c}, O={o} gives an overlap of one frame, where the reference's blend ramp "
            "j/(L-1) divides by zero; choose another context_overlap"
        )
    weights = tuple(blend_weights(overlap) if w > 0 else torch.zeros(0) for w, overlap in enumerate(overlaps))
    return WindowPlan(n, c, o, starts, tuple(overlaps), short_video, weights)

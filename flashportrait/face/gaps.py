"""Filling frames without a face from the nearest frame with one, so results stay aligned with frames.

The reference drops frames without a face and then pairs the survivors with the original frame list,
shifting every later landmark onto the wrong frame (REFERENCE.md quirk 18). We keep one result per
frame: a frame without a face takes the result of the nearest frame with a face (the earlier one on a
tie; frames before the first face take the first face, frames after the last take the last), and a
per-frame mask says which frames had their own face.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def nearest_face_sources(mask: np.ndarray) -> np.ndarray:
    """For each frame, the index of the frame whose result it uses. `mask`: [N] bool -> [N] int64.

    Raises ValueError when no frame has a face (there is nothing to fill from).
    """
    faces = np.flatnonzero(mask)
    if faces.size == 0:
        raise ValueError("no frame has a face")
    frames = np.arange(len(mask))
    after = np.searchsorted(faces, frames)  # position of the first face at or after each frame
    has_prev, has_next = after > 0, after < faces.size
    prev_face = faces[np.clip(after - 1, 0, faces.size - 1)]
    next_face = faces[np.clip(after, 0, faces.size - 1)]
    use_prev = has_prev & (~has_next | (frames - prev_face <= next_face - frames))
    return np.where(use_prev, prev_face, next_face).astype(np.int64)


@dataclass(frozen=True)
class Filled(Generic[T]):
    """One frame's result: `value` is its own (`has_face`) or frame `source`'s."""

    index: int
    source: int
    has_face: bool
    value: T


class GapFiller(Generic[T]):
    """Streaming `nearest_face_sources`: feed results in frame order (None for no face), get `Filled`
    items in frame order. Holds one value and the indices of the frames waiting for the next face."""

    def __init__(self) -> None:
        self._last: tuple[int, T] | None = None
        self._waiting: list[int] = []
        self._count = 0

    @property
    def frames_seen(self) -> int:
        return self._count

    @property
    def any_face(self) -> bool:
        return self._last is not None

    def push(self, value: T | None) -> list[Filled[T]]:
        index = self._count
        self._count += 1
        if value is None:
            self._waiting.append(index)
            return []
        out = []
        for waiting in self._waiting:
            if self._last is not None and waiting - self._last[0] <= index - waiting:
                out.append(Filled(waiting, self._last[0], False, self._last[1]))
            else:
                out.append(Filled(waiting, index, False, value))
        out.append(Filled(index, index, True, value))
        self._waiting = []
        self._last = (index, value)
        return out

    def finish(self) -> list[Filled[T]]:
        """The frames after the last face. Raises ValueError when no frame had a face."""
        if self._last is None:
            raise ValueError("no frame has a face")
        out = [Filled(w, self._last[0], False, self._last[1]) for w in self._waiting]
        self._waiting = []
        return out


def fill_stream(values: Iterable[T | None]) -> Iterator[Filled[T]]:
    """Every frame of `values` (None where no face), filled, in order."""
    filler: GapFiller[T] = GapFiller()
    for value in values:
        yield from filler.push(value)
    yield from filler.finish()

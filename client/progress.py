"""The progress line of `flashportrait animate`: window/step, a bar over window-steps, frames written,
time to first frame and elapsed time, e.g.

    window 2/5 step 3/4 [#########-----------] 45% | 12/40 frames written | first frame 3.2 s | 8.1 s

On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed whenever something
other than the elapsed time changed.
"""

from __future__ import annotations

import sys
from typing import TextIO

from flashportrait.client.client import Progress


def format_progress(
    progress: Progress,
    frames_written: int,
    first_frame_s: float | None,
    elapsed_s: float | None,
    width: int = 20,
) -> str:
    """One progress line (pure; see the module docstring). elapsed_s None leaves the time out."""
    total = max(progress.units_total, 1)
    fraction = min(max(progress.units_done / total, 0.0), 1.0)
    filled = round(fraction * width)
    if progress.window < 0:
        where = "conditioning" if progress.units_total else "starting"
    else:
        window = f"window {progress.window + 1}/{progress.num_windows}"
        where = f"{window} step {progress.step + 1}/{progress.num_steps}"
    parts = [
        f"{where} [{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}%",
        f"{frames_written}/{progress.frames_total} frames written",
    ]
    if first_frame_s is not None:
        parts.append(f"first frame {first_frame_s:.1f} s")
    if elapsed_s is not None:
        parts.append(f"{elapsed_s:.1f} s")
    return " | ".join(parts)


class ProgressLine:
    """Writes progress lines to `stream` (stderr by default); `enabled=False` writes nothing."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""
        self._drawn = False

    def update(
        self, progress: Progress, frames_written: int, first_frame_s: float | None, elapsed_s: float
    ) -> None:
        if not self.enabled:
            return
        if self.interactive:
            line = format_progress(progress, frames_written, first_frame_s, elapsed_s)
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self._drawn = True
            return
        line = format_progress(progress, frames_written, first_frame_s, None)
        if line != self._last:
            self._last = line
            self.stream.write(f"{line} | {elapsed_s:.1f} s\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A whole line of text (ends a redrawn progress line first)."""
        if not self.enabled:
            return
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

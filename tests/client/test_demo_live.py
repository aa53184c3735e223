"""`flashportrait demo` end to end, as on a fresh machine: an empty cache (demo weights and the
feature extractor are written), a local server started for the run, a playable MP4 at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

pytestmark = pytest.mark.server


def test_demo_writes_a_playable_mp4_with_the_driving_audio(tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    env = {**os.environ, "FLASHPORTRAIT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("FLASHPORTRAIT_WEIGHTS", None)
    argv = [
        sys.executable,
        "-m",
        "flashportrait.cli",
        "demo",
        "--out",
        str(out),
        "--frames",
        "9",
        "--max-size",
        "64",
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "8/8 frames written" in done.stderr and "local server ready" in done.stderr
    assert (tmp_path / "cache" / "demo_weights" / "seed0" / "READY").is_file()
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.average_rate == Fraction(25) and audio.codec_context.name == "aac"
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video)])
    # 9 driving frames give 8 output frames (the reference drops its frame 0), 64 pixels on the long side.
    assert frames.shape == (8, 64, 64, 3)
    assert frames.std() > 1.0

"""A 10-minute driving video streams like a 20-second one: same work before the first chunk, same
first frames, and the same peak memory (issue 4's done-when; tiny random models on the CPU).

Each length runs in its own process (`python -m tests.sampling.test_long_video FRAMES`), both at
once, one thread each. Memory is the process's resident set: the kernel's high-water mark (VmHWM) is
reset once the models and the request exist (where /proc/self/clear_refs is writable), so the peak
covers `generate` alone, and glibc is told
to map every allocation above 64 KiB on its own (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave
the resident set instead of lingering in the heap (its adaptive threshold otherwise keeps a few
freed megabytes resident, by allocation history rather than by what is live).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FPS = 25
LONG_FRAMES = 10 * 60 * FPS  # 15,000
SHORT_FRAMES = 20 * FPS  # 500
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def stream(frames: int) -> dict:
    """Generate `frames` driving frames of synthetic features with a tiny sampler; report the work
    before the first chunk, the first chunk's hash and the memory."""
    import numpy as np
    import torch

    from flashportrait.sampling.params import GenerationParams
    from flashportrait.sampling.random_models import SamplerSizes, random_sampler
    from flashportrait.sampling.sampler import GenerationProgress, GenerationRequest, VideoChunk

    torch.set_num_threads(1)
    sampler = random_sampler(SamplerSizes.tiny(width=16), seed=0)
    # 16x16 pixel images -> 2x2 latents; windows of 8 latent frames overlapping by 2; 2 Euler steps.
    params = GenerationParams(max_size=16, context_size=8, context_overlap=2, scheduler="euler", steps=2)
    # The same leading frames for both lengths (row i of the features does not depend on `frames`).
    rng = np.random.default_rng(0)
    features = np.empty((frames, 554), dtype=np.float32)
    for start in range(0, frames, 1000):
        rows = min(1000, frames - start)
        features[start : start + rows] = rng.standard_normal((rows, 554), dtype=np.float32)
    image = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    request = GenerationRequest(
        image, features, torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), params=params
    )

    # Reset VmHWM to the current resident set; where that is refused, VmHWM also covers building the
    # models and inputs (the same in both processes).
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
    base = _status_kib("VmRSS")
    first_units, first_hash, emitted, live = None, "", 0, 0
    units = 0
    for event in sampler.generate(request):
        if isinstance(event, VideoChunk):
            if first_units is None:
                first_units = units
                first_hash = hashlib.sha256(event.frames.tobytes()).hexdigest()
            emitted = event.frame_stop
        elif isinstance(event, GenerationProgress):
            units = event.units_done
            live = max(live, event.live_latent_frames)
    return {
        "frames": frames,
        "emitted": emitted,
        "units": units,
        "first_units": first_units,
        "first_hash": first_hash,
        "live": live,
        "base_kib": base,
        "peak_kib": _status_kib("VmHWM"),
        "inputs_kib": features.nbytes // 1024,
    }


def _run_both() -> tuple[dict, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.sampling.test_long_video", str(frames)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for frames in (LONG_FRAMES, SHORT_FRAMES)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results[0], results[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc/self/status")
def test_ten_minute_video_streams_like_a_twenty_second_one():
    long, short = _run_both()
    assert (long["emitted"], short["emitted"]) == (LONG_FRAMES - 4, SHORT_FRAMES - 4)  # 4k+1, minus frame 0
    assert long["units"] > 25 * short["units"]
    # The same window-steps before the first chunk, and the same first frames.
    assert long["first_units"] == short["first_units"] and long["first_units"] > 0
    assert long["first_hash"] == short["first_hash"]
    assert (
        long["live"] <= short["live"]
    )  # latent frames held (the short one peaks at its longer last overlap)
    # Peak memory while generating: what `generate` added on top of models and inputs, within a few
    # percent (plus 2 MiB for the allocator's granularity), and the whole process without its inputs.
    grown_long = long["peak_kib"] - long["base_kib"]
    grown_short = short["peak_kib"] - short["base_kib"]
    assert grown_long <= grown_short * 1.05 + 2048, (long, short)
    total_long = long["peak_kib"] - long["inputs_kib"]
    total_short = short["peak_kib"] - short["inputs_kib"]
    assert total_long <= total_short * 1.03, (long, short)


if __name__ == "__main__":
    print(json.dumps(stream(int(sys.argv[1]))))

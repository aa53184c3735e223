"""`bench/sampler.py` gets one shot on the H200: keep its CPU mode working."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

COMMAND = ["bench/sampler.py", "--tiny", "--device", "cpu", "--frames", "41,297", "--repeats", "1"]


def test_tiny_sampler_benchmark_runs():
    proc = subprocess.run([sys.executable, *COMMAND], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# command: ") and lines[0].endswith(" ".join(COMMAND))
    step = [line for line in lines if line.startswith("| DiT batched + combine")]
    assert len(step) == 1 and step[0].split(" | ")[1:3] == ["2", "204"] and step[0].endswith("| yes |")
    rows = {line.split(" | ")[0]: line.split(" | ") for line in lines if "driving frames" in line}
    assert set(rows) == {"| 41 driving frames", "| 297 driving frames"}
    # 41 frames: 11 latent frames < 51, one window of 4 steps; 297 frames: 75 latent frames, windows
    # [0, 51), [21, 72), [24, 75): window 0's last step needs every window's step 2 (10 of 12 units).
    assert rows["| 41 driving frames"][2] == "4 / 4" and rows["| 297 driving frames"][2] == "10 / 12"
    assert all(row[-1] == "yes |" for row in rows.values())

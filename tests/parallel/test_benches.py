"""The H200 benchmark scripts of issue 9 run their CPU smoke modes (the lead gets one shot on the GPU)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_memory_modes_bench_tiny():
    out = _run(
        "bench/memory_modes.py", "--tiny", "--device", "cpu", "--modes", "components+blockwise,fp8+blockwise"
    )
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| mode",
        "| resident",
        "| components+blockwise",
        "| fp8+blockwise",
    ]
    assert rows[2].endswith("| 0.000 |")  # bit-identical frames
    assert all(" | ok | " in r for r in rows[1:])


def test_sequence_parallel_bench_tiny():
    out = _run("bench/sequence_parallel.py", "--tiny", "--device", "cpu", "--gpus", "1,2")
    rows = [line for line in out.splitlines() if line.startswith("| 5 |")]
    assert len(rows) == 2 and all(r.endswith("| yes |") for r in rows)

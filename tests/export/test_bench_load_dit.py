"""bench/load_dit.py at tiny size on the CPU (the lead runs the full size on the H200)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "load_dit.py"


def test_load_dit_bench_runs_at_tiny_size(tmp_path):
    command = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| mmap", "| direct"))]
    assert len(rows) == 4 and all(row.endswith("| yes |") for row in rows)  # every load bit-exact
    assert f"command: python bench/load_dit.py --tiny --device cpu --dir {tmp_path}" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the file is removed


def test_free_space_is_checked_before_writing(tmp_path):
    spec = importlib.util.spec_from_file_location("load_dit_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.space_problem(tmp_path, 1024) is None
    problem = bench.space_problem(tmp_path, 2**60)
    assert problem is not None and "pass --dir on a larger disk" in problem

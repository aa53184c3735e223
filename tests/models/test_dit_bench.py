"""`bench/dit_forward.py` gets one shot on the H200: keep its CPU mode working, with torch alone."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# Run the script as the lead will, but with safetensors and numpy unimportable: the benchmark
# machine may have nothing but torch.
TORCH_ONLY = (
    "import runpy, sys; sys.modules['safetensors'] = None; sys.modules['numpy'] = None; "
    "sys.argv = ['bench/dit_forward.py', '--tiny', '--repeats', '1', '--batch', '2']; "
    "runpy.run_path('bench/dit_forward.py', run_name='__main__')"
)


def test_tiny_benchmark_runs_with_torch_only():
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith("| exact") or line.startswith("| sdpa_math")
    ]
    assert len(rows) == 2 and all("| yes |" in row and "[2, 16, 5, 8, 8]" in row for row in rows), proc.stdout
    assert "command: " in proc.stdout

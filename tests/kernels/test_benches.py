"""`bench/kernels.py` and `bench/fp8_error.py` get one shot on the H200: keep their CPU modes working."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flashportrait.kernels.api import triton_importable

from tests.conftest import REPO

# fp8_error needs torch alone (the benchmark machine may have nothing else); kernels.py runs its
# kernels through Triton's interpreter on the CPU, which needs triton and numpy.
TORCH_ONLY = (
    "import runpy, sys; sys.modules['safetensors'] = None; sys.modules['numpy'] = None; "
    "sys.argv = ['bench/fp8_error.py', '--device', 'cpu', '--tiny']; "
    "runpy.run_path('bench/fp8_error.py', run_name='__main__')"
)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not triton_importable(), reason="the triton package is not installed")
def test_kernel_benchmark_cpu_mode():
    proc = _run(["bench/kernels.py", "--device", "cpu", "--tiny", "--warmup", "0", "--repeats", "1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "kernel |" not in line]
    assert len(rows) == 8 and all(row.endswith("| yes |") for row in rows), proc.stdout
    assert "command: " in proc.stdout and "copy bandwidth" in proc.stdout


def test_fp8_error_benchmark_cpu_mode_with_torch_only():
    proc = _run(["-c", TORCH_ONLY])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if "| Gaussian |" in line or "| outlier" in line]
    assert len(errors) == 8, proc.stdout
    # fp8 vs float32 of a Gaussian layer: e4m3's ~3.7%, bf16's ~0.17%.
    first = [float(v) for v in errors[0].strip("|").split("|")[2:]]
    assert first[0] < 4e-3 and 0.02 < first[1] < 0.06

"""Every kernel variant compiles for the H200 (sm_90) without spills, checked without a GPU.

The CPU interpreter does not run Triton's compiler, which is stricter; `compile_check` compiles the
launches the real launchers make, with Triton's bundled ptxas, in a subprocess without the
interpreter flag that this test session sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flashportrait.kernels.api import triton_importable

from tests.conftest import REPO


def _ptxas() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


@pytest.mark.skipif(not triton_importable() or _ptxas() is None, reason="needs triton with its bundled ptxas")
def test_every_variant_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "flashportrait.kernels.compile_check", "--arch", "90"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 18 and all(row.endswith("| yes |") for row in rows), proc.stdout

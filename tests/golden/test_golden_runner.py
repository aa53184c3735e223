"""Every golden case passes through `python -m flashportrait.golden`, one test per kind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashportrait.golden import GoldenCase, run_case
from flashportrait.golden.runner import KINDS
from tests.conftest import find_shared

GOLDEN = find_shared() / "golden"
CASES = sorted(p for p in GOLDEN.glob("*.json") if "kind" in json.loads(p.read_text()))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case_passes(path):
    result = run_case(GoldenCase.load(path))
    assert result.passed, "\n".join([result.line()] + [c.line() for c in result.comparisons if not c.passed])


def test_every_golden_kind_has_an_implementation():
    kinds = {json.loads(p.read_text())["kind"] for p in CASES}
    assert kinds <= set(KINDS)


def test_unknown_kind_is_a_failure(tmp_path):
    case = tmp_path / "odd.json"
    case.write_text(json.dumps({"kind": "no_such_kind", "case": "odd"}))
    proc = subprocess.run(
        [sys.executable, "-m", "flashportrait.golden", str(case)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "odd no_such_kind FAIL" in proc.stdout
    assert proc.stdout.strip().endswith("0 passed, 1 failed")

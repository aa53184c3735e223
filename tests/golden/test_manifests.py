"""Our full-size models have exactly the release checkpoints' parameter names and shapes."""

from __future__ import annotations

import pytest

from flashportrait.golden.manifests import check_manifest
from tests.conftest import find_shared

MANIFESTS = sorted((find_shared() / "golden" / "manifests").glob("*.json"))


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_manifest_matches(path):
    result = check_manifest(path)
    assert result.passed, "\n".join([result.line()] + [c.line() for c in result.comparisons])

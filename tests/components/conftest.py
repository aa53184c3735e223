"""Demo weights written once per session (tiny sizes, seed 0), shared by the component tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flashportrait.export.demo_weights import write_demo_weights

from flashportrait.components import WeightPaths


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory) -> WeightPaths:
    return write_demo_weights(tmp_path_factory.mktemp("demo_weights") / "weights", seed=0)


@pytest.fixture(scope="session")
def manifests(shared_dir: Path) -> dict[str, dict]:
    folder = shared_dir / "golden" / "manifests"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}

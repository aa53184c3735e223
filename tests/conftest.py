"""Shared fixtures: where the read-only reference material (`../shared`) lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_shared() -> Path:
    """`$FLASHPORTRAIT_SHARED`, else `../shared` beside the checkout, else `shared/` inside it."""
    candidates = []
    if os.environ.get("FLASHPORTRAIT_SHARED"):
        candidates.append(Path(os.environ["FLASHPORTRAIT_SHARED"]))
    candidates += [REPO.parent / "shared", REPO / "shared"]
    for candidate in candidates:
        if (candidate / "golden" / "index.json").is_file():
            return candidate
    raise RuntimeError(
        "the reference material (golden vectors, media, weights) was not found; set FLASHPORTRAIT_SHARED "
        f"to its folder (looked in {[str(c) for c in candidates]})"
    )


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return find_shared()


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    return shared_dir / "golden"

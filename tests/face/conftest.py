"""Fixtures of the face front-end tests: the release's two ONNX models and the real driving clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashportrait.face.pipeline import FaceFrontEnd, FaceFrontEndConfig


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return shared_dir / "weights"


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data"


@pytest.fixture(scope="session")
def front_end_config(weights_dir: Path) -> FaceFrontEndConfig:
    return FaceFrontEndConfig(
        detector_model=str(weights_dir / "face_det.onnx"),
        landmark_model=str(weights_dir / "face_landmark.onnx"),
    )


@pytest.fixture(scope="session")
def front_end(front_end_config: FaceFrontEndConfig) -> FaceFrontEnd:
    return FaceFrontEnd(front_end_config)

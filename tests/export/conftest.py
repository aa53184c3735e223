"""Demo weights and their prepared folders, written once for the whole folder (tiny sizes, seed 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flashportrait.export.demo_weights import write_demo_weights
from flashportrait.export.prepare_weights import PrepareOptions, prepare_weights

from flashportrait.components import WeightPaths


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> WeightPaths:
    return write_demo_weights(tmp_path_factory.mktemp("export_release") / "weights", seed=0)


@pytest.fixture(scope="session")
def prepared(release, tmp_path_factory) -> Path:
    """bf16 storage, both modes, fp8 DiT files: what a deployment prepares."""
    out = tmp_path_factory.mktemp("export_prepared") / "prepared"
    prepare_weights(release, out, PrepareOptions(fp8=True))
    return out


@pytest.fixture(scope="session")
def prepared_f32(release, tmp_path_factory) -> Path:
    """float32 storage: loads bit for bit like the release folder loaded in float32."""
    out = tmp_path_factory.mktemp("export_prepared_f32") / "prepared"
    prepare_weights(release, out, PrepareOptions(dtype=torch.float32))
    return out

"""The served sampler's `memory` setting: resolution with fallbacks, and the same frames as resident."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flashportrait.config import ConfigError
from flashportrait.serving.sampler_service import SamplerJob, SamplerService
from flashportrait.serving.settings import SamplerSettings, TextEncoderSettings, resolve_deployment


def test_memory_resolution_and_errors():
    env = {"FLASHPORTRAIT_MEMORY": "blockwise+components"}
    base = dict(device="cpu", random_weights="tiny")
    assert resolve_deployment(SamplerSettings(**base), env={}).memory == "resident"
    assert resolve_deployment(SamplerSettings(**base), env=env).memory == "components+blockwise"
    assert resolve_deployment(SamplerSettings(**base, memory="fp8"), env=env).memory == "fp8"
    # precision fp8 is the fp8 option of the memory mode
    folded = resolve_deployment(SamplerSettings(**base, precision="fp8", memory="blockwise"), env={})
    assert folded.memory == "fp8+blockwise"
    with pytest.raises(ConfigError, match="memory mode 'swap' is not valid"):
        resolve_deployment(SamplerSettings(**base, memory="swap"), env={})
    assert resolve_deployment(TextEncoderSettings(weights="."), env=env).memory == "resident"


def _frames(memory: str) -> np.ndarray:
    settings = SamplerSettings(device="cpu", random_weights="tiny", memory=memory)
    service = SamplerService(settings, resolve_deployment(settings, env={}))
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(png, format="PNG")
    job = SamplerJob(
        image=png.getvalue(),
        features=rng.standard_normal((13, 554), dtype=np.float32),
        prompt_embeds=rng.standard_normal((3, 16), dtype=np.float32),
        parameters={"max_size": 32, "context_size": 3, "context_overlap": 2, "progress": False},
        label="request mem",
    )
    return np.concatenate([r["FRAMES"] for r in service.stream(job)])


def test_offloading_modes_give_the_resident_frames(capsys: pytest.CaptureFixture[str]):
    resident = _frames("resident")
    assert resident.shape[0] == 12 and resident.std() > 0
    np.testing.assert_array_equal(_frames("components+blockwise"), resident)
    assert "RANDOM WEIGHTS" in capsys.readouterr().err

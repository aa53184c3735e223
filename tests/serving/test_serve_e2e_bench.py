"""bench/serve_e2e.py in its tiny CPU mode through a real tritonserver, and the sampler's random-weights
mode it relies on (benchmarks only: never reachable from a request)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from flashportrait.config import ConfigError
from flashportrait.serving.sampler_service import SamplerJob, SamplerService
from flashportrait.serving.settings import (
    RANDOM_WEIGHTS_ENV,
    SamplerSettings,
    TextEncoderSettings,
    resolve_deployment,
)
from flashportrait.serving.streaming import RequestError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_e2e", REPO_ROOT / "bench" / "serve_e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_e2e"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_random_weights_need_no_weights_folder_and_only_the_sampler_reads_them() -> None:
    env = {RANDOM_WEIGHTS_ENV: "tiny"}
    deployment = resolve_deployment(SamplerSettings(device="cpu"), env=env)
    assert (deployment.random_weights, deployment.device, deployment.dtype) == ("tiny", "cpu", "float32")
    # The model parameter wins over the environment, like every other setting.
    assert resolve_deployment(SamplerSettings(random_weights="release"), env=env).random_weights == "release"
    with pytest.raises(ConfigError, match="random_weights must be one of"):
        resolve_deployment(SamplerSettings(random_weights="huge"))
    # Other models have no such mode: they still need their weights folder.
    with pytest.raises(ConfigError, match="no weights folder"):
        resolve_deployment(TextEncoderSettings(), env=env)
    with pytest.raises(ConfigError, match="no weights folder"):
        resolve_deployment(SamplerSettings(), env={})


def test_a_request_cannot_switch_the_weights(capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    settings = SamplerSettings(device="cpu", random_weights="tiny")
    service = SamplerService(settings, resolve_deployment(settings, env={}))
    assert "RANDOM WEIGHTS (tiny sizes)" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    job = SamplerJob(
        image=b"",
        features=rng.standard_normal((9, 554), dtype=np.float32),
        prompt_embeds=rng.standard_normal((3, 16), dtype=np.float32),
        parameters={"random_weights": "release"},
        label="request r1",
    )
    with pytest.raises(RequestError, match=r"unknown generation parameter.*random_weights"):
        next(service.stream(job))


def test_runtime_repository_has_one_sampler_instance(bench: ModuleType, tmp_path: Path) -> None:
    gpu = bench.sampler_config("cuda", "gpu")
    assert "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0 ] } ]" in gpu
    assert 'parameters { key: "device" value: { string_value: "" } }' in gpu
    cpu = bench.sampler_config("cpu", "cpu")
    assert "instance_group [ { kind: KIND_CPU count: 1 } ]" in cpu
    assert 'string_value: "cpu"' in cpu
    assert len(re.findall("instance_group", gpu)) == len(re.findall("instance_group", cpu)) == 1
    root = bench.build_repository(tmp_path / "repo", "cpu", "cpu")
    assert sorted(p.name for p in root.iterdir()) == ["sampler"]
    assert (
        root / "sampler" / "1" / "model.py"
    ).resolve() == REPO_ROOT / "model_repository/sampler/1/model.py"
    assert bench.parse_size("480x832") == (480, 832)


def test_the_bench_reads_the_samplers_peak_memory_note(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from flashportrait.serving import sampler_service

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 47.25 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 52.5 * 2**30)
    assert sampler_service._memory_note("cpu") == ""
    line = "request r: done, 296 frames in 80.00 s (first frame after 60.00 s)"
    found = re.search(bench.MEMORY_NOTE, line + sampler_service._memory_note("cuda:0"))
    assert found is not None and (float(found.group(1)), float(found.group(2))) == (47.25, 52.5)


@pytest.mark.server
def test_tiny_cpu_run_through_a_real_server(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--tiny", "--device", "cpu", "--sizes", "32x32,48x32", "--frames", "45", "--long-frames", "300"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["error"] is None and payload["random_weights_logged"]
    rows = {row["name"] + f" {row['height']}x{row['width']}": row for row in payload["results"]}
    assert list(rows) == [
        "warm-up 32x32",
        "45 frames 32x32",
        "300 frames, to 1st frame 32x32",
        "probe after the cancel 32x32",
        "45 frames 48x32",
    ]
    for name in ("45 frames 32x32", "45 frames 48x32"):
        row = rows[name]
        # find_replacement(45) - 1 = 44 frames, every one received, of the requested size.
        assert (row["status"], row["frames_received"], row["expected_frames"]) == ("ok", 44, 44)
        assert row["shapes_ok"]
        assert 0 < row["first_response_s"] <= row["ttff_s"] <= row["total_s"]
        assert row["server_ttff_s"] is not None and row["server_ttff_s"] <= row["ttff_s"]
        assert row["output_fps"] == pytest.approx(44 / row["total_s"])
        assert row["units_total"] == row["units_done"] == 4 and row["units_at_first_frame"] <= 4
        assert 0 < row["step_s"] < row["total_s"]
    long = rows["300 frames, to 1st frame 32x32"]
    assert long["status"] == "stopped at first frame"
    assert long["expected_frames"] == 296 and 0 < long["frames_received"] < 296
    # 300 frames -> 75 latent frames -> 3 windows of 51 with overlap 30 (12 window-steps), the first
    # frames final after 10 of them.
    assert (long["units_at_first_frame"], long["units_total"]) == (10, 12)
    assert (rows["warm-up 32x32"]["status"], rows["warm-up 32x32"]["frames_received"]) == ("ok", 4)
    probe = rows["probe after the cancel 32x32"]
    assert (probe["status"], probe["frames_received"]) == ("ok", 4)
    assert probe["note"].startswith("first response ")
    log = (out / "tritonserver-0.log").read_text()
    assert "RANDOM WEIGHTS (tiny sizes)" in log
    assert re.search(r"request e2e3-32x32-300: stopped after unit \d+/12", log)
    # Over time: a request cut by --request-limit-s is cancelled and reported, not a failure.
    out2 = tmp_path / "out2"
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--sizes",
        "32x32",
        "--frames",
        "3000",
        "--long-frames",
        "0",
        "--no-warmup",
    ]
    assert bench.main([*argv, "--request-limit-s", "0.3", "--out", str(out2)]) == 0
    (row,) = json.loads((out2 / "results.json").read_text())["results"]
    assert row["status"] == "over time (0.3 s)" and row["frames_received"] < 2996

"""perf_analyzer smoke test: the real binary, gRPC streaming, against the decoupled test model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flashportrait.serving.metrics import sample, scrape
from flashportrait.serving.perf import (
    PERF_LIBRARIES,
    PerfOptions,
    parse_profile_export,
    perf_library_dirs,
    run_perf_analyzer,
)
from flashportrait.serving.server import TritonServer

INPUT_DATA = Path(__file__).resolve().parent / "stream_chunks_input.json"
# From INPUT_DATA: each request streams 4 chunks of 4 frames, computing each for 50 ms.
CHUNKS, DELAY_S = 4, 0.050


def test_libraries_for_perf_analyzer_are_found() -> None:
    folders, sources = perf_library_dirs()
    assert set(sources) == set(PERF_LIBRARIES)
    for name in PERF_LIBRARIES:
        if sources[name] != "system":
            assert any((folder / name).exists() for folder in folders), sources


def test_profile_export_parsing() -> None:
    export = {
        "experiments": [
            {
                "experiment": {"mode": "concurrency", "value": 2},
                "requests": [
                    {"timestamp": 1_000_000_000, "response_timestamps": [1_250_000_000, 1_500_000_000]},
                    {"timestamp": 2_000_000_000, "response_timestamps": [2_100_000_000]},
                    {"timestamp": 3_000_000_000, "response_timestamps": []},
                ],
                "window_boundaries": [],
            }
        ],
        "version": "2.51.0",
    }
    (experiment,) = parse_profile_export(export)
    assert (experiment.mode, experiment.value, len(experiment.requests)) == ("concurrency", 2.0, 2)
    assert experiment.time_to_first_response_s().tolist() == pytest.approx([0.25, 0.1])
    summary = experiment.summary()
    assert summary["ttfr_max_s"] == pytest.approx(0.25)
    assert summary["last_response_mean_s"] == pytest.approx((0.5 + 0.1) / 2)


@pytest.mark.server
def test_perf_analyzer_streams_from_the_decoupled_model(server: TritonServer) -> None:
    frames_before = sample(
        scrape(server.metrics_url), "flashportrait_frames_generated_total", model="stream_chunks"
    )
    run = run_perf_analyzer(
        PerfOptions(
            model="stream_chunks", url=server.grpc_url, input_data=INPUT_DATA, concurrency=2, request_count=6
        )
    )
    assert "Detected decoupled model" in run.output
    (experiment,) = run.experiments()
    assert (experiment.mode, experiment.value) == ("concurrency", 2.0)
    assert len(experiment.requests) == 6
    for timing, raw in zip(experiment.requests, run.export["experiments"][0]["requests"], strict=True):
        # N data responses plus the empty final response perf_analyzer asks for.
        assert len(timing.response_ns) == CHUNKS + 1
        assert [out["CHUNK_INDEX"] for out in raw["response_outputs"][:CHUNKS]] == list(range(CHUNKS))
        # The first chunk needs one 50 ms unit of compute, the last one three more after it.
        assert timing.time_to_first_response_s >= DELAY_S
        assert timing.time_to_last_response_s - timing.time_to_first_response_s >= (CHUNKS - 1) * DELAY_S
    frames_after = sample(
        scrape(server.metrics_url), "flashportrait_frames_generated_total", model="stream_chunks"
    )
    assert frames_after - frames_before == 6 * CHUNKS * 4
    assert experiment.summary()["ttfr_p50_s"] >= DELAY_S


def test_unpacked_debian_package_and_cuda_runtime_wheel_are_preferred(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optional set-up step's layout: `dpkg-deb -x libb64-0d_*.deb <venv>/perf_libs` and
    `pip install nvidia-cuda-runtime-cu12` (site-packages/nvidia/cuda_runtime/lib)."""
    venv = tmp_path / "venv"
    b64 = venv / "perf_libs" / "usr" / "lib" / "x86_64-linux-gnu"
    b64.mkdir(parents=True)
    (b64 / "libb64.so.0d").write_bytes(b"")
    site = venv / "lib" / "site-packages"
    cudart = site / "nvidia" / "cuda_runtime" / "lib"
    cudart.mkdir(parents=True)
    (cudart / "libcudart.so.12").write_bytes(b"")
    monkeypatch.delenv("FLASHPORTRAIT_PERF_LIBS", raising=False)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "path", [str(site)])
    folders, sources = perf_library_dirs(cache_root=tmp_path / "cache")
    assert folders == (b64, cudart)
    assert sources["libb64.so.0d"].startswith("venv perf_libs")
    assert sources["libcudart.so.12"].startswith("nvidia-cuda-runtime-cu12")

"""The product on a live server: the project's model repository with the demo weights, started by the
test (`--model-config-name=cpu`, real gRPC), one server for the module.

Driving clips are short (13 frames): the full-size motion encoder costs about half a second per frame
on a CPU. Longer generations reuse the clip's features, repeated (`tile_features`).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from flashportrait.client.client import FlashPortraitClient, FramesChunk, GenerationCancelled, RequestFailed
from flashportrait.export.demo_weights import write_demo_weights
from PIL import Image

from flashportrait.demo import make_demo_media, write_driving_video
from flashportrait.face import FaceFrontEnd, FaceFrontEndConfig
from flashportrait.sampling.windows import scaled_image_size
from flashportrait.serving.local import local_server
from flashportrait.serving.metrics import sample, scrape
from flashportrait.serving.perf import PerfOptions, run_perf_analyzer
from flashportrait.serving.perf_inputs import SMOKE_PARAMETERS, perf_parameters
from tests.serving.product import CLIP_FRAMES, PROMPT, SAMPLER, SMALL, Product, collect, tile_features
from tests.serving.streams import wait_for

pytestmark = pytest.mark.server
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    root = tmp_path_factory.mktemp("product")
    weights = write_demo_weights(root / "weights", seed=0).root
    image_path, video_path = make_demo_media(root, CLIP_FRAMES)
    with local_server(
        weights, config_name="cpu", cache_root=root / "cache", log_path=root / "tritonserver.log"
    ) as server:
        with FlashPortraitClient(server.grpc_url) as client:
            driving = client.features(video_path.read_bytes(), "fixture-features")
            embeds, negative = client.text_embeddings(PROMPT, "", "fixture-text")
        yield Product(server, weights, image_path, video_path, driving, embeds, negative)


@pytest.fixture(scope="module")
def reference(product: Product) -> dict[int, np.ndarray]:
    """Frames of the direct path for SMALL and seeds 7 and 8, each run alone."""
    return {
        seed: collect(product.sample(f"reference-{seed}", {**SMALL, "seed": seed})).frames for seed in (7, 8)
    }


def metric(product: Product, name: str) -> float:
    return sample(scrape(product.server.metrics_url), name, **SAMPLER)


def test_features_are_the_face_pipeline_and_motion_encoder_run_in_process(product: Product) -> None:
    with grpcclient.InferenceServerClient(product.server.grpc_url) as client:
        video = grpcclient.InferInput("VIDEO", [1], "BYTES")
        video.set_data_from_numpy(np.array([product.video], dtype=np.object_))
        aligned = client.infer("face_align", [video], request_id="align-1")
    crops = aligned.as_numpy("CROPS")
    assets = product.weights / "FlashPortrait"
    front = FaceFrontEnd(
        FaceFrontEndConfig(str(assets / "face_det.onnx"), str(assets / "face_landmark.onnx"))
    )
    local = front.align_video(product.video)
    np.testing.assert_array_equal(crops, local.crops)
    assert aligned.as_numpy("FACE_MASK").tolist() == [True] * CLIP_FRAMES
    assert aligned.as_numpy("FPS").tolist() == [25, 1] and product.driving.fps == Fraction(25)
    import onnxruntime as ort

    onnx = next((product.server.options.model_repository / "feature_extractor" / "1").glob("model.onnx"))
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    expected = session.run(["FEATURES"], {"CROPS": crops[:4]})[0]
    assert product.driving.features.shape == (CLIP_FRAMES, 554)
    np.testing.assert_allclose(product.driving.features[:4], expected, rtol=1e-4, atol=1e-4)
    assert product.driving.features.std(axis=0).max() > 0  # frames differ (the head moves)


def test_ensemble_and_direct_paths_give_identical_frames(product: Product, reference: dict) -> None:
    with product.client() as client:
        generation, driving = client.animate(
            product.image, product.video, PROMPT, "", {**SMALL, "seed": 7}, ensemble=True, request_id="ens-1"
        )
        through_ensemble = collect(generation)
    assert driving is None
    direct = reference[7]
    width, height = scaled_image_size(256, 320, SMALL["max_size"])
    assert direct.shape == (CLIP_FRAMES - 1, height, width, 3) and direct.dtype == np.uint8
    np.testing.assert_array_equal(through_ensemble.frames, direct)
    assert through_ensemble.last.fps == Fraction(25) and through_ensemble.last.frames_total == CLIP_FRAMES - 1
    assert direct.std() > 1.0  # not a constant picture
    assert not np.array_equal(reference[7], reference[8])  # the seed matters


def test_chunks_arrive_in_order_cover_every_frame_and_start_before_the_last_window(product: Product) -> None:
    features = tile_features(product.driving.features, 41)  # 11 latent frames: 5 windows of 4, overlap 2
    seen_at_first_frames: list = []
    generation = product.sample(
        "order-1", {"max_size": 64, "context_size": 4, "context_overlap": 2}, features
    )
    chunks, progress = [], []
    for event in generation:
        if isinstance(event, FramesChunk):
            if not chunks:
                seen_at_first_frames.append(product.log_lines("order-1", r"window 5/5 step 4/4"))
            chunks.append(event)
        else:
            progress.append(event)
    starts = [c.frame_start for c in chunks]
    assert starts[0] == 0 and all(c.frame_start == p.frame_stop for p, c in itertools.pairwise(chunks))
    assert chunks[-1].frame_stop == 40 == chunks[-1].progress.frames_total
    assert len(chunks) > 1
    # Progress: one response after the conditioning, then one per window-step, in order.
    assert [p.units_done for p in progress] == list(range(21))
    assert {(p.num_windows, p.num_steps, p.units_total) for p in progress} == {(5, 4, 20)}
    # The first frames left while the last window still had all its steps to do.
    first = chunks[0].progress
    assert first.units_done <= first.units_total - first.num_steps
    assert seen_at_first_frames == [[]]
    assert len(product.log_lines("order-1", r"window \d+/5 step \d/4 \(unit \d+/20\)")) == 20


def test_cancelling_mid_stream_stops_the_work_within_one_window_step(product: Product) -> None:
    cancelled_before = metric(product, "flashportrait_cancellations_total")
    features = tile_features(product.driving.features, 201)  # 25 windows x 4 steps
    # 128 pixels: units long enough (tenths of a second) that the cancellation lands mid-stream.
    parameters = {"max_size": 128, "context_size": 4, "context_overlap": 2}
    generation = product.sample("cancel-1", parameters, features)
    units_seen = 0
    with pytest.raises(Exception) as stopped:
        for event in generation:
            progress = event.progress if isinstance(event, FramesChunk) else event
            units_seen = progress.units_done
            if units_seen >= 3:
                generation.cancel()
    assert isinstance(stopped.value, GenerationCancelled)
    assert wait_for(lambda: product.log_lines("cancel-1", r"stopped after unit (\d+)/100"), timeout_s=30)
    (line,) = product.log_lines("cancel-1", r"stopped after unit (\d+)/100")
    stopped_at = int(line.group(1))
    # The unit running when the cancellation arrived finishes, then no other starts: the work stops
    # within one window-step of the cancellation (allowing one more for the time it takes to arrive).
    assert units_seen <= stopped_at <= units_seen + 2, (units_seen, stopped_at)
    units_logged = product.log_lines("cancel-1", r"window \S+ step \S+ \(unit (\d+)/100\)")
    assert max(int(m.group(1)) for m in units_logged) == stopped_at
    assert wait_for(lambda: metric(product, "flashportrait_cancellations_total") == cancelled_before + 1)
    assert wait_for(lambda: metric(product, "flashportrait_active_generations") == 0)
    after = collect(product.sample("after-cancel", {**SMALL, "seed": 9}))
    assert after.frames.shape[0] == CLIP_FRAMES - 1


def _faceless_clip(path: Path) -> bytes:
    ramp = np.linspace(0, 255, 128 * 160 * 3, dtype=np.float32).reshape(128, 160, 3)
    write_driving_video(path, [np.roll(ramp, 7 * i, axis=1).astype(np.uint8) for i in range(9)], audio=False)
    return path.read_bytes()


def _large_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 4000), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sampler_error(product: Product, request_id: str, parameters: dict, image: bytes | None = None) -> str:
    with pytest.raises(RequestFailed) as failed:
        collect(product.sample(request_id, parameters, image=image))
    return str(failed.value)


def _features_error(product: Product, request_id: str, video: bytes) -> str:
    with product.client() as client, pytest.raises(RequestFailed) as failed:
        client.features(video, request_id)
    return str(failed.value)


def _ensemble_error(product: Product, request_id: str, video: bytes) -> str:
    with product.client() as client:
        generation, _ = client.animate(
            product.image, video, PROMPT, "", SMALL, ensemble=True, request_id=request_id
        )
        with pytest.raises(RequestFailed) as failed:
            collect(generation)
    return str(failed.value)


# case: (make the request and return the error, the message after "request <case>: ", failing model)
BAD_INPUTS = {
    "bad-image": (
        lambda p: _sampler_error(p, "bad-image", SMALL, image=b"this is not an image"),
        "cannot read the uploaded image (20 bytes) as an image",
        "sampler",
    ),
    "big-image": (
        lambda p: _sampler_error(p, "big-image", SMALL, image=_large_png()),
        "the image is 5000x4000 pixels (20.0 MP); this server accepts at most 16.8 MP",
        "sampler",
    ),
    "bad-video": (
        lambda p: _features_error(p, "bad-video", p.video[: len(p.video) // 2]),
        "cannot read the uploaded video",
        "face_align",
    ),
    "empty-video": (
        lambda p: _features_error(p, "empty-video", b""),
        "the driving video is empty (0 bytes)",
        "face_align",
    ),
    "no-face": (
        lambda p: _ensemble_error(p, "no-face", _faceless_clip(p.weights.parent / "faceless.mp4")),
        "no face found in any of the 9 frames of the driving video (160x128)",
        "face_align",
    ),
    "bad-name": (
        lambda p: _sampler_error(p, "bad-name", {**SMALL, "stepz": 4}),
        "unknown generation parameter(s) ['stepz']",
        "sampler",
    ),
    "bad-range": (
        lambda p: _sampler_error(p, "bad-range", {**SMALL, "max_size": 5000}),
        "max_size must be between 16 and 1280, got 5000",
        "sampler",
    ),
    "bad-scale": (
        lambda p: _sampler_error(p, "bad-scale", {**SMALL, "emo_cfg_scale": "lots"}),
        "emo_cfg_scale must be a number, got 'lots'",
        "sampler",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_per_request_error_and_the_server_stays_healthy(
    product: Product, case: str
) -> None:
    request, expected, model = BAD_INPUTS[case]

    def failures() -> float:
        return sample(scrape(product.server.metrics_url), "flashportrait_request_failures_total", model=model)

    before = failures()
    message = request(product)
    assert f"request {case}: {expected}" in message, message
    assert "Traceback" not in message
    with grpcclient.InferenceServerClient(product.server.grpc_url) as client:
        assert client.is_server_ready()
        for name in ("flashportrait", "flashportrait_features", "face_align", "feature_extractor", "sampler"):
            assert client.is_model_ready(name), name
    assert wait_for(lambda: failures() == before + 1)


def test_two_concurrent_clients_both_get_their_own_correct_video(product: Product, reference: dict) -> None:
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            results[seed] = collect(product.sample(f"conc-{seed}", {**SMALL, "seed": seed})).frames
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for seed in (7, 8):
        np.testing.assert_array_equal(results[seed], reference[seed])
    # Two sampler instances: both generations were running at the same time.
    log = product.server.log_text()
    assert log.index("request conc-8: started") < log.index("request conc-7: done")
    assert log.index("request conc-7: started") < log.index("request conc-8: done")


@pytest.mark.parametrize(("model", "requests"), [("sampler", 3), ("flashportrait", 1)])
def test_perf_analyzer_streams_from_the_product_and_reports_time_to_first_response(
    product: Product, model: str, requests: int
) -> None:
    frames_before = metric(product, "flashportrait_frames_generated_total")
    parameters = perf_parameters({**SMOKE_PARAMETERS, "progress": False})
    run = run_perf_analyzer(
        PerfOptions(
            model=model,
            url=product.server.grpc_url,
            input_data=REPOSITORY / "perf" / f"{model}.json",
            concurrency=1,
            request_count=requests,
            extra_args=parameters,
        )
    )
    assert "Detected decoupled model" in run.output
    (experiment,) = run.experiments()
    assert len(experiment.requests) == requests
    for timing in experiment.requests:
        # 9 driving frames: one window, its 8 frames in one or more chunks, then the empty final response.
        assert len(timing.response_ns) >= 2
        assert 0 < timing.time_to_first_response_s <= timing.time_to_last_response_s
    assert experiment.summary()["ttfr_p50_s"] > 0
    assert wait_for(
        lambda: metric(product, "flashportrait_frames_generated_total") == frames_before + 8 * requests
    )


def _animate(product: Product, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flashportrait.cli", "animate", "--url", product.server.grpc_url]
    argv += [
        "--image",
        str(product.image_path),
        "--video",
        str(product.video_path),
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def test_animate_writes_the_mp4_at_the_driving_rate_with_its_audio(
    product: Product, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out.mp4"
    args = ["--max-size", "64", "--context-size", "2", "--context-overlap", "0", "--seed", "7"]
    process = _animate(product, out, *args, "--request-id", "cli-1")
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert "window 2/2 step 4/4" in stderr and "12/12 frames written" in stderr and "first frame" in stderr
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.average_rate == Fraction(25)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video)])
        assert audio.duration * audio.time_base == pytest.approx(12 / 25, abs=0.03)
    assert frames.shape == reference[7].shape
    # These are the seed-7 frames after H.264 (crf 17, 4:2:0 chroma: the random demo frames are all
    # high frequencies, so the coding error is visible), far closer to them than to seed 8's.
    error = np.abs(_luma(frames) - _luma(reference[7])).mean()
    assert error < 0.5 * np.abs(_luma(frames) - _luma(reference[8])).mean()
    assert error < 8.0


def test_ctrl_c_in_animate_cancels_the_request_on_the_server(product: Product, tmp_path: Path) -> None:
    cancelled_before = metric(product, "flashportrait_cancellations_total")
    # 256 pixels: each window-step takes long enough to interrupt the generation in its middle.
    args = [
        "--max-size",
        "256",
        "--context-size",
        "2",
        "--context-overlap",
        "0",
        "--request-id",
        "cli-cancel",
    ]
    process = _animate(product, tmp_path / "cancelled.mp4", *args)
    lines = []
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if "window 1/2 step 1/4" in line:
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(lines) + rest
    assert "cancelled request cli-cancel on the server" in rest
    assert wait_for(lambda: product.log_lines("cli-cancel", r"stopped after unit (\d+)/8"), timeout_s=60)
    (line,) = product.log_lines("cli-cancel", r"stopped after unit (\d+)/8")
    assert int(line.group(1)) < 8
    assert wait_for(lambda: metric(product, "flashportrait_cancellations_total") == cancelled_before + 1)


class RecordingMetrics:
    """Stands in for `ModelMetrics` (which needs a Triton model process): records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def increment(self, spec, value: float = 1.0) -> None:
        self.calls.append(("increment", spec.name, value))

    def add(self, spec, delta: float) -> None:
        self.calls.append(("add", spec.name, delta))

    def observe(self, spec, value: float) -> None:
        self.calls.append(("observe", spec.name, value))

    def named(self, kind: str, name: str) -> list[float]:
        return [value for k, n, value in self.calls if (k, n) == (kind, f"flashportrait_{name}")]


def test_the_sampler_service_runs_in_process_without_triton(product: Product, reference: dict) -> None:
    from flashportrait.serving.sampler_service import SamplerJob, SamplerService
    from flashportrait.serving.settings import SamplerSettings, resolve_deployment
    from flashportrait.serving.streaming import RequestError, StreamCancelled

    settings = SamplerSettings(weights=str(product.weights), device="cpu", dtype="float32")
    service = SamplerService(settings, resolve_deployment(settings))
    job = SamplerJob(
        image=product.image,
        features=product.driving.features,
        prompt_embeds=product.prompt_embeds,
        negative_prompt_embeds=product.negative_embeds,
        fps=np.array([25, 1], dtype=np.int64),
        parameters={**SMALL, "seed": 7, "progress": False},
        label="request local-1",
    )
    lines: list[str] = []
    metrics = RecordingMetrics()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CPU server's sampler (threads: 1): the same float32 sums
    try:
        responses = list(service.stream(job, log=lines.append, metrics=metrics))
    finally:
        torch.set_num_threads(threads)
    assert all(r["FRAMES"].shape[0] > 0 for r in responses)  # progress: false, frames only
    np.testing.assert_array_equal(np.concatenate([r["FRAMES"] for r in responses]), reference[7])
    assert sum(metrics.named("increment", "frames_generated_total")) == CLIP_FRAMES - 1
    assert len(metrics.named("observe", "time_to_first_frame_seconds")) == 1
    assert len(metrics.named("observe", "window_compute_seconds")) == 2
    assert metrics.named("add", "active_generations") == [1, -1]
    assert len([line for line in lines if "request local-1: window" in line]) == 8
    # Cancellation between window-steps, and a bad parameter, surface as the response loop expects.
    checks = iter([False] * 3 + [True] * 100)
    with pytest.raises(StreamCancelled):
        list(service.stream(job, should_cancel=lambda: next(checks), log=lines.append))
    assert any(line.startswith("request local-1: stopped after unit 2/8") for line in lines), lines
    with pytest.raises(RequestError, match="progress must be true or false"):
        list(service.stream(dataclasses.replace(job, parameters={"progress": "sometimes"})))


def test_face_align_refuses_a_video_longer_than_max_frames(product: Product) -> None:
    from flashportrait.serving.services import FaceAlignService
    from flashportrait.serving.settings import FaceAlignSettings, resolve_deployment
    from flashportrait.serving.streaming import RequestError

    settings = FaceAlignSettings(weights=str(product.weights), device="cpu", max_frames=5)
    service = FaceAlignService(settings, resolve_deployment(settings))
    with pytest.raises(
        RequestError, match="the driving video has more than 5 frames; this server takes at most 5"
    ):
        service.align(product.video)
    settings = FaceAlignSettings(weights=str(product.weights), device="cpu", max_frames=CLIP_FRAMES)
    aligned = FaceAlignService(settings, resolve_deployment(settings)).align(product.video)
    assert aligned["CROPS"].shape == (CLIP_FRAMES, 224, 224, 3) and aligned["FPS"].tolist() == [25, 1]

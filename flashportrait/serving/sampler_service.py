"""The `sampler` model's work: one request -> a stream of responses, importable without a server.

`SamplerService.stream(job, should_cancel, log, metrics)` validates the request (image bytes,
features, text embeddings, per-request parameters), runs `Sampler.generate` and turns its events into
response dicts (tensor names and meaning: `model_repository/README.md`):

- a progress response after the conditioning and after every window-step: FRAMES [0, H, W, 3]
  (left out when the request parameter `progress` is false, so the first response carries frames:
  perf_analyzer's time to first response is then the time to first frame);
- a frames response for every decoded chunk: FRAMES [T, H, W, 3] uint8 RGB, output frames
  [FRAME_START, FRAME_START + T) of FRAMES_TOTAL, in order, each frame exactly once.

Every response carries the progress counters (UNITS_DONE / UNITS_TOTAL window-steps, WINDOW, STEP,
NUM_STEPS) and FPS, so a client can write frames and show progress from any response alone.
Cancellation (`should_cancel`) is checked by the sampler between window-steps; it surfaces as
`StreamCancelled`. User errors are `RequestError`s. Logging: one line per window-step
(`request <id>: window w/W step s/S (unit k/K) 0.31 s, frames 4/20`), plus a start and an end line
(on a GPU the end line ends with the request's peak GPU memory, allocated and reserved by torch).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from flashportrait.serving.media import decode_image
from flashportrait.serving.metrics import (
    ACTIVE_GENERATIONS,
    FRAMES_GENERATED,
    TIME_TO_FIRST_FRAME,
    WINDOW_COMPUTE,
    ModelMetrics,
)
from flashportrait.serving.services import FEATURE_DIM
from flashportrait.serving.settings import Deployment, SamplerSettings
from flashportrait.serving.streaming import RequestError, StreamCancelled

Response = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SamplerJob:
    """One request's inputs as arrays.

    image: the encoded reference image; features: [N, 554] float32; prompt_embeds: [L, text_dim]
    float32; negative_prompt_embeds: [L', text_dim] float32 or None; fps: [2] int64 or None;
    parameters: the request's parameters (generation parameters, `GenerationParams` names);
    label: `request <id>` for logs.
    """

    image: bytes
    features: np.ndarray
    prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    fps: np.ndarray | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str = "request (no id)"


def _scalar(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int64)


def _check_matrix(name: str, array: np.ndarray, width: int | None = None) -> np.ndarray:
    if array.ndim != 2 or (width is not None and array.shape[1] != width):
        shape = f"[N, {width}]" if width is not None else "[L, D]"
        raise RequestError(f"{name} must be {shape}, got {list(array.shape)}")
    if array.dtype != np.float32:
        raise RequestError(f"{name} must be float32, got {array.dtype}")
    # Triton hands out read-only views of its buffers; torch wants arrays it may write to.
    return array if array.flags.writeable else array.copy()


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(f"{name} must be true or false, got {value!r}")


def _random_sampler(settings: SamplerSettings, deployment: Deployment) -> Any:
    """Benchmarks only (`random_weights`, settings.py): random models of that size, built on the device."""
    import torch

    from flashportrait.sampling.random_models import SamplerSizes, random_sampler

    # Loud on purpose: a server in this mode answers every request with noise.
    print(
        f"WARNING: sampler: RANDOM WEIGHTS ({deployment.random_weights} sizes) for benchmarking, not "
        f"a trained model: every output is noise (random_weights / $FLASHPORTRAIT_RANDOM_WEIGHTS)",
        file=sys.stderr,
        flush=True,
    )
    sizes = SamplerSizes.release() if deployment.random_weights == "release" else SamplerSizes.tiny()
    sampler = random_sampler(
        sizes,
        mode=deployment.mode,
        device=deployment.device,
        dtype=getattr(torch, deployment.dtype),
        decode_chunk_latents=settings.decode_chunk_latents,
    )
    if deployment.memory != "resident":
        from flashportrait.memory import apply_memory_mode

        apply_memory_mode(sampler, deployment.memory, deployment.device)
    return sampler


def _memory_note(device: str) -> str:
    """`, peak GPU memory X GiB allocated, Y GiB reserved` since the request started ("" on the CPU)."""
    if not device.startswith("cuda"):
        return ""
    import torch

    gib = 2**30
    allocated = torch.cuda.max_memory_allocated(device) / gib
    reserved = torch.cuda.max_memory_reserved(device) / gib
    return f", peak GPU memory {allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved"


class SamplerService:
    """The sampler's models, loaded once per model instance."""

    def __init__(self, settings: SamplerSettings, deployment: Deployment) -> None:
        import torch

        self.settings = settings
        self.device = deployment.device
        if deployment.random_weights:
            self.sampler = _random_sampler(settings, deployment)
            return
        from flashportrait.components import SAMPLER_PARTS, load_components
        from flashportrait.components.prepared import is_prepared, load_prepared
        from flashportrait.memory import MemoryMode, apply_memory_mode, load_components_for
        from flashportrait.sampling.sampler import Sampler

        load = dict(mode=deployment.mode, device=deployment.device, dtype=getattr(torch, deployment.dtype))
        memory = MemoryMode.parse(deployment.memory)
        if memory.offloads:
            # Parts the mode keeps in host memory are read there, the rest straight to the device.
            components, _ = load_components_for(
                deployment.weights, memory=memory, parts=SAMPLER_PARTS, **load
            )
        elif is_prepared(deployment.weights):
            # A prepared folder holds the fp8 DiT ready-made (prepare_weights --fp8).
            precision = "fp8" if memory.fp8 else "bf16"
            components = load_prepared(deployment.weights, parts=SAMPLER_PARTS, precision=precision, **load)
        else:
            components = load_components(deployment.weights, parts=SAMPLER_PARTS, **load)
            if memory.fp8:
                apply_memory_mode(components, memory, deployment.device)
        self.sampler = Sampler.from_components(
            components, device=deployment.device, decode_chunk_latents=settings.decode_chunk_latents
        )

    def _request(self, job: SamplerJob) -> tuple[Any, int, tuple[int, int], bool]:
        """(GenerationRequest, steps, (height, width) of the output frames, whether progress-only
        responses are wanted) or RequestError."""
        import torch

        from flashportrait.sampling.params import GenerationError, GenerationParams
        from flashportrait.sampling.sampler import GenerationRequest
        from flashportrait.sampling.windows import scaled_image_size

        parameters = dict(job.parameters)
        progress = _flag("progress", parameters.pop("progress", True))
        try:
            params = GenerationParams.from_mapping(parameters)
            steps = params.scheduler_config(self.sampler.mode).num_steps
        except GenerationError as error:
            raise RequestError(str(error)) from None
        features = _check_matrix("FEATURES", job.features, FEATURE_DIM)
        prompt = _check_matrix("PROMPT_EMBEDS", job.prompt_embeds)
        negative = job.negative_prompt_embeds
        if negative is not None:
            negative = torch.from_numpy(_check_matrix("NEGATIVE_PROMPT_EMBEDS", negative))
        image = decode_image(job.image, self.settings.max_image_pixels)
        height, width, _ = image.shape
        out_w, out_h = scaled_image_size(width, height, params.max_size)
        fps = None
        if job.fps is not None:
            from fractions import Fraction

            if job.fps.size != 2 or job.fps.reshape(-1)[1] <= 0 or job.fps.reshape(-1)[0] < 0:
                raise RequestError(f"FPS must be [numerator, denominator > 0], got {job.fps.tolist()}")
            num, den = (int(v) for v in job.fps.reshape(-1))
            fps = Fraction(num, den) if num > 0 else None
        request = GenerationRequest(
            image=image,
            features=features,
            prompt_embeds=torch.from_numpy(prompt),
            negative_prompt_embeds=negative,
            params=params,
            fps=fps,
        )
        return request, steps, (out_h, out_w), progress

    def stream(
        self,
        job: SamplerJob,
        should_cancel: Callable[[], bool] | None = None,
        log: Callable[[str], None] = lambda _line: None,
        metrics: ModelMetrics | None = None,
    ) -> Iterator[Response]:
        """The responses of `job` (see the module docstring)."""
        from flashportrait.sampling.params import GenerationError
        from flashportrait.sampling.sampler import VideoChunk
        from flashportrait.sampling.wavefront import SamplingCancelled

        started = time.monotonic()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        request, num_steps, (height, width), progress = self._request(job)
        fps = job.fps.reshape(-1).astype(np.int64) if job.fps is not None else np.array([0, 1], np.int64)
        state = {"units_done": 0, "units_total": 0, "window": -1, "step": -1, "frames_total": 0, "sent": 0}
        window_seconds: dict[int, float] = {}
        first_frame_s: float | None = None

        def response(frame_start: int, frames: np.ndarray) -> Response:
            return {
                "FRAME_START": _scalar(frame_start),
                "FRAMES": frames,
                "FRAMES_TOTAL": _scalar(state["frames_total"]),
                "UNITS_DONE": _scalar(state["units_done"]),
                "UNITS_TOTAL": _scalar(state["units_total"]),
                "WINDOW": _scalar(state["window"]),
                "STEP": _scalar(state["step"]),
                "NUM_STEPS": _scalar(num_steps),
                "FPS": fps,
            }

        if metrics is not None:
            metrics.add(ACTIVE_GENERATIONS, 1)
        finished = False
        try:
            for event in self.sampler.generate(request, should_cancel):
                if isinstance(event, VideoChunk):
                    if first_frame_s is None:
                        first_frame_s = time.monotonic() - started
                        if metrics is not None:
                            metrics.observe(TIME_TO_FIRST_FRAME, first_frame_s)
                    state["sent"] = event.frame_stop
                    if metrics is not None:
                        metrics.increment(FRAMES_GENERATED, event.frames.shape[0])
                    yield response(event.frame_start, event.frames)
                    continue
                state.update(units_done=event.units_done, units_total=event.units_total)
                state["frames_total"] = event.frames_total
                windows = event.units_total // num_steps
                if event.window is None:
                    log(
                        f"{job.label}: started, {job.features.shape[0]} driving frames -> "
                        f"{event.frames_total} frames of {width}x{height}, {windows} windows x {num_steps} "
                        f"steps, conditioning {event.unit_s:.2f} s"
                    )
                else:
                    state.update(window=event.window, step=event.step)
                    seconds = window_seconds.get(event.window, 0.0) + event.unit_s
                    window_seconds[event.window] = seconds
                    if event.step == num_steps - 1 and metrics is not None:
                        metrics.observe(WINDOW_COMPUTE, window_seconds.pop(event.window))
                    log(
                        f"{job.label}: window {event.window + 1}/{windows} step {event.step + 1}/{num_steps} "
                        f"(unit {event.units_done}/{event.units_total}) {event.unit_s:.2f} s, "
                        f"frames {event.frames_emitted}/{event.frames_total}"
                    )
                if progress:
                    yield response(state["sent"], np.zeros((0, height, width, 3), np.uint8))
            finished = True
        except GenerationError as error:
            raise RequestError(str(error)) from None
        except SamplingCancelled:
            raise StreamCancelled(job.label) from None
        finally:
            if metrics is not None:
                metrics.add(ACTIVE_GENERATIONS, -1)
            if not finished:
                # Cancelled (here or by the response loop between two responses) or failed: where it stopped.
                log(
                    f"{job.label}: stopped after unit {state['units_done']}/{state['units_total']}, "
                    f"{state['sent']} frames sent{_memory_note(self.device)}"
                )
        first = f"{first_frame_s:.2f} s" if first_frame_s is not None else "never"
        log(
            f"{job.label}: done, {state['sent']} frames in {time.monotonic() - started:.2f} s "
            f"(first frame after {first}){_memory_note(self.device)}"
        )

"""The streaming gRPC client of the FlashPortrait models (contracts: model_repository/README.md).

    client = FlashPortraitClient("127.0.0.1:8001")
    generation = client.animate(image_bytes, video_bytes, prompt="A woman smiles", parameters={"seed": 7})
    for event in generation:                  # Progress, or FramesChunk (frames in order, each once)
        ...
    generation.cancel()                       # from any thread: the server stops within one window-step

Two ways in (ARCHITECTURE.md section 3): by default `animate` asks `flashportrait_features` for the
driving video's features and `text_encoder` for the prompt's embeddings, then streams from `sampler`
directly, so `cancel()` reaches the generation; `ensemble=True` sends the media to the `flashportrait`
ensemble in one call instead, which Triton 2.51 cannot cancel once it runs. Each generation has its
own gRPC stream, because cancelling a stream cancels every request on it.

A request the server refuses raises `RequestFailed` with the server's message
(`request <id>: <what to fix>`); a cancelled one raises `GenerationCancelled` when iterated further.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

FEATURES_MODEL = "flashportrait_features"
TEXT_MODEL = "text_encoder"
SAMPLER_MODEL = "sampler"
ENSEMBLE_MODEL = "flashportrait"
# How long one wait for the next response may block, so Ctrl-C is noticed promptly.
_POLL_S = 0.2


class RequestFailed(RuntimeError):
    """The server answered the request with an error; the message is the server's."""


class GenerationCancelled(RuntimeError):
    """The generation was cancelled by this client."""


@dataclasses.dataclass(frozen=True)
class DrivingFeatures:
    """features: [N, 554] float32 (frames without a face filled); face_mask: [N] bool; fps: exact rate."""

    features: np.ndarray
    face_mask: np.ndarray
    fps: Fraction | None

    @property
    def frame_count(self) -> int:
        return int(self.features.shape[0])


@dataclasses.dataclass(frozen=True)
class Progress:
    """The counters every sampler response carries.

    units_done / units_total: window-steps; window, step: the last one done (0-based, -1 before the
    first); num_steps: denoising steps per window; frames_sent / frames_total: output frames sent so
    far; fps: the driving video's exact rate (None when the server was not told).
    """

    units_done: int
    units_total: int
    window: int
    step: int
    num_steps: int
    frames_sent: int
    frames_total: int
    fps: Fraction | None

    @property
    def num_windows(self) -> int:
        return self.units_total // self.num_steps if self.num_steps else 0


@dataclasses.dataclass(frozen=True)
class FramesChunk:
    """Output frames [frame_start, frame_start + T): frames [T, H, W, 3] uint8 RGB."""

    frame_start: int
    frames: np.ndarray
    progress: Progress

    @property
    def frame_stop(self) -> int:
        return self.frame_start + int(self.frames.shape[0])


Event = Progress | FramesChunk


def _tensor(name: str, value: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
    tensor.set_data_from_numpy(value)
    return tensor


def _bytes(value: bytes | str) -> np.ndarray:
    data = value.encode() if isinstance(value, str) else value
    return np.array([data], dtype=np.object_)


def _fraction(fps: np.ndarray) -> Fraction | None:
    num, den = (int(v) for v in fps.reshape(-1)[:2])
    return Fraction(num, den) if num > 0 and den > 0 else None


def parse_response(outputs: Mapping[str, np.ndarray]) -> Event:
    """A sampler (or ensemble) response's tensors -> FramesChunk (frames in it) or Progress."""
    frames = outputs["FRAMES"]
    start = int(outputs["FRAME_START"].reshape(-1)[0])
    count = int(frames.shape[0])
    progress = Progress(
        units_done=int(outputs["UNITS_DONE"].reshape(-1)[0]),
        units_total=int(outputs["UNITS_TOTAL"].reshape(-1)[0]),
        window=int(outputs["WINDOW"].reshape(-1)[0]),
        step=int(outputs["STEP"].reshape(-1)[0]),
        num_steps=int(outputs["NUM_STEPS"].reshape(-1)[0]),
        frames_sent=start + count,
        frames_total=int(outputs["FRAMES_TOTAL"].reshape(-1)[0]),
        fps=_fraction(outputs["FPS"]),
    )
    return FramesChunk(start, frames, progress) if count else progress


class Generation:
    """One streaming request: iterate for events; `cancel()` from any thread (see module docstring)."""

    def __init__(
        self,
        url: str,
        model: str,
        inputs: list[grpcclient.InferInput],
        parameters: Mapping[str, Any],
        request_id: str,
    ) -> None:
        self.model = model
        self.request_id = request_id
        self._client = grpcclient.InferenceServerClient(url)
        self._events: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        self._lock = threading.Lock()
        self._open = True
        self._cancelled = False
        self._done = False
        self.frames_received = 0
        events = self._events
        self._client.start_stream(callback=lambda result, error: events.put((result, error)))
        try:
            self._client.async_stream_infer(
                model,
                inputs,
                request_id=request_id,
                parameters=dict(parameters) or None,
                enable_empty_final_response=True,
            )
        except InferenceServerException as error:
            self.cancel()
            raise RequestFailed(error.message()) from None

    def __iter__(self) -> Iterator[Event]:
        try:
            while not self._done:
                if self._cancelled:
                    raise GenerationCancelled(f"request {self.request_id} was cancelled")
                try:
                    result, error = self._events.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if error is not None:
                    self._done = True
                    if self._cancelled:
                        raise GenerationCancelled(f"request {self.request_id} was cancelled")
                    raise RequestFailed(error.message())
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    event = parse_response({out.name: result.as_numpy(out.name) for out in response.outputs})
                    if isinstance(event, FramesChunk):
                        if event.frame_start != self.frames_received:
                            raise RequestFailed(
                                f"request {self.request_id}: frames {event.frame_start}.. arrived after "
                                f"{self.frames_received} frames (out of order)"
                            )
                        self.frames_received = event.frame_stop
                    yield event
                if final:
                    self._done = True
        finally:
            # A generation abandoned before its end (an exception in the consumer, Ctrl-C) is cancelled:
            # closing the stream without cancelling would wait for the whole generation.
            if self._done:
                self.close()
            else:
                self.cancel()

    def cancel(self) -> None:
        """Cancel the request on the server (closes this generation's stream)."""
        with self._lock:
            self._cancelled = True
            if self._open:
                self._open = False
                self._client.stop_stream(cancel_requests=True)
                self._client.close()

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                self._client.stop_stream()
                self._client.close()


class FlashPortraitClient:
    """Calls to one server's FlashPortrait models at `url` (gRPC `host:port`)."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FlashPortraitClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self) -> bool:
        return bool(self._client.is_server_ready())

    def _infer(self, model: str, inputs: list[grpcclient.InferInput], request_id: str) -> Any:
        try:
            return self._client.infer(model, inputs, request_id=request_id, client_timeout=self.timeout_s)
        except InferenceServerException as error:
            raise RequestFailed(error.message()) from None

    def features(self, video: bytes, request_id: str | None = None) -> DrivingFeatures:
        """The driving video's per-frame expression features (`flashportrait_features`)."""
        result = self._infer(FEATURES_MODEL, [_tensor("VIDEO", _bytes(video))], request_id or _new_id())
        return DrivingFeatures(
            features=result.as_numpy("FEATURES"),
            face_mask=result.as_numpy("FACE_MASK").astype(bool),
            fps=_fraction(result.as_numpy("FPS")),
        )

    def text_embeddings(
        self, prompt: str, negative_prompt: str = "", request_id: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """([L, D], [L', D]) float32 umT5 embeddings of the prompt and negative prompt (`text_encoder`)."""
        inputs = [_tensor("PROMPT", _bytes(prompt)), _tensor("NEGATIVE_PROMPT", _bytes(negative_prompt))]
        result = self._infer(TEXT_MODEL, inputs, request_id or _new_id())
        return result.as_numpy("PROMPT_EMBEDS"), result.as_numpy("NEGATIVE_PROMPT_EMBEDS")

    def sample(
        self,
        image: bytes,
        features: np.ndarray,
        prompt_embeds: np.ndarray,
        negative_prompt_embeds: np.ndarray | None = None,
        fps: Fraction | None = None,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Generation:
        """Stream from `sampler` directly (cancellable). features [N, 554] float32."""
        inputs = [
            _tensor("IMAGE", _bytes(image)),
            _tensor("FEATURES", np.ascontiguousarray(features, dtype=np.float32)),
            _tensor("PROMPT_EMBEDS", np.ascontiguousarray(prompt_embeds, dtype=np.float32)),
        ]
        if negative_prompt_embeds is not None:
            negative = np.ascontiguousarray(negative_prompt_embeds, dtype=np.float32)
            inputs.append(_tensor("NEGATIVE_PROMPT_EMBEDS", negative))
        if fps is not None:
            inputs.append(_tensor("FPS", np.array([fps.numerator, fps.denominator], dtype=np.int64)))
        return Generation(self.url, SAMPLER_MODEL, inputs, parameters or {}, request_id or _new_id())

    def animate(
        self,
        image: bytes,
        video: bytes,
        prompt: str,
        negative_prompt: str = "",
        parameters: Mapping[str, Any] | None = None,
        ensemble: bool = False,
        request_id: str | None = None,
    ) -> tuple[Generation, DrivingFeatures | None]:
        """The whole request: (the streaming generation, the driving features or None with `ensemble`)."""
        request_id = request_id or _new_id()
        if ensemble:
            inputs = [
                _tensor("IMAGE", _bytes(image)),
                _tensor("VIDEO", _bytes(video)),
                _tensor("PROMPT", _bytes(prompt)),
                _tensor("NEGATIVE_PROMPT", _bytes(negative_prompt)),
            ]
            return Generation(self.url, ENSEMBLE_MODEL, inputs, parameters or {}, request_id), None
        driving = self.features(video, f"{request_id}-features")
        embeds, negative = self.text_embeddings(prompt, negative_prompt, f"{request_id}-text")
        generation = self.sample(
            image, driving.features, embeds, negative, driving.fps, parameters, request_id
        )
        return generation, driving


def _new_id() -> str:
    return uuid.uuid4().hex[:12]

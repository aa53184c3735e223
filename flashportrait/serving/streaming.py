"""The response loop of a decoupled Python model: checkpoints, responses, and always a final flag.

A model's `execute` hands each request to `run_stream` with a producer: a generator that does one unit
of work per `yield` (one window of frames, say) and yields the output tensors of one response.
`run_stream` checks for cancellation before every unit, sends what the producer yields, and ends the
stream with `TRITONSERVER_RESPONSE_COMPLETE_FINAL` on every path:

- the producer finishes: an empty final response (the client sees it with
  `enable_empty_final_response=True`); sending the flag separately means no response waits for the
  next unit of work just to learn whether it is the last;
- the client cancels (`request.is_cancelled()`, available in Triton 2.51's Python backend for a
  direct gRPC stream; a request running inside an ensemble is never marked cancelled in 2.51): the
  producer is closed (its `finally` blocks run), the cancellation is logged and counted, and the final
  flag carries a CANCELLED error;
- the producer raises `RequestError` (bad input, bad parameter): that request gets a TritonError
  `request <id>: <message>` with the final flag; other requests and the server are unaffected;
- anything else: logged with its traceback, and the request gets `request <id>: internal error (...)`
  without the traceback.

Producers that run long units can call `stream.check_cancelled()` inside a unit (between denoising
steps, say) to stop sooner; it raises `StreamCancelled`, handled like a cancellation between units.

A complete example model: `tests/serving/model_repository/stream_chunks/1/model.py`.
`triton_python_backend_utils` only exists inside a model process, so it is imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np

from flashportrait.serving.metrics import CANCELLATIONS, FAILURES, TIME_TO_FIRST_FRAME, ModelMetrics


class RequestError(Exception):
    """An error the user caused; reported to that request only. `code` is a `pb_utils.TritonError`
    code name (INVALID_ARG, NOT_FOUND, UNSUPPORTED, ...)."""

    def __init__(self, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(message)
        self.code = code


class StreamCancelled(Exception):
    """Raised by `Stream.check_cancelled` when the client has cancelled."""


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils

    return pb_utils


def request_label(request: Any) -> str:
    """`request <id>` for messages and logs (`request (no id)` when the client sent none)."""
    request_id = request.request_id()
    return f"request {request_id}" if request_id else "request (no id)"


def request_parameters(request: Any) -> dict[str, Any]:
    """The request's parameters (gRPC `parameters` map / HTTP `parameters` object) as a dict."""
    raw = request.parameters()
    return dict(json.loads(raw)) if raw else {}


def input_array(request: Any, name: str, required: bool = True) -> np.ndarray | None:
    """The input tensor `name` as a numpy array; a missing required input is a `RequestError`.

    Triton checks declared inputs before `execute`, so this matters for `optional: true` inputs.
    """
    tensor = _pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise RequestError(f"input {name} is required")
        return None
    return tensor.as_numpy()


def scalar_input(request: Any, name: str, default: Any = None) -> Any:
    """A one-element input as a Python scalar (`default` when the optional input is absent)."""
    array = input_array(request, name, required=default is None)
    if array is None:
        return default
    if array.size != 1:
        raise RequestError(f"input {name} must hold one value, got shape {list(array.shape)}")
    value = array.reshape(()).item()
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass
class StreamOutcome:
    """How a stream ended: status, responses sent before the final flag, and the error message sent."""

    request_id: str
    status: Literal["completed", "cancelled", "failed"]
    responses: int
    error: str | None = None


class Stream:
    """One request's response stream, handed to the producer."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.request_id: str = request.request_id()
        self.label = request_label(request)
        self.sender = request.get_response_sender()
        self.started = time.monotonic()
        self.first_response_s: float | None = None
        self.responses = 0
        self.parameters = request_parameters(request)

    def is_cancelled(self) -> bool:
        return bool(self.request.is_cancelled())

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise StreamCancelled(self.label)

    def send(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Send one non-final response with these output tensors."""
        pb_utils = _pb()
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
        if self.first_response_s is None:
            self.first_response_s = time.monotonic() - self.started
        self.responses += 1

    def _final(self, error: Any = None) -> None:
        pb_utils = _pb()
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if error is None:
            self.sender.send(flags=flags)
        else:
            self.sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=flags)


Producer = Callable[[Stream], Iterable[Mapping[str, np.ndarray]]]


def _error(message: str, code: str) -> Any:
    pb_utils = _pb()
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL))


def run_stream(
    request: Any, produce: Producer, metrics: ModelMetrics | None = None, first_response_metric: bool = True
) -> StreamOutcome:
    """Run `produce(stream)` for one request of a decoupled model and end its stream (see module doc).

    Never raises for a request's own failure, so `execute` can go on to the next request.
    Records `flashportrait_time_to_first_frame_seconds` (unless `first_response_metric` is False: a
    producer whose first responses carry no frames records it itself), `_cancellations_total` and
    `_request_failures_total` in `metrics` when given.
    """
    logger = _pb().Logger
    stream = Stream(request)
    status: Literal["completed", "cancelled", "failed"] = "completed"
    message: str | None = None
    code = "INTERNAL"
    iterator: Any = None
    try:
        iterator = iter(produce(stream))
        while True:
            if stream.is_cancelled():
                raise StreamCancelled(stream.label)
            try:
                outputs = next(iterator)
            except StopIteration:
                break
            stream.send(outputs)
            first = stream.responses == 1 and first_response_metric
            if first and metrics is not None and stream.first_response_s is not None:
                metrics.observe(TIME_TO_FIRST_FRAME, stream.first_response_s)
    except StreamCancelled:
        status = "cancelled"
        message = f"{stream.label}: cancelled by the client after {stream.responses} responses"
        code = "CANCELLED"
        logger.log_info(message)
    except RequestError as error:
        status, message, code = "failed", f"{stream.label}: {error}", error.code
        logger.log_warn(message)
    except Exception as error:
        status = "failed"
        message = f"{stream.label}: internal error ({type(error).__name__}: {error})"
        logger.log_error(f"{message}\n{traceback.format_exc()}")
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if metrics is not None:
        if status == "cancelled":
            metrics.increment(CANCELLATIONS)
        elif status == "failed":
            metrics.increment(FAILURES)
    try:
        stream._final(None if message is None else _error(message, code))
    except Exception as error:
        # A cancelled client may already be gone; nothing is left to tell it.
        logger.log_warn(f"{stream.label}: could not send the final response: {error}")
    return StreamOutcome(stream.request_id, status, stream.responses, message)


def run_streams(
    requests: Iterable[Any],
    produce: Producer,
    metrics: ModelMetrics | None = None,
    first_response_metric: bool = True,
) -> None:
    """`run_stream` for each request in turn; what a decoupled `execute` returns (None)."""
    for request in requests:
        run_stream(request, produce, metrics, first_response_metric)

"""A small gRPC streaming client for the live tests (one stream per client object)."""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


@dataclasses.dataclass
class StreamResult:
    """What one request returned: the data responses in arrival order, the error, and the final flag."""

    responses: list[dict[str, np.ndarray]]
    error: str | None
    final: bool

    def column(self, name: str) -> np.ndarray:
        return np.stack([r[name] for r in self.responses]) if self.responses else np.zeros((0,))


class StreamingClient:
    """`tritonclient.grpc` streaming with a queue; `cancel()` is `stop_stream(cancel_requests=True)`."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue[tuple[object, InferenceServerException | None]] = queue.Queue()
        self.open = False

    def __enter__(self) -> StreamingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_stream(self) -> None:
        if not self.open:
            # A queue per stream: a cancelled stream's late "Locally cancelled" event stays in its own.
            events: queue.Queue[tuple[object, InferenceServerException | None]] = queue.Queue()
            self.events = events
            self.client.start_stream(callback=lambda result, error: events.put((result, error)))
            self.open = True

    def send(self, model: str, inputs: Mapping[str, np.ndarray], request_id: str) -> None:
        self._ensure_stream()
        tensors = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        self.client.async_stream_infer(
            model, tensors, request_id=request_id, enable_empty_final_response=True
        )

    def next_response(self, timeout_s: float = 30.0) -> tuple[dict[str, np.ndarray] | None, str | None, bool]:
        """(outputs or None for the empty final response, error message, final flag)."""
        result, error = self.events.get(timeout=timeout_s)
        if error is not None:
            # An error response ends the request (it was sent with the final flag).
            return None, error.message(), True
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        outputs = {out.name: result.as_numpy(out.name) for out in response.outputs}
        return (outputs or None), None, final

    def collect(
        self, timeout_s: float = 30.0, on_response: Callable[[int], None] | None = None
    ) -> StreamResult:
        """Responses until the final flag or an error (for one request in flight on this stream)."""
        deadline = time.monotonic() + timeout_s
        responses: list[dict[str, np.ndarray]] = []
        while True:
            outputs, error, final = self.next_response(max(0.1, deadline - time.monotonic()))
            if outputs is not None:
                responses.append(outputs)
                if on_response is not None:
                    on_response(len(responses))
            if error is not None or final:
                return StreamResult(responses, error, final)

    def cancel(self) -> None:
        """Close the stream and cancel its requests on the server."""
        if self.open:
            self.client.stop_stream(cancel_requests=True)
            self.open = False

    def close(self) -> None:
        if self.open:
            self.client.stop_stream()
            self.open = False
        self.client.close()


def chunk_inputs(num_chunks: int, offset: float = 0.0, delay_ms: int = 0, fail_at: int = -1) -> dict:
    """Inputs of the test model `stream_chunks`."""
    return {
        "NUM_CHUNKS": np.array([num_chunks], dtype=np.int32),
        "OFFSET": np.array([offset], dtype=np.float32),
        "DELAY_MS": np.array([delay_ms], dtype=np.int32),
        "FAIL_AT": np.array([fail_at], dtype=np.int32),
    }


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll until `predicate()` is true; False if it never was (the caller asserts with a message)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()

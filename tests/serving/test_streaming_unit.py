"""`run_stream` without a server: a stand-in `triton_python_backend_utils` records what would be sent."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest

from flashportrait.serving import streaming
from flashportrait.serving.streaming import RequestError, Stream, run_stream

FINAL = 1


class FakeError:
    INTERNAL, INVALID_ARG, CANCELLED = "INTERNAL", "INVALID_ARG", "CANCELLED"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list, error: FakeError | None = None) -> None:
        self.outputs = {t.name: t.value for t in output_tensors}
        self.error = error


class FakeTensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self.name, self.value = name, value


class FakeLogger:
    lines: ClassVar[list[tuple[str, str]]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.lines.append(("error", message))


class FakeSender:
    def __init__(self, request: FakeRequest) -> None:
        self.request = request
        self.sent: list[tuple[FakeResponse | None, int]] = []

    def send(self, response: FakeResponse | None = None, flags: int = 0) -> None:
        if any(flags_ & FINAL for _, flags_ in self.sent):
            raise RuntimeError("sent after the final flag")
        self.sent.append((response, flags))
        if self.request.cancel_after is not None and len(self.sent) >= self.request.cancel_after:
            self.request.cancelled = True


class FakeRequest:
    def __init__(self, request_id: str = "r1", cancel_after: int | None = None) -> None:
        self.id, self.cancel_after, self.cancelled = request_id, cancel_after, False
        self.sender = FakeSender(self)

    def request_id(self) -> str:
        return self.id

    def parameters(self) -> str:
        return '{"steps": 4}'

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled


@pytest.fixture(autouse=True)
def fake_pb_utils(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor
    module.InferenceResponse = FakeResponse
    module.TritonError = FakeError
    module.Logger = FakeLogger
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    monkeypatch.setitem(__import__("sys").modules, "triton_python_backend_utils", module)
    FakeLogger.lines = []


def counting(n: int, closed: list[bool] | None = None):
    def produce(stream: Stream) -> Iterator[dict[str, np.ndarray]]:
        try:
            for index in range(n):
                yield {"INDEX": np.array([index], dtype=np.int32)}
        finally:
            if closed is not None:
                closed.append(True)

    return produce


def data_indices(request: FakeRequest) -> list[int]:
    return [int(r.outputs["INDEX"][0]) for r, _ in request.sender.sent if r is not None and r.error is None]


def test_completed_stream_sends_every_response_then_one_empty_final() -> None:
    request = FakeRequest()
    outcome = run_stream(request, counting(3))
    assert data_indices(request) == [0, 1, 2]
    assert [flags for _, flags in request.sender.sent] == [0, 0, 0, FINAL]
    assert request.sender.sent[-1][0] is None
    assert (outcome.status, outcome.responses, outcome.error) == ("completed", 3, None)


def test_cancellation_is_checked_before_each_unit_and_closes_the_producer() -> None:
    closed: list[bool] = []
    request = FakeRequest("c7", cancel_after=2)
    outcome = run_stream(request, counting(10, closed))
    assert data_indices(request) == [0, 1]
    final, flags = request.sender.sent[-1]
    assert flags == FINAL and final is not None and final.error.code == "CANCELLED"
    assert final.error.message == "request c7: cancelled by the client after 2 responses"
    assert closed == [True]
    assert outcome.status == "cancelled"
    assert ("info", "request c7: cancelled by the client after 2 responses") in FakeLogger.lines


def test_producer_can_check_cancellation_inside_a_unit() -> None:
    request = FakeRequest("c8")

    def produce(stream: Stream) -> Iterator[dict[str, np.ndarray]]:
        yield {"INDEX": np.array([0], dtype=np.int32)}
        request.cancelled = True  # the client cancels during the next unit
        stream.check_cancelled()
        yield {"INDEX": np.array([1], dtype=np.int32)}

    outcome = run_stream(request, produce)
    assert outcome.status == "cancelled" and data_indices(request) == [0]


def test_request_error_ends_only_that_request_with_its_id() -> None:
    def produce(stream: Stream) -> Iterator[dict[str, np.ndarray]]:
        yield {"INDEX": np.array([0], dtype=np.int32)}
        raise RequestError("no face found in the driving video", code="INVALID_ARG")

    request = FakeRequest("job-42")
    outcome = run_stream(request, produce)
    final, flags = request.sender.sent[-1]
    assert flags == FINAL and final.error.code == "INVALID_ARG"
    assert final.error.message == "request job-42: no face found in the driving video"
    assert outcome.status == "failed" and outcome.responses == 1


def test_unexpected_error_is_reported_without_traceback_and_logged_with_it() -> None:
    def produce(stream: Stream) -> Iterator[dict[str, np.ndarray]]:
        raise ZeroDivisionError("division by zero")
        yield {}

    request = FakeRequest("")
    run_stream(request, produce)
    final, flags = request.sender.sent[-1]
    assert flags == FINAL
    assert final.error.message == "request (no id): internal error (ZeroDivisionError: division by zero)"
    assert final.error.code == "INTERNAL"
    level, logged = FakeLogger.lines[-1]
    assert level == "error" and "Traceback" in logged


def test_failure_to_send_the_final_flag_is_logged_not_raised() -> None:
    request = FakeRequest("gone")

    def broken_send(response: FakeResponse | None = None, flags: int = 0) -> None:
        if flags & FINAL:
            raise RuntimeError("stream closed")

    request.sender.send = broken_send
    outcome = run_stream(request, counting(1))
    assert outcome.status == "completed"
    assert FakeLogger.lines[-1] == ("warn", "request gone: could not send the final response: stream closed")


def test_request_parameters_are_parsed() -> None:
    assert streaming.request_parameters(FakeRequest()) == {"steps": 4}

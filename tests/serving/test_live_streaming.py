"""Decoupled streaming on a live server: order, cancellation, per-request errors, concurrency, ensemble.

The test model `stream_chunks` sends response k with CHUNK_INDEX = k and VALUES = OFFSET + 4k + [0..3]
and logs `request <id>: chunk k/N` before sending each response.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from flashportrait.serving.metrics import sample, scrape
from flashportrait.serving.server import TritonServer
from tests.serving.streams import StreamingClient, chunk_inputs, wait_for

pytestmark = pytest.mark.server
MODEL = {"model": "stream_chunks", "version": "1"}


def chunk_lines(server: TritonServer, request_id: str) -> list[int]:
    """The chunk numbers the model logged for this request, in order."""
    return [int(m) for m in re.findall(rf"request {re.escape(request_id)}: chunk (\d+)/", server.log_text())]


def expected_values(num_chunks: int, offset: float) -> np.ndarray:
    return (offset + np.arange(4 * num_chunks, dtype=np.float32)).reshape(num_chunks, 4)


def test_chunks_arrive_in_order_and_cover_every_frame(server: TritonServer) -> None:
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", chunk_inputs(5, offset=1.5), request_id="order-1")
        result = client.collect()
    assert result.error is None and result.final
    assert result.column("CHUNK_INDEX").ravel().tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(result.column("VALUES"), expected_values(5, 1.5))


def test_first_chunk_arrives_before_the_last_is_computed(server: TritonServer) -> None:
    seen_at_first: list[list[int]] = []

    def on_response(count: int) -> None:
        if count == 1:
            seen_at_first.append(chunk_lines(server, "early-1"))

    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", chunk_inputs(6, delay_ms=300), request_id="early-1")
        result = client.collect(on_response=on_response)
    assert result.error is None and len(result.responses) == 6
    # When the first response reached the client, the model had not yet logged its last chunk
    # (five more 300 ms chunks were still to run).
    assert 6 not in seen_at_first[0], seen_at_first


def test_cancel_mid_stream_stops_the_work_and_the_next_request_succeeds(server: TritonServer) -> None:
    before = sample(scrape(server.metrics_url), "flashportrait_cancellations_total", **MODEL)
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", chunk_inputs(100, delay_ms=250), request_id="cancel-1")
        for _ in range(2):
            outputs, error, _final = client.next_response()
            assert error is None and outputs is not None
        client.cancel()
    cancelled = re.compile(r"request cancel-1: cancelled by the client after (\d+) responses")
    assert wait_for(lambda: cancelled.search(server.log_text()) is not None), server.log_text()[-3000:]
    sent = int(cancelled.search(server.log_text()).group(1))
    # Two responses were received before cancelling. The window in progress when the cancellation
    # arrives still completes (typically the third), then no other starts; one more window of slack
    # covers a slow client thread. Far from the 100 requested.
    assert 2 <= sent <= 4
    assert chunk_lines(server, "cancel-1") == list(range(1, sent + 1))
    assert wait_for(
        lambda: sample(scrape(server.metrics_url), "flashportrait_cancellations_total", **MODEL) == before + 1
    )
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", chunk_inputs(3, offset=7.0), request_id="after-cancel")
        result = client.collect()
    assert result.error is None
    np.testing.assert_array_equal(result.column("VALUES"), expected_values(3, 7.0))


@pytest.mark.parametrize(
    ("request_id", "inputs", "received", "message"),
    [
        ("bad-zero", chunk_inputs(0), 0, "NUM_CHUNKS must be in 1..1000, got 0"),
        ("bad-many", chunk_inputs(5001), 0, "NUM_CHUNKS must be in 1..1000, got 5001"),
        ("bad-delay", chunk_inputs(3, delay_ms=-5), 0, "DELAY_MS must be >= 0, got -5"),
        ("bad-midway", chunk_inputs(5, fail_at=2), 2, "failing at chunk 2 as asked by FAIL_AT"),
    ],
)
def test_bad_input_gets_a_per_request_error_and_the_server_stays_healthy(
    server: TritonServer, request_id: str, inputs: dict, received: int, message: str
) -> None:
    before = sample(scrape(server.metrics_url), "flashportrait_request_failures_total", **MODEL)
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", inputs, request_id=request_id)
        result = client.collect()
        assert result.error == f"request {request_id}: {message}"
        assert len(result.responses) == received
        # The same stream and server keep working.
        client.send("stream_chunks", chunk_inputs(2, offset=3.0), request_id=f"{request_id}-next")
        good = client.collect()
        assert client.client.is_server_ready() and client.client.is_model_ready("stream_chunks")
    assert good.error is None
    np.testing.assert_array_equal(good.column("VALUES"), expected_values(2, 3.0))
    assert wait_for(
        lambda: (
            sample(scrape(server.metrics_url), "flashportrait_request_failures_total", **MODEL) == before + 1
        )
    )


def test_input_of_the_wrong_type_is_rejected_by_triton(server: TritonServer) -> None:
    inputs = chunk_inputs(2)
    inputs["NUM_CHUNKS"] = np.array([2.0], dtype=np.float32)
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", inputs, request_id="wrong-type")
        result = client.collect()
    assert result.error is not None and "NUM_CHUNKS" in result.error and "FP32" in result.error
    assert result.responses == []


def test_two_concurrent_streams_both_complete_correctly(server: TritonServer) -> None:
    results = {}

    def run(request_id: str, offset: float) -> None:
        with StreamingClient(server.grpc_url) as client:
            client.send("stream_chunks", chunk_inputs(10, offset=offset, delay_ms=100), request_id=request_id)
            results[request_id] = client.collect()

    threads = [
        threading.Thread(target=run, args=(name, off)) for name, off in (("conc-a", 0.0), ("conc-b", 1000.0))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for request_id, offset in (("conc-a", 0.0), ("conc-b", 1000.0)):
        assert results[request_id].error is None
        np.testing.assert_array_equal(results[request_id].column("VALUES"), expected_values(10, offset))
    # The model has two instances: the two streams ran side by side, not one after the other.
    log = server.log_text()
    first_b = log.index("request conc-b: chunk 1/10")
    last_a = log.index("request conc-a: chunk 10/10")
    first_a = log.index("request conc-a: chunk 1/10")
    last_b = log.index("request conc-b: chunk 10/10")
    assert first_b < last_a and first_a < last_b


def ensemble_inputs(base: float, num_chunks: int, delay_ms: int = 0) -> dict:
    return {
        "BASE": np.array([base], dtype=np.float32),
        "NUM_CHUNKS": np.array([num_chunks], dtype=np.int32),
        "DELAY_MS": np.array([delay_ms], dtype=np.int32),
    }


def test_ensemble_with_a_decoupled_last_step_streams_the_same_chunks_as_the_direct_call(
    server: TritonServer,
) -> None:
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_pipeline", ensemble_inputs(2.0, 4), request_id="ens-1")
        through_ensemble = client.collect()
        # prepare_offset makes OFFSET = 10 * BASE.
        client.send("stream_chunks", chunk_inputs(4, offset=20.0), request_id="direct-1")
        direct = client.collect()
    assert through_ensemble.error is None and direct.error is None
    assert through_ensemble.column("CHUNK_INDEX").ravel().tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(through_ensemble.column("VALUES"), direct.column("VALUES"))
    np.testing.assert_array_equal(direct.column("VALUES"), expected_values(4, 20.0))
    # The ensemble passes the client's request id down to its steps.
    assert chunk_lines(server, "ens-1") == [1, 2, 3, 4]


def test_cancelling_an_ensemble_does_not_reach_its_decoupled_step(server: TritonServer) -> None:
    """Triton 2.51 fact behind ARCHITECTURE.md section 3's two ways in: a client's cancellation does not
    reach a model that an ensemble is running, so it runs to the end. If this fails, a newer Triton
    propagates it: revisit the design (the cancellable path could become the ensemble)."""
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_pipeline", ensemble_inputs(1.0, 8, delay_ms=100), request_id="ens-cancel")
        outputs, error, _final = client.next_response()
        assert error is None and outputs is not None
        client.cancel()
    assert wait_for(lambda: chunk_lines(server, "ens-cancel") == list(range(1, 9)), timeout_s=20)
    assert "request ens-cancel: cancelled" not in server.log_text()


def test_custom_metrics_count_frames_and_first_responses(server: TritonServer) -> None:
    before = scrape(server.metrics_url)
    with StreamingClient(server.grpc_url) as client:
        client.send("stream_chunks", chunk_inputs(3), request_id="metrics-1")
        assert client.collect().error is None

    def delta(name: str, snapshot: dict) -> float:
        return sample(snapshot, name, **MODEL) - sample(before, name, **MODEL)

    assert wait_for(lambda: delta("flashportrait_frames_generated_total", scrape(server.metrics_url)) == 12)
    after = scrape(server.metrics_url)
    assert delta("flashportrait_time_to_first_frame_seconds_count", after) == 1
    assert delta("flashportrait_window_compute_seconds_count", after) == 3
    # Every bucket of the histogram is labelled with the model and counted cumulatively.
    assert sample(after, "flashportrait_time_to_first_frame_seconds_bucket", le="+Inf", **MODEL) == sample(
        after, "flashportrait_time_to_first_frame_seconds_count", **MODEL
    )

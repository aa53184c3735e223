"""Test model: streams NUM_CHUNKS responses through `flashportrait.serving.streaming.run_stream`.

Response k carries CHUNK_INDEX = k and VALUES = OFFSET + 4k + [0, 1, 2, 3] (four "frames" per chunk),
so a client can check order and coverage. DELAY_MS of sleep per chunk stands in for one window of
compute; FAIL_AT = k raises a user error after k chunks were sent. Logs one line per chunk.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from flashportrait.serving.metrics import FRAMES_GENERATED, WINDOW_COMPUTE, ModelMetrics
from flashportrait.serving.streaming import RequestError, Stream, run_streams, scalar_input

FRAMES_PER_CHUNK = 4
MAX_CHUNKS = 1000


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = ModelMetrics.for_model(args)
        self.logger = pb_utils.Logger

    def _produce(self, stream: Stream):
        num_chunks = scalar_input(stream.request, "NUM_CHUNKS")
        offset = scalar_input(stream.request, "OFFSET", default=0.0)
        delay_s = scalar_input(stream.request, "DELAY_MS", default=0) / 1000.0
        fail_at = scalar_input(stream.request, "FAIL_AT", default=-1)
        if not 1 <= num_chunks <= MAX_CHUNKS:
            raise RequestError(f"NUM_CHUNKS must be in 1..{MAX_CHUNKS}, got {num_chunks}")
        if delay_s < 0:
            raise RequestError(f"DELAY_MS must be >= 0, got {delay_s * 1000:.0f}")
        for index in range(num_chunks):
            if index == fail_at:
                raise RequestError(f"failing at chunk {index} as asked by FAIL_AT")
            started = time.monotonic()
            time.sleep(delay_s)
            values = offset + FRAMES_PER_CHUNK * index + np.arange(FRAMES_PER_CHUNK, dtype=np.float32)
            self.metrics.observe(WINDOW_COMPUTE, time.monotonic() - started)
            self.metrics.increment(FRAMES_GENERATED, FRAMES_PER_CHUNK)
            self.logger.log_info(f"{stream.label}: chunk {index + 1}/{num_chunks}")
            yield {
                "CHUNK_INDEX": np.array([index], dtype=np.int32),
                "VALUES": values.astype(np.float32),
            }

    def execute(self, requests):
        run_streams(requests, self._produce, self.metrics)
        return None

"""Test model: OFFSET = 10 * BASE, the first (non-decoupled) step of the stream_pipeline ensemble."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            base = pb_utils.get_input_tensor_by_name(request, "BASE").as_numpy()
            offset = (10.0 * base).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OFFSET", offset)]))
        return responses

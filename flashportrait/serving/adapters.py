"""Shared pieces of the `model_repository/*/1/model.py` adapters (Triton Python backend).

- `bytes_input`: one element of a BYTES input as raw bytes (media uploads);
- `respond_each`: the `execute` of a non-decoupled model: one response per request, where a
  `RequestError` (or any other failure) becomes that request's `request <id>: <message>` error and
  the other requests of the batch are unaffected;
- `torch_threads`: apply a model's `threads` setting.

`triton_python_backend_utils` only exists inside a model process, so it is imported inside functions.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flashportrait.serving.metrics import FAILURES, ModelMetrics
from flashportrait.serving.streaming import RequestError, input_array, request_label

Handler = Callable[[Any], Mapping[str, np.ndarray]]


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils

    return pb_utils


def bytes_input(request: Any, name: str, required: bool = True) -> bytes | None:
    """The single element of BYTES input `name` as bytes (None if the optional input is absent)."""
    array = input_array(request, name, required=required)
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(
            f"input {name} must hold one element (the encoded file), got shape {list(array.shape)}"
        )
    value = array.reshape(()).item()
    return value if isinstance(value, bytes) else str(value).encode()


def text_input(request: Any, name: str, default: str | None = None) -> str:
    """The single element of a BYTES input as UTF-8 text (`default` when the optional input is absent)."""
    data = bytes_input(request, name, required=default is None)
    if data is None:
        return default or ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"input {name} is not UTF-8 text") from None


def respond_each(requests: list[Any], handle: Handler, metrics: ModelMetrics | None = None) -> list[Any]:
    """One InferenceResponse per request: `handle(request)`'s outputs, or its error (see module doc)."""
    pb_utils = _pb()
    responses = []
    for request in requests:
        label = request_label(request)
        try:
            outputs = handle(request)
            tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            continue
        except RequestError as error:
            message = f"{label}: {error}"
            code = getattr(pb_utils.TritonError, error.code, pb_utils.TritonError.INVALID_ARG)
            pb_utils.Logger.log_warn(message)
        except Exception as error:
            message = f"{label}: internal error ({type(error).__name__}: {error})"
            code = pb_utils.TritonError.INTERNAL
            pb_utils.Logger.log_error(f"{message}\n{traceback.format_exc()}")
        if metrics is not None:
            metrics.increment(FAILURES)
        responses.append(
            pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
        )
    return responses


def torch_threads(threads: int) -> None:
    """`torch.set_num_threads(threads)` when threads > 0 (called from `initialize`, never at import)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)

"""ONNX Runtime sessions for the release's face models, created once and batched across frames.

Both release models are exported with a fixed batch of 1 (`[1, 3, 272, 160]` and `[1, 3, 128, 128]`),
and the detector's channel-shuffle Reshapes hard-code that 1. `dynamic_batch` rewrites the graph in
memory (the file is untouched): the batch dimension becomes symbolic and every constant Reshape target
that starts with 1 starts with 0 instead ("copy this dimension from the input" in ONNX Reshape).
The arithmetic is unchanged; batched outputs are bit-identical to one-frame runs on the CPU
(checked in tests/face/test_runtime.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose inputs, outputs and constant Reshape targets take any batch size."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initialisers = {init.name: init for init in graph.initializer}
    for value in [*(i for i in graph.input if i.name not in initialisers), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target in constants:
            tensor = constants[target].attribute[0].t
        elif target in initialisers:
            tensor = initialisers[target]
        else:
            continue  # computed from shapes at run time: already batch-agnostic
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and shape.size > 1 and shape[0] == 1:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    del graph.value_info[:]  # stale batch-1 shapes; ONNX Runtime re-infers them
    return model


def create_session(
    path: str | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 0,
) -> ort.InferenceSession:
    """An inference session for the model at `path`, with a dynamic batch dimension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"face model not found: {path}")
    model = dynamic_batch(onnx.load(str(path)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=chosen)


def run_batched(session: ort.InferenceSession, batch: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """Run `session` on `batch` [N, ...] in slices of at most `max_batch`; outputs concatenated on N."""
    name = session.get_inputs()[0].name
    pieces = [session.run(None, {name: batch[i : i + max_batch]}) for i in range(0, len(batch), max_batch)]
    return [np.concatenate([piece[k] for piece in pieces]) for k in range(len(pieces[0]))]

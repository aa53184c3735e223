"""Checkpoint readers and strict loading (see `checkpoint.py` and `loading.py`)."""

from flashportrait.weights.checkpoint import (
    CheckpointError,
    InMemorySource,
    MergedSource,
    RenamedSource,
    SafetensorsFile,
    TensorInfo,
    TensorSource,
    add_prefix,
    open_checkpoint,
    open_sharded_safetensors,
    open_torch_pickle,
    save_safetensors,
    strip_prefix,
)
from flashportrait.weights.loading import (
    CheckpointMismatchError,
    LoadReport,
    compare_keys,
    load_into,
    module_tensor_shapes,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "InMemorySource",
    "LoadReport",
    "MergedSource",
    "RenamedSource",
    "SafetensorsFile",
    "TensorInfo",
    "TensorSource",
    "add_prefix",
    "compare_keys",
    "load_into",
    "module_tensor_shapes",
    "open_checkpoint",
    "open_sharded_safetensors",
    "open_torch_pickle",
    "save_safetensors",
    "strip_prefix",
]

"""Building TensorRT engines from our ONNX files, and the version record written beside each engine.

A serialized engine only deserializes in the TensorRT release that built it (and runs on the GPU
architecture it was built for), so every engine gets a JSON record next to it,
`<engine stem>.tensorrt-version.json`:

    {"tensorrt": "10.5.0",                 release (major.minor.patch) that built it
     "tensorrt_version": "10.5.0.18",      the exact `tensorrt.__version__`
     "built_by": "flashportrait.export.tensorrt",
     "engine": "model.plan", "engine_sha256": "...", "onnx": "model.onnx", "onnx_sha256": "...",
     "precision": "fp16" | "fp32",
     "profiles": {"<input>": {"min": [...], "opt": [...], "max": [...]}},
     "device": "NVIDIA H200", "compute_capability": "9.0"}

`export.engines` reads it before loading an engine and refuses one from another release, naming
both. The serving image records its own release in `/opt/flashportrait/tensorrt-version.json` and
`$FLASHPORTRAIT_TENSORRT_VERSION` (docker/README.md); engines must be built inside that image.

`tensorrt` is imported only when an engine is built or run; without it `TensorRTUnavailable` says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_SUFFIX = ".tensorrt-version.json"
_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


class TensorRTUnavailable(RuntimeError):
    """TensorRT is not installed here, so no engine can be built (or run)."""


def import_tensorrt():
    """The `tensorrt` module, or `TensorRTUnavailable` with what to do instead."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed in this environment (`import tensorrt` failed: "
            f"{exc}); build the engine inside the serving image (NGC tritonserver / TensorRT container), "
            "against the TensorRT version that will run it, or install the `gpu` extra"
        ) from exc
    return tensorrt


def release(version: str) -> str:
    """`10.5.0.18` or `10.5.0.post1` -> `10.5.0`: the part that must match for an engine to load."""
    match = _RELEASE.match(version.strip())
    if match is None:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return ".".join(match.groups())


@dataclass(frozen=True)
class ShapeProfile:
    """(min, opt, max) shapes of one engine input: TensorRT builds kernels for the range and tunes
    them for `opt`."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "min", tuple(self.min))
        object.__setattr__(self, "opt", tuple(self.opt))
        object.__setattr__(self, "max", tuple(self.max))
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"profile shapes of different ranks: {self}")
        if not all(1 <= a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"a profile needs 1 <= min <= opt <= max in every dimension, got {self}")

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def record_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.stem + RECORD_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def _device() -> dict[str, str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"device": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # a record without the device is still a valid record
        pass
    return {}


def make_record(
    tensorrt_version: str,
    engine_path: Path,
    onnx_path: Path | None,
    profiles: Mapping[str, ShapeProfile],
    *,
    fp16: bool,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "tensorrt": release(tensorrt_version),
        "tensorrt_version": tensorrt_version,
        "built_by": "flashportrait.export.tensorrt",
        "engine": engine_path.name,
        "engine_sha256": _sha256(engine_path),
        "precision": "fp16" if fp16 else "fp32",
        "profiles": {name: p.to_json() for name, p in profiles.items()},
    }
    if onnx_path is not None:
        record.update(onnx=onnx_path.name, onnx_sha256=_sha256(onnx_path))
    record.update(_device())
    return record


def write_record(engine_path: str | Path, record: Mapping[str, Any]) -> Path:
    path = record_path(engine_path)
    path.write_text(json.dumps(dict(record), indent=2) + "\n")
    return path


def read_record(engine_path: str | Path) -> dict[str, Any]:
    """The record beside `engine_path`; `FileNotFoundError`/`ValueError` say what is wrong with it."""
    path = record_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{engine_path} has no TensorRT version record ({path.name}): it was not built by "
            "flashportrait.export, so which TensorRT release built it is unknown; rebuild it with "
            "`python -m flashportrait.export.engines --weights DIR --tensorrt` in the serving image"
        )
    try:
        record = json.loads(path.read_text())
        release(record["tensorrt"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a TensorRT version record: {exc}") from exc
    return record


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: Mapping[str, ShapeProfile],
    *,
    fp16: bool = True,
    workspace_gib: float = 4.0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Build a serialized engine from `onnx_path` with one optimisation profile (`profiles`: every
    input with a dynamic dimension, by name), write it and its version record (plus `extra`, e.g.
    what a runtime needs to know about the graph); returns the engine path."""
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profiles) - set(inputs))
    dynamic = sorted(name for name, shape in inputs.items() if any(d < 0 for d in shape))
    missing = [name for name in dynamic if name not in profiles]
    if unknown or missing:
        raise ValueError(
            f"{onnx_path}: profiles for unknown inputs {unknown}; dynamic inputs without one {missing}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        declared = inputs[name]
        fixed_ok = all(
            d < 0 or d == lo == hi for d, lo, hi in zip(declared, shapes.min, shapes.max, strict=False)
        )
        if len(declared) != len(shapes.min) or not fixed_ok:
            raise ValueError(
                f"{onnx_path}: profile {shapes} does not fit input {name} of shape {list(declared)}"
            )
        profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    record = make_record(trt.__version__, engine_path, onnx_path, profiles, fp16=fp16)
    write_record(engine_path, {**record, **(extra or {})})
    return engine_path


__all__ = [
    "RECORD_SUFFIX",
    "ShapeProfile",
    "TensorRTUnavailable",
    "build_engine",
    "import_tensorrt",
    "make_record",
    "read_record",
    "record_path",
    "release",
    "write_record",
]

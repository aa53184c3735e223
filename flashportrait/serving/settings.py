"""How each served model is configured: `config.pbtxt` parameters, with environment fallbacks.

Every model of `model_repository/` reads its settings from its config's `parameters` (all strings in
`config.pbtxt`) into one frozen dataclass per model (`FaceAlignSettings`, ...), built with
`flashportrait.config.from_mapping`, so an unknown or mistyped parameter fails the model's load with
a message naming it. Weights and modes are chosen here, never by editing code.

Triton does not expand environment variables in `config.pbtxt`, so a parameter left empty ("") falls
back to an environment variable of the server process (which the Python stubs inherit):

| parameter   | environment variable        | when both are empty                                    |
|-------------|-----------------------------|--------------------------------------------------------|
| `weights`   | `FLASHPORTRAIT_WEIGHTS`     | an error naming both                                    |
| `mode`      | `FLASHPORTRAIT_MODE`        | `fast`                                                  |
| `device`    | `FLASHPORTRAIT_DEVICE`      | `cuda:<id>` for a KIND_GPU instance, else `cpu`        |
| `dtype`     | `FLASHPORTRAIT_DTYPE`       | `bfloat16` on a GPU, `float32` on the CPU              |
| `precision` | `FLASHPORTRAIT_PRECISION`   | `bf16` (`fp8`: the DiT's block linears in float8)      |
| `memory`    | `FLASHPORTRAIT_MEMORY`      | `resident` (sampler only; `flashportrait.memory` modes) |

Benchmarks only: the sampler's `random_weights` (`FLASHPORTRAIT_RANDOM_WEIGHTS`), `release` or `tiny`,
builds every sampler model with random weights on its device (`sampling.random_models`) instead of
loading a weights folder, so a server can be measured at full size without the 14B checkpoint. It is
a model parameter or server environment variable only (never a request parameter), and the sampler
logs a warning that its output is noise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from flashportrait.config import ConfigError, from_mapping

WEIGHTS_ENV = "FLASHPORTRAIT_WEIGHTS"
MODE_ENV = "FLASHPORTRAIT_MODE"
DEVICE_ENV = "FLASHPORTRAIT_DEVICE"
DTYPE_ENV = "FLASHPORTRAIT_DTYPE"
PRECISION_ENV = "FLASHPORTRAIT_PRECISION"
RANDOM_WEIGHTS_ENV = "FLASHPORTRAIT_RANDOM_WEIGHTS"
MEMORY_ENV = "FLASHPORTRAIT_MEMORY"

MODES = ("fast", "quality")
DTYPES = ("bfloat16", "float16", "float32")
PRECISIONS = ("bf16", "fp8")
RANDOM_WEIGHTS = ("release", "tiny")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Resolved common settings of one model instance.

    weights: the weights folder in the release layout; device: a torch device string ("cpu",
    "cuda:0"); dtype: a torch dtype name; mode: "fast" or "quality"; precision: "bf16" or "fp8";
    random_weights: "" (load `weights`), or "release"/"tiny": random models of that size (benchmarks);
    memory: the memory mode's name (`flashportrait.memory.MemoryMode`, fp8 included when `precision`
    is fp8).
    """

    weights: Path
    mode: str
    device: str
    dtype: str
    precision: str
    random_weights: str = ""
    memory: str = "resident"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclasses.dataclass(frozen=True)
class FaceAlignSettings:
    """`face_align`: max_frames is the most driving frames one request may have; it must equal
    `feature_extractor`'s `max_batch_size` (the ensemble passes all crops as one batch).
    threads: ONNX Runtime intra-op threads per face model (0: its default)."""

    weights: str = ""
    device: str = ""
    max_frames: int = 512
    threads: int = 1


@dataclasses.dataclass(frozen=True)
class FeatureExtractorSettings:
    """`feature_extractor` as a Python model (the CPU variant): the exported ONNX file in the version
    folder, run `chunk_frames` crops at a time through ONNX Runtime with `threads` intra-op threads."""

    device: str = ""
    model_file: str = "model.onnx"
    chunk_frames: int = 16
    threads: int = 0


@dataclasses.dataclass(frozen=True)
class TextEncoderSettings:
    """`text_encoder`: umT5 from the weights folder; `cache_size` prompts are kept encoded."""

    weights: str = ""
    device: str = ""
    dtype: str = ""
    cache_size: int = 64
    threads: int = 0


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """`sampler`: the models of `mode`; images above `max_image_pixels` are refused before decoding;
    `decode_chunk_latents` latent frames are decoded per decoder call; `threads`: torch threads
    (0: torch's default); `memory`: a memory mode of `flashportrait.memory` (`resident`, or a
    '+'-joined combination of fp8, components, blockwise: module docstring there); `random_weights`:
    benchmarks only (module docstring)."""

    weights: str = ""
    mode: str = ""
    device: str = ""
    dtype: str = ""
    precision: str = ""
    memory: str = ""
    max_image_pixels: int = 4096 * 4096
    decode_chunk_latents: int = 4
    threads: int = 0
    random_weights: str = ""


def config_parameters(model_config: Mapping[str, Any] | str) -> dict[str, str]:
    """The `parameters` of a model config (Triton's JSON form, as `args["model_config"]`) as strings."""
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    out = {}
    for key, value in (config.get("parameters") or {}).items():
        out[key] = value.get("string_value", "") if isinstance(value, Mapping) else str(value)
    return out


def check_stub_numpy(version: str | None = None) -> None:
    """Refuse to load under NumPy 2: Triton 2.51's Python backend stub is built against the NumPy 1
    C API, and with NumPy 2 in the stub's environment it hands models garbage for BYTES inputs (seen:
    `deserialize_bytes_tensor` reads a length of ~4e9 from a 1 KB upload and the stub dies). Every
    model here takes BYTES inputs (media, prompts), so this is a load-time error, not a request error."""
    if version is None:
        import numpy

        version = numpy.__version__
    if int(version.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {version} is installed in the Python environment of the Triton Python backend; "
            "Triton 2.51's backend stub needs numpy 1.x (it corrupts BYTES inputs under numpy 2): "
            "install 'numpy<2' there (pip install 'numpy<2')"
        )


def model_settings(cls: type[T], args: Mapping[str, Any]) -> T:
    """The settings dataclass `cls` of a model from `initialize(args)` (unknown parameters: ConfigError).
    Also checks the stub's environment (`check_stub_numpy`), since every model starts here."""
    check_stub_numpy()
    name = args.get("model_name", cls.__name__)
    return from_mapping(cls, config_parameters(args["model_config"]), where=f"model {name} parameters")


def _pick(value: str, variable: str, env: Mapping[str, str]) -> str:
    return value.strip() or env.get(variable, "").strip()


def resolve_deployment(
    settings: Any, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Deployment:
    """The common settings of `settings` (any of the dataclasses above) with the fallbacks of the
    module docstring; `args` is the model's `initialize` argument (instance kind and device id)."""
    env = os.environ if env is None else env
    args = args or {}
    weights = _pick(getattr(settings, "weights", ""), WEIGHTS_ENV, env)
    random_weights = ""
    if hasattr(settings, "random_weights"):
        random_weights = _pick(settings.random_weights, RANDOM_WEIGHTS_ENV, env)
        if random_weights and random_weights not in RANDOM_WEIGHTS:
            raise ConfigError(f"random_weights must be one of {list(RANDOM_WEIGHTS)}, got {random_weights!r}")
    if random_weights:
        weights = ""  # nothing is read from disk
    elif hasattr(settings, "weights") and not weights:
        raise ConfigError(
            f"no weights folder: set the model parameter 'weights' in config.pbtxt or ${WEIGHTS_ENV}"
        )
    if weights and not Path(weights).is_dir():
        raise ConfigError(f"the weights folder {weights} does not exist")
    mode = _pick(getattr(settings, "mode", ""), MODE_ENV, env) or "fast"
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    device = _pick(getattr(settings, "device", ""), DEVICE_ENV, env)
    if not device or device == "auto":
        gpu = str(args.get("model_instance_kind", "")).upper() == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda or cuda:<index>, got {device!r}")
    dtype = _pick(getattr(settings, "dtype", ""), DTYPE_ENV, env)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    precision = _pick(getattr(settings, "precision", ""), PRECISION_ENV, env) or "bf16"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    memory = "resident"
    if hasattr(settings, "memory"):
        from flashportrait.memory import MemoryMode

        chosen = MemoryMode.parse(_pick(settings.memory, MEMORY_ENV, env) or "resident")
        memory = dataclasses.replace(chosen, fp8=chosen.fp8 or precision == "fp8").name
    return Deployment(Path(weights), mode, device, dtype, precision, random_weights, memory)

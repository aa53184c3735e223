"""Loading TensorRT engines (refusing one built by another TensorRT release), running them, choosing
the tiny VAE decoder's backend, and exporting/building every graph of a prepared folder.

    python -m flashportrait.export.engines --weights DIR             # ONNX files (+ parity checks)
    python -m flashportrait.export.engines --weights DIR --tensorrt  # and the fp16 engines

writes into the prepared folder (`flashportrait.components.prepared`): `onnx/tiny_vae_decoder.onnx`,
`engines/tiny_vae_decoder.plan`, `model_repository/feature_extractor/1/model.onnx` and `model.plan`,
each engine with its `.tensorrt-version.json` record, and adds them to `manifest.json`.

Version check: the release that built an engine is in its record; the release here is
`tensorrt.__version__`, else `$FLASHPORTRAIT_TENSORRT_VERSION`, else the serving image's
`/opt/flashportrait/tensorrt-version.json` (docker/README.md). Different releases (or GPU
architectures) raise `EngineVersionError` naming both, before TensorRT is asked to deserialize.

`load_decoder(folder, prefer=...)` is what the sampler calls: the TensorRT engine when present
(and TensorRT and a GPU are here), the ONNX Runtime graph when asked for, the PyTorch decoder
otherwise; an engine of another release is refused, never silently replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flashportrait.export.tensorrt import (
    ShapeProfile,
    TensorRTUnavailable,
    build_engine,
    import_tensorrt,
    read_record,
    record_path,
    release,
)
from flashportrait.export.tiny_vae_onnx import (
    FRAMES,
    LATENTS,
    GraphLayout,
    GraphTinyVaeDecoder,
    OnnxTinyVaeDecoder,
    export_onnx,
    memory_input,
    memory_output,
    tensorrt_profiles,
)

from flashportrait.components import WeightPaths, resolve_config
from flashportrait.components.prepared import PreparedPaths, is_prepared, manifest_config, read_manifest
from flashportrait.config import ConfigError
from flashportrait.models.decoding import StreamingDecoder
from flashportrait.models.tiny_vae import load_tiny_vae

IMAGE_RECORD = Path("/opt/flashportrait/tensorrt-version.json")
VERSION_ENV = "FLASHPORTRAIT_TENSORRT_VERSION"
BACKENDS = ("tensorrt", "onnx", "torch")
LAYOUT_KEY = "tiny_vae_layout"
log = logging.getLogger(__name__)


class EngineVersionError(RuntimeError):
    """An engine built by another TensorRT release (or for another GPU), or without a record."""


def runtime_tensorrt_version(
    *, image_record: Path = IMAGE_RECORD, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(version, where it comes from) of the TensorRT that would load engines here."""
    try:
        return import_tensorrt().__version__, "the tensorrt Python package"
    except TensorRTUnavailable:
        pass
    environ = os.environ if environ is None else environ
    if environ.get(VERSION_ENV):
        return environ[VERSION_ENV], f"${VERSION_ENV}"
    if image_record.is_file():
        return json.loads(image_record.read_text())["tensorrt"], str(image_record)
    raise TensorRTUnavailable(
        f"no TensorRT here: `import tensorrt` fails, ${VERSION_ENV} is unset and {image_record} is absent"
    )


def check_engine(
    engine_path: str | Path,
    runtime_version: str | None = None,
    *,
    compute_capability: str | None = None,
) -> dict[str, Any]:
    """The engine's record, if the engine may be loaded by `runtime_version` (default: this
    environment's, `runtime_tensorrt_version`) on a GPU of `compute_capability` ("9.0"; default: the
    current CUDA device's when there is one). Raises `EngineVersionError` otherwise."""
    engine_path = Path(engine_path)
    try:
        record = read_record(engine_path)
    except (FileNotFoundError, ValueError) as exc:
        raise EngineVersionError(str(exc)) from exc
    where = "the given runtime"
    if runtime_version is None:
        runtime_version, where = runtime_tensorrt_version()
    rebuild = (
        "rebuild it with `python -m flashportrait.export.engines --weights DIR --tensorrt` inside the "
        "serving image, on the GPU model it will run on (docker/README.md)"
    )
    if release(record["tensorrt"]) != release(runtime_version):
        raise EngineVersionError(
            f"{engine_path} was built by TensorRT {record.get('tensorrt_version', record['tensorrt'])}, "
            f"but this runtime is TensorRT {runtime_version} (from {where}): a serialized engine only "
            f"loads in the TensorRT release that built it; {rebuild}"
        )
    if compute_capability is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        compute_capability = f"{major}.{minor}"
    built_for = record.get("compute_capability")
    if built_for and compute_capability and built_for != compute_capability:
        raise EngineVersionError(
            f"{engine_path} was built for a GPU of compute capability {built_for} "
            f"({record.get('device', 'unknown')}), this GPU is {compute_capability}; {rebuild}"
        )
    return record


def load_engine(engine_path: str | Path):
    """Deserialize `engine_path` after `check_engine` (a `tensorrt.ICudaEngine`)."""
    trt = import_tensorrt()
    check_engine(engine_path, trt.__version__)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {engine_path} (see its log above)")
    return engine


class TensorRTRunner:
    """Runs an engine on CUDA tensors: named inputs in, named outputs allocated and returned."""

    def __init__(self, engine_path: str | Path, device: torch.device | str = "cuda"):
        trt = import_tensorrt()
        self.device = torch.device(device)
        self.engine = load_engine(engine_path)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        torch_dtypes = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                        "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8,
                        "UINT8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
        self.dtypes = {n: torch_dtypes[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise ValueError(f"TensorRT engine inputs missing: {missing}")
        keep = []  # converted inputs must live until the engine has run
        for name in self.inputs:
            tensor = inputs[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outputs


class TensorRTTinyVaeDecoder(GraphTinyVaeDecoder):
    """The tiny VAE graph as a TensorRT engine (`decoding.StreamingDecoder`, CUDA tensors).

    The graph layout and the engine's shape range come from its record; chunks longer than the
    profile's frame range are split, sizes or batches outside it are refused with the range."""

    def __init__(self, engine_path: str | Path, device: torch.device | str = "cuda"):
        record = check_engine(engine_path)
        if LAYOUT_KEY not in record:
            raise EngineVersionError(
                f"{record_path(engine_path)} does not describe a tiny VAE decoder engine"
            )
        self.profile = ShapeProfile(**record["profiles"][LATENTS])
        super().__init__(GraphLayout.from_json(record[LAYOUT_KEY]), device, max_frames=self.profile.max[2])
        self.runner = TensorRTRunner(engine_path, device)

    def _zeros(self, shapes):
        return [torch.zeros(shape, dtype=torch.float32, device=self.device) for shape in shapes]

    def _run(self, latents: torch.Tensor, memory: list) -> tuple[torch.Tensor, list]:
        b, _, _, h, w = latents.shape
        lo, hi = self.profile.min, self.profile.max
        if not (lo[0] <= b <= hi[0] and lo[3] <= h <= hi[3] and lo[4] <= w <= hi[4]):
            raise ValueError(
                f"latents of batch {b} and size {h}x{w} are outside the engine's profile (batch "
                f"{lo[0]}-{hi[0]}, height {lo[3]}-{hi[3]}, width {lo[4]}-{hi[4]}): rebuild it wider"
            )
        feeds = {LATENTS: latents, **{memory_input(i): m for i, m in enumerate(memory)}}
        out = self.runner(feeds)
        return out[FRAMES].float(), [out[memory_output(i)] for i in range(len(memory))]


def load_decoder(
    folder: str | Path,
    prefer: str = "tensorrt",
    *,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> StreamingDecoder:
    """The fast mode's tiny VAE decoder for a weights folder (prepared, or the release layout).

    prefer: "tensorrt" uses `engines/tiny_vae_decoder.plan` when it exists and TensorRT and a CUDA
    device are here; "onnx" uses `onnx/tiny_vae_decoder.onnx` through ONNX Runtime (CUDA provider on
    a CUDA device); either falls back to the PyTorch decoder in `dtype` when its file or runtime is
    missing. "torch" is the PyTorch decoder. An engine of another TensorRT release raises
    `EngineVersionError` instead of falling back.
    """
    if prefer not in BACKENDS:
        raise ConfigError(f"decoder backend must be one of {list(BACKENDS)}, got {prefer!r}")
    device = torch.device(device)
    prepared = PreparedPaths(Path(folder)) if is_prepared(folder) else None
    if prepared is not None and prefer == "tensorrt" and prepared.tiny_vae_engine.is_file():
        if device.type != "cuda":
            log.warning("tiny VAE: the TensorRT engine needs a CUDA device, %s given: using PyTorch", device)
        else:
            try:
                import_tensorrt()
            except TensorRTUnavailable as exc:
                log.warning("tiny VAE: %s; using the PyTorch decoder", exc)
            else:
                return TensorRTTinyVaeDecoder(prepared.tiny_vae_engine, device)
    if prepared is not None and prefer == "onnx" and prepared.tiny_vae_onnx.is_file():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else []
        return OnnxTinyVaeDecoder(prepared.tiny_vae_onnx, providers=providers or ["CPUExecutionProvider"],
                                  device=device)  # fmt: skip
    if prefer != "torch":
        log.info("tiny VAE: no %s graph in %s; using the PyTorch decoder", prefer, folder)
    if prepared is not None:
        config = manifest_config(read_manifest(prepared.root))
        return load_tiny_vae(prepared.tensors("tiny_vae"), config.tiny_vae, dtype=dtype, device=device)
    paths = WeightPaths.under(folder)
    return load_tiny_vae(paths.fast_vae, resolve_config(paths).tiny_vae, dtype=dtype, device=device)


# ---- exporting and building a prepared folder's graphs ----


@dataclass(frozen=True)
class BuildOptions:
    """tensorrt: build engines too. decoder_profiles: `tensorrt_profiles` ranges (batch, frames,
    height, width) as (min, opt, max); feature_batch: the feature extractor's crops per call."""

    tensorrt: bool = False
    fp16: bool = True
    decoder_profiles: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    feature_batch: tuple[int, int, int] = (1, 16, 64)
    workspace_gib: float = 4.0


def export_all(
    folder: str | Path, options: BuildOptions | None = None, *, out: Callable[[str], None] = print
) -> list[Path]:
    """Export the tiny VAE decoder and the feature extractor of a prepared folder to ONNX (each
    checked against PyTorch with ONNX Runtime) and, with `options.tensorrt`, build their engines;
    the finished files are added to the manifest (also when a later step fails). Returns them."""
    options = options or BuildOptions()
    paths = PreparedPaths(Path(folder))
    if options.tensorrt:
        import_tensorrt()  # fail before the exports, not after them
    written: list[Path] = []
    try:
        if "tiny_vae" in read_manifest(paths.root)["components"]:
            export_decoder(paths, options, out, written)
        export_feature_extractor(paths, options, out, written)
    finally:
        add_to_manifest(paths, written)
    return written


def export_decoder(
    paths: PreparedPaths, options: BuildOptions, out: Callable[[str], None], written: list[Path]
) -> None:
    """The tiny VAE decoder's ONNX graph (checked) and engine; each finished file joins `written`."""
    from flashportrait.components.prepared import load_prepared

    decoder = load_prepared(paths.root, mode="fast", dtype=torch.float32, parts={"tiny_vae"}).tiny_vae
    export_onnx(decoder, paths.tiny_vae_onnx)
    error = decoder_parity(decoder, paths.tiny_vae_onnx)
    out(f"wrote {paths.tiny_vae_onnx}; ONNX Runtime vs PyTorch max |diff| {error:.2e}")
    if error > 1e-4:
        raise RuntimeError(f"{paths.tiny_vae_onnx} disagrees with the PyTorch decoder ({error:.2e})")
    written.append(paths.tiny_vae_onnx)
    if not options.tensorrt:
        return
    layout = GraphLayout.of(decoder)
    build_engine(
        paths.tiny_vae_onnx,
        paths.tiny_vae_engine,
        tensorrt_profiles(layout, **options.decoder_profiles),
        fp16=options.fp16,
        workspace_gib=options.workspace_gib,
        extra={LAYOUT_KEY: layout.to_json()},
    )
    out(f"wrote {paths.tiny_vae_engine}")
    written += [paths.tiny_vae_engine, record_path(paths.tiny_vae_engine)]


def export_feature_extractor(
    paths: PreparedPaths, options: BuildOptions, out: Callable[[str], None], written: list[Path]
) -> None:
    """The feature extractor's ONNX file (checked) and engine; each finished file joins `written`."""
    from flashportrait.export import motion_encoder as fx

    from flashportrait.components.prepared import load_prepared

    encoder = load_prepared(paths.root, parts={"motion_encoder"}).motion_encoder
    onnx_path = fx.export_onnx(encoder, paths.feature_extractor / "model.onnx")
    crops = fx.example_input("uint8", batch=4).numpy()
    parity = fx.compare_features(fx.onnx_features(onnx_path, crops), fx.torch_crop_encoder(encoder)(crops))
    out(f"wrote {onnx_path}; ONNX Runtime vs PyTorch: {'PASS' if parity.passed else 'FAIL'}")
    if not parity.passed:
        lines = "\n".join(parity.lines())
        raise RuntimeError(f"{onnx_path} disagrees with the PyTorch motion encoder:\n{lines}")
    written.append(onnx_path)
    if not options.tensorrt:
        return
    low, opt, high = options.feature_batch
    plan = fx.build_tensorrt_engine(
        onnx_path,
        paths.feature_extractor / "model.plan",
        min_batch=low,
        opt_batch=opt,
        max_batch=high,
        fp16=options.fp16,
        workspace_gib=options.workspace_gib,
    )
    out(f"wrote {plan}")
    written += [plan, record_path(plan)]


def decoder_parity(decoder, onnx_path: Path, chunks: tuple[int, ...] = (1, 2, 1)) -> float:
    """Largest |ONNX Runtime - PyTorch| over a chunked stream of random latents (float32)."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, decoder.config.latent_channels, sum(chunks), 4, 6, generator=gen)
    graph = OnnxTinyVaeDecoder(onnx_path)
    ours, theirs, start, worst = decoder.begin(1), graph.begin(1), 0, 0.0
    for size in chunks:
        piece = latents[:, :, start : start + size]
        start += size
        a, ours = decoder.decode(piece, ours)
        b, theirs = graph.decode(piece, theirs)
        worst = max(worst, float(np.abs(a.numpy() - b.numpy()).max()))
    return worst


def add_to_manifest(paths: PreparedPaths, files: list[Path]) -> None:
    """Record `files` (size, sha256) in the folder's manifest, rewritten atomically."""
    from flashportrait.export.safetensors_writer import file_sha256

    manifest = read_manifest(paths.root)
    for path in files:
        manifest["files"][path.relative_to(paths.root).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
    manifest["files"] = dict(sorted(manifest["files"].items()))
    partial = paths.manifest.with_name(paths.manifest.name + ".partial")
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    partial.replace(paths.manifest)


def _triple(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX, got {text!r}")
    return values  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashportrait.export.engines", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--weights", required=True, type=Path, help="a prepared weights folder")
    parser.add_argument("--tensorrt", action="store_true", help="also build the TensorRT engines")
    parser.add_argument("--fp32", action="store_true", help="engines without fp16")
    parser.add_argument("--decoder-batch", type=_triple, default=(1, 1, 2), help="MIN,OPT,MAX videos")
    parser.add_argument("--decoder-frames", type=_triple, default=(1, 4, 4), help="latent frames per call")
    parser.add_argument("--latent-height", type=_triple, default=(8, 64, 128))
    parser.add_argument("--latent-width", type=_triple, default=(8, 64, 128))
    parser.add_argument("--feature-batch", type=_triple, default=(1, 16, 64), help="crops per call")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    profiles = {"batch": args.decoder_batch, "frames": args.decoder_frames,
                "height": args.latent_height, "width": args.latent_width}  # fmt: skip
    options = BuildOptions(args.tensorrt, not args.fp32, profiles, args.feature_batch, args.workspace_gib)
    try:
        export_all(args.weights, options)
    except TensorRTUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The prepared (serving) weights folder: its layout, its manifest, and loading from it.

`python -m flashportrait.export.prepare_weights --release DIR --out DIR` turns the release files into
this folder (see that module for how); the serving image mounts it as `$FLASHPORTRAIT_WEIGHTS`::

    <root>/
      manifest.json                    format, config, options, every file's size/sha256/dtypes
      flashportrait_config.json        DeploymentConfig JSON (the same as manifest["config"])
      dit_quality.safetensors          Wan shards + transformer.pt, one file, every key
      dit_fast.safetensors             the same with the step-distillation LoRA merged
      dit_<mode>_fp8.safetensors       (--fp8) block linears as FP8Linear: e4m3 weight + weight_scale
      wan_vae.safetensors              encoder + decoder (release key space, no `model.`)
      tiny_vae.safetensors             (fast mode) TAEHV `decoder.*` only, TGrow already patched
      text_encoder.safetensors         umT5 encoder
      tokenizer/                       the umT5 tokenizer folder, copied
      clip.safetensors                 `visual.*` keys the image tower loads (no text tower)
      portrait_encoder.safetensors     float32
      motion_encoder.safetensors       float32 (BatchNorm counters included)
      face/face_det.onnx, face/face_landmark.onnx
      onnx/tiny_vae_decoder.onnx       (python -m flashportrait.export.engines)
      engines/tiny_vae_decoder.plan    (+ .tensorrt-version.json, built in the serving image)
      model_repository/feature_extractor/1/model.onnx (+ model.plan and its version record)

Every tensor file holds exactly the tensors its model loads, under the names the release loaders
read (so the same loaders load both layouts, and a prepared folder gives the same models as the
release folder loaded with the same dtype), in the storage dtype (bf16 by default; the portrait and
motion encoders in float32, as the reference runs them). DiT files carry the DiT config in their
safetensors metadata (`dit_loading.prepared_metadata`).

`manifest.json` (format_version 1)::

    {"format": "flashportrait-prepared", "format_version": 1,
     "created_by": "flashportrait.export.prepare_weights", "source": "<release root>",
     "config": {...DeploymentConfig...}, "modes": ["fast", "quality"], "dtype": "bfloat16",
     "fp8": false, "components": ["clip", "dit_fast", ...],
     "lora": {"source": "fast_lora_rank64.safetensors", "strength": 1.0,
              "compute_dtype": null | "torch.float32", "merged": [[param, how], ...],
              "skipped": [[key, why], ...], "ignored": [...]} | null,
     "files": {"<path relative to root>": {"size": int, "sha256": hex,
               ("tensors": int, "dtypes": {"BF16": {"tensors": int, "bytes": int}, ...})}}}

(`tensors`/`dtypes` for safetensors files only; `python -m flashportrait.export.engines` adds the
ONNX files and engines it writes to `files`.) A folder without `manifest.json` is unfinished.
`prepared_check.verify_prepared` checks a folder against its manifest and the models.

`load_prepared` mirrors `load_components` (which hands a prepared folder to it) and adds
`precision="fp8"` for the fp8 DiT files and `dit_reader="direct"` (`read_safetensors`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashportrait.components.config import DeploymentConfig
from flashportrait.components.layout import ALL_PARTS, MissingWeightsError, Mode, check_mode, check_parts
from flashportrait.components.loading import Components, FaceModelPaths
from flashportrait.config import ConfigError
from flashportrait.models import clip as clip_model
from flashportrait.models import motion_encoder as motion_model
from flashportrait.models import portrait_encoder as portrait_model
from flashportrait.models import t5 as t5_model
from flashportrait.models import tiny_vae as tiny_model
from flashportrait.models import wan_vae as vae_model
from flashportrait.models.dit_loading import CONFIG_METADATA_KEY, load_dit
from flashportrait.models.lora import LoraMergeReport
from flashportrait.models.tokenizer import UMT5Tokenizer
from flashportrait.models.transformer import DiTConfig, WanDiT, build_meta
from flashportrait.weights import InMemorySource, SafetensorsFile, load_into

FORMAT = "flashportrait-prepared"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "flashportrait_config.json"
TOKENIZER_DIR = "tokenizer"
FACE_FILES = {"face_detector": "face/face_det.onnx", "face_landmarks": "face/face_landmark.onnx"}
TINY_VAE_ONNX = "onnx/tiny_vae_decoder.onnx"
TINY_VAE_ENGINE = "engines/tiny_vae_decoder.plan"
FEATURE_EXTRACTOR_DIR = "model_repository/feature_extractor/1"
PRECISIONS = ("bf16", "fp8")

# Tensor files: component -> file name. The DiT has one per mode and precision.
DIT_COMPONENTS = ("dit_quality", "dit_fast", "dit_quality_fp8", "dit_fast_fp8")
TENSOR_COMPONENTS = (
    *DIT_COMPONENTS,
    "wan_vae",
    "tiny_vae",
    "text_encoder",
    "clip",
    "portrait_encoder",
    "motion_encoder",
)
FLOAT32_COMPONENTS = frozenset({"portrait_encoder", "motion_encoder"})  # never cast by the reference
# Which prepared files each loadable part needs (the DiT's depends on the mode and precision).
PART_COMPONENTS = {
    "vae": ("wan_vae",),
    "tiny_vae": ("tiny_vae",),
    "text_encoder": ("text_encoder",),
    "clip": ("clip",),
    "portrait_encoder": ("portrait_encoder",),
    "motion_encoder": ("motion_encoder",),
}


class PreparedWeightsError(RuntimeError):
    """A prepared folder that is incomplete, altered or does not fit its manifest; lists every problem."""


def file_name(component: str) -> str:
    if component not in TENSOR_COMPONENTS:
        raise KeyError(f"unknown prepared component {component!r}; known: {list(TENSOR_COMPONENTS)}")
    return f"{component}.safetensors"


def dit_component(mode: str, precision: str = "bf16") -> str:
    check_mode(mode)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return f"dit_{mode}" + ("_fp8" if precision == "fp8" else "")


@dataclass(frozen=True)
class PreparedPaths:
    """Where each file of a prepared folder lives (see the module docstring)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def face_detector(self) -> Path:
        return self.root / FACE_FILES["face_detector"]

    @property
    def face_landmarks(self) -> Path:
        return self.root / FACE_FILES["face_landmarks"]

    @property
    def tiny_vae_onnx(self) -> Path:
        return self.root / TINY_VAE_ONNX

    @property
    def tiny_vae_engine(self) -> Path:
        return self.root / TINY_VAE_ENGINE

    @property
    def feature_extractor(self) -> Path:
        return self.root / FEATURE_EXTRACTOR_DIR

    def tensors(self, component: str) -> Path:
        return self.root / file_name(component)

    def dit(self, mode: str, precision: str = "bf16") -> Path:
        return self.tensors(dit_component(mode, precision))


def is_prepared(root: str | Path) -> bool:
    """True when `root` holds a prepared folder's manifest (cheap: no file is verified)."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PreparedWeightsError(
            f"{root} is not a prepared weights folder: it has no {MANIFEST_FILE} (write one with "
            "`python -m flashportrait.export.prepare_weights --release DIR --out DIR`)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise PreparedWeightsError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise PreparedWeightsError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}: prepare the folder again"
        )
    return manifest


def manifest_config(manifest: dict[str, Any], where: str = MANIFEST_FILE) -> DeploymentConfig:
    return DeploymentConfig.from_mapping(manifest["config"], where=f"{where} config")


# ---- what each tensor file holds ----


def fp8_meta_dit(config: DiTConfig) -> WanDiT:
    """The DiT on the meta device with its block linears replaced by `FP8Linear` (the layers
    `fp8_linear.dit_block_linears` selects, as `convert_linears_to_fp8` would convert them)."""
    from flashportrait.models.fp8_linear import FP8Linear, dit_block_linears

    model = build_meta(config)
    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and dit_block_linears(name, m)
    ]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        fp8 = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        setattr(model.get_submodule(parent_name), child, fp8)
    return model


def fp8_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of every FP8Linear buffer (weight, weight_scale, bias), which keep their dtype."""
    from flashportrait.models.fp8_linear import FP8Linear

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            names |= {f"{module_name}.{b}" for b, t in module.named_buffers(recurse=False) if t is not None}
    return names


# ---- loading ----


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
READERS = ("mmap", "direct")


def read_safetensors(
    path: str | Path,
    device: torch.device | str,
    *,
    chunk_bytes: int = 64 * 2**20,
    workers: int = 4,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file on `device`, and the file's metadata.

    The file's data region is read with large sequential reads into ONE buffer on `device`, and the
    tensors are views of it (the file's layout aligns each to its element size), instead of one
    page-faulted copy per tensor from a memory map. On CUDA the bytes pass through `workers` pinned
    host buffers of `chunk_bytes`, each read by its own thread and copied asynchronously on its own
    stream while the others read, so the host holds `workers * chunk_bytes`, never the file.
    """
    path, device = Path(path), torch.device(device)
    with path.open("rb", buffering=0) as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    start = 8 + size
    data = torch.empty(path.stat().st_size - start, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        _read_through_pinned(path, start, data, chunk_bytes, workers)
    else:
        _read_into(path, start, memoryview(data.numpy()))
    tensors = {}
    for name, entry in header.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            tensors[name] = data[begin:end].view(_DTYPES[entry["dtype"]]).view(entry["shape"])
    return tensors, header.get("__metadata__", {})


def _read_into(path: Path, offset: int, target: memoryview, fd: int | None = None) -> None:
    """Fill `target` with the file's bytes from `offset` (reads until full; short reads happen)."""
    own = fd is None
    fd = os.open(path, os.O_RDONLY) if own else fd
    try:
        done = 0
        while done < len(target):
            got = os.preadv(fd, [target[done:]], offset + done)
            if got == 0:
                raise PreparedWeightsError(f"{path} ends before its header says (truncated file)")
            done += got
    finally:
        if own:
            os.close(fd)


def _read_through_pinned(path: Path, start: int, data: torch.Tensor, chunk_bytes: int, workers: int) -> None:
    size = data.numel()
    chunks = [(offset, min(chunk_bytes, size - offset)) for offset in range(0, size, chunk_bytes)]
    workers = max(1, min(workers, len(chunks)))

    def work(index: int) -> None:
        with torch.cuda.device(data.device):
            buffer = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
            view = memoryview(buffer.numpy())
            stream, copied = torch.cuda.Stream(), torch.cuda.Event()
            fd = os.open(path, os.O_RDONLY)
            try:
                for offset, length in chunks[index::workers]:
                    copied.synchronize()  # the previous copy out of this buffer has finished
                    _read_into(path, start + offset, view[:length], fd)
                    with torch.cuda.stream(stream):
                        data[offset : offset + length].copy_(buffer[:length], non_blocking=True)
                        copied.record(stream)
                copied.synchronize()
            finally:
                os.close(fd)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))  # re-raises a worker's error


def load_prepared_dit(
    path: str | Path,
    config: DiTConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    reader: str = "mmap",
) -> WanDiT:
    """A bf16 DiT file of a prepared folder. reader "mmap": `load_dit` (memory-mapped, one tensor at
    a time); "direct": `read_safetensors` (large reads into one device buffer; the parameters are
    views of it when `dtype` is the file's)."""
    if reader not in READERS:
        raise ConfigError(f"reader must be one of {list(READERS)}, got {reader!r}")
    if reader == "mmap":
        return load_dit(path, config=config, dtype=dtype, device=device)
    tensors, metadata = read_safetensors(path, device)
    stated = metadata.get(CONFIG_METADATA_KEY)
    if stated is not None and DiTConfig.from_reference(json.loads(stated), where=str(path)) != config:
        raise ConfigError(f"{path} holds a DiT of another configuration than the folder's")
    model = build_meta(config)
    load_into(model, InMemorySource(tensors, description=str(path)), strict=True, dtype=dtype, device=device)
    return model.eval()


def load_fp8_dit(
    path: str | Path,
    config: DiTConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> WanDiT:
    """The DiT with FP8Linear block layers from a prepared `dit_<mode>_fp8.safetensors`; the fp8
    weights, their float32 scales and the layers' bf16 biases keep their dtypes, the rest is `dtype`."""
    model = fp8_meta_dit(config)
    keep = fp8_buffer_names(model)
    load_into(model, SafetensorsFile(path), strict=True, dtype=dtype, device=device,
              keep_dtype=keep.__contains__)  # fmt: skip
    return model.eval()


def _lora_report(manifest: dict[str, Any]) -> LoraMergeReport | None:
    lora = manifest.get("lora")
    if lora is None:
        return None
    return LoraMergeReport(
        source=lora["source"],
        strength=lora["strength"],
        merged=[tuple(m) for m in lora["merged"]],
        skipped=[tuple(s) for s in lora["skipped"]],
        ignored=list(lora["ignored"]),
    )


def _check_lora_options(
    manifest: dict[str, Any], strength: float | None, compute_dtype: torch.dtype | None
) -> None:
    lora = manifest.get("lora")
    if lora is None:
        return
    asked = {"strength": strength, "compute_dtype": None if compute_dtype is None else str(compute_dtype)}
    stored = {"strength": lora["strength"], "compute_dtype": lora["compute_dtype"]}
    if strength is not None and strength != stored["strength"]:
        raise ConfigError(
            f"the prepared fast DiT was merged at LoRA strength {stored['strength']}, not {strength}: "
            "prepare the folder again with --lora-strength, or load the release folder"
        )
    if compute_dtype is not None and asked["compute_dtype"] != stored["compute_dtype"]:
        raise ConfigError(
            f"the prepared fast DiT was merged with compute dtype {stored['compute_dtype']}, not "
            f"{asked['compute_dtype']}: prepare the folder again, or load the release folder"
        )


def load_prepared(
    root: str | Path,
    *,
    mode: Mode = "fast",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    parts: Iterable[str] = ALL_PARTS,
    config: DeploymentConfig | None = None,
    precision: str = "bf16",
    lora_strength: float | None = None,
    lora_compute_dtype: torch.dtype | None = None,
    text_cache_size: int = 0,
    verify_hashes: bool = False,
    dit_reader: str = "mmap",
) -> Components:
    """`load_components` for a prepared folder: the same models, loaded from its safetensors files
    (memory-mapped, each tensor converted to `dtype` and moved to `device` as it is read).

    precision: "bf16" or "fp8" (the DiT's FP8Linear files, written with `prepare_weights --fp8`).
    lora_strength / lora_compute_dtype: None accepts the folder's merge; a value must equal it
    (the merge was done when the folder was prepared).
    verify_hashes: sha256 every file against the manifest first (reads every byte once).
    dit_reader: how the bf16 DiT file is read (`load_prepared_dit`).
    """
    check_mode(mode)
    parts = check_parts(parts)
    paths = PreparedPaths(Path(root))
    manifest = read_manifest(paths.root)
    cfg = manifest_config(manifest, str(paths.manifest))
    if config is not None and config != cfg:
        raise ConfigError(f"{paths.root} was prepared for {cfg.name!r}, not the given config {config.name!r}")
    if verify_hashes:
        from flashportrait.components.prepared_check import check_prepared

        check_prepared(paths.root, hashes=True)
    needed: list[tuple[str, Path]] = []
    if "dit" in parts:
        needed.append((dit_component(mode, precision), paths.dit(mode, precision)))
    for part, components in PART_COMPONENTS.items():
        if part in parts and (part != "tiny_vae" or mode == "fast"):
            needed += [(c, paths.tensors(c)) for c in components]
    if "text_encoder" in parts:
        needed.append(("tokenizer", paths.tokenizer))
    if "face" in parts:
        needed += [(k, paths.root / v) for k, v in FACE_FILES.items()]
    missing = [(name, path) for name, path in needed if not path.exists()]
    if missing:
        lines = "\n".join(f"  {path}: {name}" for name, path in missing)
        raise MissingWeightsError(
            f"prepared weights {paths.root} lack what mode={mode!r}, precision={precision!r} needs "
            f"(prepared for modes {manifest['modes']}, fp8={manifest['fp8']}):\n{lines}\n"
            "(prepare again with `--mode both` and/or `--fp8`)",
            missing,
        )
    out = Components(config=cfg, mode=mode, paths=paths)
    if "dit" in parts:
        path = paths.dit(mode, precision)
        if precision == "fp8":
            out.dit = load_fp8_dit(path, cfg.dit, dtype=dtype, device=device)
        else:
            out.dit = load_prepared_dit(path, cfg.dit, dtype=dtype, device=device, reader=dit_reader)
        if mode == "fast":
            _check_lora_options(manifest, lora_strength, lora_compute_dtype)
            out.lora = _lora_report(manifest)
    if "vae" in parts:
        out.vae = vae_model.load_wan_vae(paths.tensors("wan_vae"), cfg.wan_vae, dtype=dtype, device=device)
    if "tiny_vae" in parts and mode == "fast":
        out.tiny_vae = tiny_model.load_tiny_vae(
            paths.tensors("tiny_vae"), cfg.tiny_vae, dtype=dtype, device=device
        )
    if "text_encoder" in parts:
        tokenizer = UMT5Tokenizer.from_folder(paths.tokenizer, max_length=cfg.dit.text_len)
        encoder, _ = t5_model.load_umt5_encoder(
            paths.tensors("text_encoder"), cfg.text_encoder, dtype=dtype, device=device
        )
        out.text_encoder = t5_model.TextEncoder(tokenizer, encoder, cache_size=text_cache_size)
    if "clip" in parts:
        out.clip, _ = clip_model.load_clip_vision(
            paths.tensors("clip"), cfg.clip, cfg.clip_text, dtype=dtype, device=device
        )
    if "portrait_encoder" in parts:
        out.portrait_encoder = portrait_model.load_portrait_encoder(
            paths.tensors("portrait_encoder"), cfg.portrait_encoder, device=device, dtype=torch.float32
        )
    if "motion_encoder" in parts:
        out.motion_encoder, _ = motion_model.load_motion_encoder(
            paths.tensors("motion_encoder"), cfg.motion_encoder, device=device
        )
    if "face" in parts:
        out.face = FaceModelPaths(detector=paths.face_detector, landmarks=paths.face_landmarks)
    return out


__all__ = [
    "CONFIG_FILE",
    "DIT_COMPONENTS",
    "FACE_FILES",
    "FEATURE_EXTRACTOR_DIR",
    "FLOAT32_COMPONENTS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PRECISIONS",
    "READERS",
    "TENSOR_COMPONENTS",
    "TINY_VAE_ENGINE",
    "TINY_VAE_ONNX",
    "TOKENIZER_DIR",
    "PreparedPaths",
    "PreparedWeightsError",
    "dit_component",
    "file_name",
    "fp8_buffer_names",
    "fp8_meta_dit",
    "is_prepared",
    "load_fp8_dit",
    "load_prepared",
    "load_prepared_dit",
    "read_manifest",
    "read_safetensors",
]

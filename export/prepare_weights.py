"""Release files -> the prepared serving folder (`flashportrait.components.prepared` describes it).

    python -m flashportrait.export.prepare_weights --release DIR --out DIR [--mode fast|quality|both] [--fp8]
    python -m flashportrait.export.prepare_weights --verify DIR       # sizes, sha256 and key sets

What it does, per component: read the release file(s) with the loader's own key rules and checks
(the DiT is the Wan shards with `transformer.pt` on top, strict), convert every tensor to the
storage dtype (`--dtype`, bf16 by default as the reference serves; the portrait and motion encoders
stay float32), and write exactly the tensors the model loads to one safetensors file. The fast-mode
DiT is a second file with the step-distillation LoRA merged as `load_components` merges it: in the
storage dtype (the reference's bf16 rounding) or with `--lora-fp32` each update computed in float32
and rounded once. `--fp8` adds, per mode, the DiT with its block linears as `FP8Linear` buffers
(e4m3 weight quantised per output channel from the stored weight, float32 `weight_scale`, bf16 bias),
exactly what `convert_linears_to_fp8` makes of the loaded DiT. The face ONNX models and the tokenizer
are copied. `manifest.json` (written last: a folder without it is unfinished) records the config, the
options, the LoRA merge and every file's size, sha256 and dtype summary; the folder is then checked
against the models' key sets and the release checkpoints' (`prepared.verify_prepared`).

Host memory: tensors are streamed one at a time (read one, convert/merge/quantise it, write it:
`SafetensorsWriter`), so peak RSS is the interpreter plus a few copies of the largest tensor plus
the read window: the inputs are memory-mapped, and mapped pages count as resident until unmapped,
so each input is closed and reopened after `--read-budget-mib` of data (default: the largest tensor,
at least 64 MiB). tests/export measure it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flashportrait.export.safetensors_writer import SafetensorsWriter, TensorSpec, WrittenFile, file_sha256
from flashportrait.kernels.reference import quantize_fp8_reference
from torch import nn

from flashportrait.components import MODES, WeightPaths, check_files, check_wan_config, resolve_config
from flashportrait.components.config import DeploymentConfig
from flashportrait.components.layout import ALL_PARTS
from flashportrait.components.prepared import (
    CONFIG_FILE,
    FACE_FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_DIR,
    PreparedPaths,
    fp8_buffer_names,
    is_prepared,
)
from flashportrait.components.prepared_check import (
    check_prepared,
    component_module,
    component_specs,
    verify_prepared,
)
from flashportrait.config import ConfigError, to_mapping
from flashportrait.models import clip as clip_model
from flashportrait.models import portrait_encoder as portrait_model
from flashportrait.models import tiny_vae as tiny_model
from flashportrait.models import wan_vae as vae_model
from flashportrait.models.dit_loading import flashportrait_only_keys, open_dit_checkpoint, prepared_metadata
from flashportrait.models.lora import LoraMergeReport, LoraUpdate, merge_lora, plan_lora_merge
from flashportrait.weights import (
    CheckpointMismatchError,
    TensorInfo,
    TensorSource,
    compare_keys,
    module_tensor_shapes,
    open_checkpoint,
)

MIN_READ_BUDGET = 64 * 2**20
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class PrepareOptions:
    """modes: which DiT files to write (the tiny VAE only with "fast"). dtype: storage dtype.
    fp8: also the fp8 DiT of each mode. lora_compute_dtype: None merges in `dtype` (the reference).
    read_budget: bytes read from an input before it is reopened (None: largest tensor, >= 64 MiB)."""

    modes: tuple[str, ...] = MODES
    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    lora_strength: float = 1.0
    lora_compute_dtype: torch.dtype | None = None
    read_budget: int | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        if not self.modes or set(self.modes) - set(MODES):
            raise ConfigError(f"modes must be a non-empty subset of {list(MODES)}, got {self.modes}")
        if self.dtype not in DTYPES.values():
            raise ConfigError(f"storage dtype must be bfloat16 or float32, got {self.dtype}")


class StreamingReader:
    """Tensors of one input, read one at a time; the input is reopened after `budget` bytes so the
    pages of its memory map leave this process's resident set. A returned tensor may view the map:
    use it before the next read."""

    def __init__(self, opener: Callable[[], TensorSource], budget: int | None = None):
        self._opener = opener
        self.source: TensorSource | None = opener()
        largest = max((_nbytes(self.source.info(k)) for k in self.source), default=0)
        self.budget = budget if budget is not None else max(largest, MIN_READ_BUDGET)
        self._since_open = 0
        self.reopened = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        assert self.source is not None
        size = _nbytes(self.source.info(key))
        if self._since_open and self._since_open + size > self.budget:
            self.source = None  # the last reference: the old map is unmapped here
            self.source = self._opener()
            self._since_open = 0
            self.reopened += 1
        self._since_open += size
        return self.source[key]


def _nbytes(info: TensorInfo) -> int:
    count = 1
    for d in info.shape:
        count *= d
    return count * info.dtype.itemsize


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() and dtype.is_floating_point else tensor


def _writer(path: Path, specs: Mapping[str, TensorInfo], metadata: dict[str, str]) -> SafetensorsWriter:
    return SafetensorsWriter(
        path, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in specs.items()], metadata
    )


def _metadata(component: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"format": "pt", "flashportrait.component": component, **(extra or {})}


# ---- the DiT ----


def _single_parameter_module(name: str, tensor: torch.Tensor) -> nn.Module:
    """A module whose only parameter is `name` (dotted, as in the DiT), sharing `tensor`'s memory,
    so `merge_lora` merges one tensor with exactly the arithmetic it uses on the whole model."""
    holder = owner = nn.Module()
    *path, leaf = name.split(".")
    for part in path:
        child = nn.Module()
        owner.add_module(part, child)
        owner = child
    owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return holder


def merge_one(
    name: str,
    tensor: torch.Tensor,
    updates: list[LoraUpdate],
    lora: Mapping[str, torch.Tensor],
    *,
    strength: float,
    compute_dtype: torch.dtype | None,
) -> torch.Tensor:
    """`tensor` (a private copy, changed in place) with `updates` merged, in their file order."""
    subset = {key: lora[key] for update in updates for key in update.keys}
    report = merge_lora(_single_parameter_module(name, tensor), subset, strength=strength,
                        compute_dtype=compute_dtype)  # fmt: skip
    if len(report.merged) != len(updates) or report.skipped:
        raise RuntimeError(f"merging the LoRA into {name}: expected {len(updates)} update(s), got {report}")
    return tensor


@dataclass
class DitResult:
    files: dict[str, WrittenFile] = field(default_factory=dict)
    lora: LoraMergeReport | None = None


def prepare_dit(
    paths: WeightPaths, config: DeploymentConfig, options: PrepareOptions, out: PreparedPaths
) -> DitResult:
    """Every DiT file in one pass over the release tensors (each is read once)."""
    meta = component_module("dit_quality", config)[0]
    expected = module_tensor_shapes(meta)
    emo = flashportrait_only_keys(config.dit)
    reader = StreamingReader(
        lambda: open_dit_checkpoint(expected, emo, paths.dit_base(), paths.transformer), options.read_budget
    )
    components = [f"dit_{m}" for m in options.modes]
    components += [f"{c}_fp8" for c in components] if options.fp8 else []
    metadata = prepared_metadata(config.dit)
    writers = {
        c: _writer(out.tensors(c), component_specs(c, config, options.dtype), _metadata(c, metadata))
        for c in components
    }
    fp8_keys = fp8_buffer_names(component_module("dit_quality_fp8", config)[0]) if options.fp8 else set()
    result = DitResult()
    by_param: dict[str, list[LoraUpdate]] = {}
    lora: StreamingReader | None = None
    if "fast" in options.modes:
        lora = StreamingReader(lambda: open_checkpoint(paths.fast_lora), options.read_budget)
        shapes = {k: tuple(v.shape) for k, v in meta.named_parameters()}
        updates, skipped, ignored = plan_lora_merge(lora.source, shapes)
        for update in updates:
            by_param.setdefault(update.param, []).append(update)
        result.lora = LoraMergeReport(
            source=str(paths.fast_lora), strength=options.lora_strength, skipped=skipped, ignored=ignored,
            merged=[(u.param, u.how) for u in updates],
        )  # fmt: skip
    try:
        for key in expected:
            base = _convert(reader[key], options.dtype)
            variants = {"quality": base}
            if "fast" in options.modes:
                variants["fast"] = base
                if key in by_param:
                    variants["fast"] = merge_one(
                        key,
                        base.clone(),
                        by_param[key],
                        lora,
                        strength=options.lora_strength,
                        compute_dtype=options.lora_compute_dtype,
                    )
            for component, writer in writers.items():
                tensor = variants[component.split("_")[1]]
                if not component.endswith("_fp8") or key not in fp8_keys:
                    writer.write(key, tensor)
                elif key.endswith(".weight"):
                    # what FP8Linear.load_weight does with the loaded (storage-dtype) weight
                    q, scale = quantize_fp8_reference(tensor)
                    writer.write(key, q)
                    writer.write(f"{key}_scale", scale[:, 0].contiguous())
                else:  # the FP8Linear bias buffer is in its output dtype
                    writer.write(key, tensor.to(torch.bfloat16))
            del base, variants
        for component, writer in writers.items():
            result.files[component] = writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return result


# ---- the other models ----


@dataclass(frozen=True)
class TensorFilePlan:
    """One non-DiT tensor file: where its tensors come from and which release keys it may skip."""

    component: str
    opener: Callable[[], TensorSource]
    accepted: dict[str, tuple[int, ...]] = field(default_factory=dict)  # read-never keys, may be absent
    ignore: Callable[[str], bool] | None = None  # keys the loader ignores whatever they are
    optional: frozenset[str] = frozenset()  # model keys that may be absent (written as zeros)


def tensor_file_plans(
    paths: WeightPaths, config: DeploymentConfig, modes: Iterable[str]
) -> list[TensorFilePlan]:
    """The loaders' own rules (`load_wan_vae`, `load_tiny_vae`, ...), as plans."""
    tiny_meta = component_module("tiny_vae", config)[0]
    motion_meta = component_module("motion_encoder", config)[0]
    plans = [
        TensorFilePlan("wan_vae", lambda: vae_model.wan_vae_source(open_checkpoint(paths.wan_vae))),
        TensorFilePlan("text_encoder", lambda: open_checkpoint(paths.t5)),
        TensorFilePlan(
            "clip",
            lambda: clip_model.release_layout(open_checkpoint(paths.clip)),
            accepted=clip_model.unused_shapes(config.clip, config.clip_text),
        ),
        TensorFilePlan(
            "portrait_encoder",
            lambda: open_checkpoint(paths.portrait_encoder),
            ignore=lambda key: not key.startswith(portrait_model.SUBMODULE_PREFIXES),
        ),
        TensorFilePlan(
            "motion_encoder",
            lambda: open_checkpoint(paths.motion_encoder),
            # eval-mode BatchNorm never reads its counters (`load_motion_encoder`)
            optional=frozenset(k for k in module_tensor_shapes(motion_meta) if k.endswith("batches_tracked")),
        ),
    ]
    if "fast" in modes:
        plans.insert(1, TensorFilePlan(
            "tiny_vae", lambda: tiny_model.tiny_vae_source(open_checkpoint(paths.fast_vae), tiny_meta)
        ))  # fmt: skip
    return plans


def prepare_tensor_file(
    plan: TensorFilePlan, config: DeploymentConfig, dtype: torch.dtype, out: PreparedPaths, budget: int | None
) -> WrittenFile:
    """Check the input as its loader would (strict), then stream its tensors into the prepared file."""
    specs = component_specs(plan.component, config, dtype)
    reader = StreamingReader(plan.opener, budget)
    expected = {**{k: tuple(v.shape) for k, v in specs.items()}, **plan.accepted}
    report = compare_keys(expected, reader.source, target=plan.component, ignore=plan.ignore,
                          allow_missing=set(plan.accepted) | plan.optional)  # fmt: skip
    if not report.ok:
        raise CheckpointMismatchError(report)
    present = set(reader.source)
    with _writer(out.tensors(plan.component), specs, _metadata(plan.component)) as writer:
        for spec in writer.order:
            if spec.name in present:
                writer.write(spec.name, _convert(reader[spec.name], spec.dtype))
            else:
                writer.write(spec.name, torch.zeros(spec.shape, dtype=spec.dtype))
        return writer.close()


# ---- the folder ----


def _record(written: WrittenFile) -> dict[str, Any]:
    return {
        "size": written.size,
        "sha256": written.sha256,
        "tensors": written.tensors,
        "dtypes": written.dtypes,
    }


def _copy(source: Path, target: Path) -> dict[str, Any]:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return {"size": target.stat().st_size, "sha256": file_sha256(target)}


def prepare_weights(
    release: str | Path | WeightPaths,
    out: str | Path,
    options: PrepareOptions | None = None,
    *,
    config: DeploymentConfig | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Write the prepared folder for `release` (a release-layout root or `WeightPaths`) to `out`;
    returns the manifest. `out` must be new, empty or an earlier prepared folder (overwritten)."""
    options = options or PrepareOptions()
    paths = release if isinstance(release, WeightPaths) else WeightPaths.under(release)
    cfg = resolve_config(paths, config)
    for mode in options.modes:
        check_files(paths, mode, ALL_PARTS)
    check_wan_config(paths.wan_config, cfg.dit)
    target = PreparedPaths(Path(out))
    if target.root.exists() and any(target.root.iterdir()) and not is_prepared(target.root):
        raise FileExistsError(f"{target.root} is neither empty nor a prepared weights folder: choose another")
    target.root.mkdir(parents=True, exist_ok=True)
    target.manifest.unlink(missing_ok=True)  # the folder is unfinished until the manifest is back
    files: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()

    dit = prepare_dit(paths, cfg, options, target)
    for written in dit.files.values():
        files[written.path.name] = _record(written)
        log(f"{written.path.name}: {written.size / 2**20:.1f} MiB ({time.perf_counter() - start:.1f} s)")
    plans = tensor_file_plans(paths, cfg, options.modes)
    for plan in plans:
        written = prepare_tensor_file(plan, cfg, options.dtype, target, options.read_budget)
        files[written.path.name] = _record(written)
        log(f"{written.path.name}: {written.size / 2**20:.1f} MiB ({time.perf_counter() - start:.1f} s)")
    if target.tokenizer.exists():
        shutil.rmtree(target.tokenizer)
    for source in sorted(p for p in paths.tokenizer.rglob("*") if p.is_file()):
        relative = Path(TOKENIZER_DIR) / source.relative_to(paths.tokenizer)
        files[relative.as_posix()] = _copy(source, target.root / relative)
    for field_name, relative in FACE_FILES.items():
        files[relative] = _copy(getattr(paths, field_name), target.root / relative)
    target.config.write_text(cfg.to_json())
    files[CONFIG_FILE] = {"size": target.config.stat().st_size, "sha256": file_sha256(target.config)}

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": "flashportrait.export.prepare_weights",
        "source": str(paths.root.resolve()),
        "config": to_mapping(cfg),
        "modes": list(options.modes),
        "dtype": str(options.dtype).removeprefix("torch."),
        "fp8": options.fp8,
        "components": sorted([*dit.files, *(p.component for p in plans)]),
        "lora": None,
        "files": dict(sorted(files.items())),
    }
    if dit.lora is not None:
        manifest["lora"] = {
            "source": paths.fast_lora.name,
            "strength": options.lora_strength,
            "compute_dtype": None if options.lora_compute_dtype is None else str(options.lora_compute_dtype),
            "merged": [list(m) for m in dit.lora.merged],
            "skipped": [list(s) for s in dit.lora.skipped],
            "ignored": dit.lora.ignored,
        }
    partial = target.manifest.with_name(MANIFEST_FILE + ".partial")
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    partial.replace(target.manifest)
    if options.verify:
        check_prepared(target.root, hashes=False)  # hashes were computed while writing
    log(f"prepared {target.root} in {time.perf_counter() - start:.1f} s")
    return manifest


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashportrait.export.prepare_weights",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--release", type=Path, help="weights folder in the release layout")
    parser.add_argument("--out", type=Path, help="prepared folder to write")
    parser.add_argument("--verify", type=Path, metavar="DIR", help="verify a prepared folder (sha256 too)")
    parser.add_argument("--mode", choices=["fast", "quality", "both"], default="both")
    parser.add_argument("--fp8", action="store_true", help="also write the fp8 DiT of each mode")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype")
    parser.add_argument("--lora-strength", type=float, default=1.0)
    parser.add_argument("--lora-fp32", action="store_true", help="compute each LoRA update in float32")
    parser.add_argument("--read-budget-mib", type=float, help="reopen an input after this many MiB")
    parser.add_argument("--no-verify", action="store_true", help="skip the final key-set check")
    args = parser.parse_args(argv)
    if args.verify is None and (args.release is None or args.out is None):
        parser.error("give --release and --out, or --verify DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.verify is not None:
        problems = verify_prepared(args.verify, hashes=True)
        print("\n".join(problems) if problems else f"{args.verify}: every file and key set verified")
        return 1 if problems else 0
    options = PrepareOptions(
        modes=MODES if args.mode == "both" else (args.mode,),
        dtype=DTYPES[args.dtype],
        fp8=args.fp8,
        lora_strength=args.lora_strength,
        lora_compute_dtype=torch.float32 if args.lora_fp32 else None,
        read_budget=None if args.read_budget_mib is None else int(args.read_budget_mib * 2**20),
        verify=not args.no_verify,
    )
    prepare_weights(args.release, args.out, options, log=print)
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

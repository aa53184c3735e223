"""Loading the DiT from the release checkpoints, and random DiTs for tests and benchmarks.

Release layouts (`golden/manifests/README.md`):
- the Wan2.1-I2V-14B folder: `config.json` plus `diffusion_pytorch_model-*.safetensors` shards and
  their `.index.json`, holding every key except FlashPortrait's `emo_k_proj`/`emo_v_proj`;
- FlashPortrait's `transformer.pt` (torch pickle, with or without a `state_dict` wrapper; any subset
  of the keys but always the expression projections), loaded on top and winning where both hold a key;
- a prepared single `.safetensors` with every key (its metadata may carry the config).

Unlike the reference (which drops mis-shaped keys, loads `transformer.pt` with strict=False and
zero-initialises what is missing), loading is strict: every parameter must come from exactly the
union of the files, and unknown or mis-shaped keys fail with a message naming them. The model is
built on the meta device and filled one tensor at a time in the target dtype and device, so a 14B
model is never held twice in host memory (the files themselves are memory-mapped).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from flashportrait.config import ConfigError
from flashportrait.models.transformer import DiTConfig, WanDiT, build_meta
from flashportrait.weights import (
    CheckpointError,
    CheckpointMismatchError,
    LoadReport,
    MergedSource,
    SafetensorsFile,
    TensorInfo,
    TensorSource,
    compare_keys,
    load_into,
    module_tensor_shapes,
    open_checkpoint,
)

# Metadata entry of a prepared single-file checkpoint holding `DiTConfig.to_json()`.
CONFIG_METADATA_KEY = "flashportrait.dit_config"
RELEASE_CONFIG = "config.json"


class DiTCheckpointError(CheckpointMismatchError):
    """A DiT checkpoint (or combination of files) that does not match the model; names the keys."""

    def __init__(self, report: LoadReport, hint: str = ""):
        super().__init__(report)
        if hint:
            self.args = (f"{report}\n  {hint}",)


def flashportrait_only_keys(config: DiTConfig) -> list[str]:
    """The keys FlashPortrait adds to the Wan DiT (absent from the Wan release shards)."""
    return [
        f"blocks.{i}.cross_attn.{name}.weight"
        for i in range(config.num_layers)
        for name in ("emo_k_proj", "emo_v_proj")
    ]


def prepared_metadata(config: DiTConfig) -> dict[str, str]:
    """safetensors metadata that makes a single-file checkpoint self-describing."""
    return {CONFIG_METADATA_KEY: config.to_json()}


def resolve_config(base: Path, config: DiTConfig | None) -> DiTConfig:
    """`config` if given; else the release `config.json` beside the weights; else the config stored
    in a prepared safetensors file's metadata."""
    if config is not None:
        return config
    folder = base if base.is_dir() else base.parent
    if (folder / RELEASE_CONFIG).is_file():
        return DiTConfig.from_json_file(folder / RELEASE_CONFIG)
    if base.is_file() and not base.name.endswith(".index.json"):
        try:
            metadata = SafetensorsFile(base).metadata
        except CheckpointError:
            metadata = {}
        if CONFIG_METADATA_KEY in metadata:
            return DiTConfig.from_reference(
                json.loads(metadata[CONFIG_METADATA_KEY]), where=f"{base} metadata"
            )
    raise ConfigError(
        f"no DiT configuration for {base}: pass config=, put the release {RELEASE_CONFIG} beside the "
        f"weights, or use a prepared safetensors file with {CONFIG_METADATA_KEY!r} metadata"
    )


def _check_subset(expected: dict[str, tuple[int, ...]], source: TensorSource, role: str) -> None:
    """Every key of `source` must be a parameter of the model, with its shape."""
    report = compare_keys(expected, source, target=f"WanDiT ({role})", allow_missing=expected)
    if report.unexpected or report.shape_mismatch:
        raise DiTCheckpointError(report)


def open_dit_checkpoint(
    expected: dict[str, tuple[int, ...]],
    emo_keys: list[str],
    base: str | Path,
    overlay: str | Path | None = None,
) -> TensorSource:
    """The checked union of `base` and `overlay` (overlay wins), covering exactly `expected`."""
    base_source = open_checkpoint(base)
    _check_subset(expected, base_source, "base weights")
    sources = [base_source]
    if overlay is not None:
        overlay_source = open_checkpoint(overlay)
        _check_subset(expected, overlay_source, "FlashPortrait weights")
        lacking = [k for k in emo_keys if k not in overlay_source]
        if lacking:
            raise DiTCheckpointError(
                LoadReport(
                    target="WanDiT (FlashPortrait weights)",
                    source=overlay_source.description,
                    missing=lacking,
                ),
                "a FlashPortrait transformer checkpoint must hold the expression projections "
                "emo_k_proj/emo_v_proj",
            )
        sources.append(overlay_source)
    merged = MergedSource(sources, override=True) if len(sources) > 1 else base_source
    missing = [k for k in expected if k not in merged]
    if missing:
        hint = ""
        if overlay is None and set(missing) <= set(emo_keys):
            hint = (
                "the Wan release lacks FlashPortrait's emo_k_proj/emo_v_proj: "
                "pass transformer.pt as the overlay"
            )
        raise DiTCheckpointError(
            LoadReport(target="WanDiT", source=merged.description, missing=missing), hint
        )
    return merged


def load_dit(
    base: str | Path,
    overlay: str | Path | None = None,
    *,
    config: DiTConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> WanDiT:
    """The DiT from release files, in eval mode, every tensor in `dtype` on `device`.

    base: the Wan release folder (config.json + shards + index), its `.index.json`, or a prepared
        single safetensors file (or any checkpoint `open_checkpoint` reads).
    overlay: FlashPortrait's `transformer.pt` (or a safetensors file) loaded on top.
    config: the architecture; by default read from `config.json` beside the weights or from the
        prepared file's metadata.
    """
    base = Path(base)
    config = resolve_config(base, config)
    model = build_meta(config)
    expected = module_tensor_shapes(model)
    source = open_dit_checkpoint(expected, flashportrait_only_keys(config), base, overlay)
    load_into(model, source, strict=True, dtype=dtype, device=device)
    return model.eval()


class RandomSource(TensorSource):
    """Random DiT weights generated on demand, one tensor at a time, directly in `dtype` on `device`
    (a full-size model never exists on the host). Scales follow the golden cases: weights
    N(0, 1/fan_in), biases N(0, 0.05^2), norm scales 1 + N(0, 0.1^2), modulations N(0, 1/dim).
    Each key has its own seeded generator, so values do not depend on loading order."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        *,
        seed: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self._shapes = dict(shapes)
        self._index = {k: i for i, k in enumerate(sorted(self._shapes))}
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)
        self.description = f"random weights (seed {seed})"

    def __getitem__(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self._index[key])
        noise = torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)
        if key.endswith("modulation"):
            return noise.mul_(shape[-1] ** -0.5)
        if key.endswith(".bias"):
            return noise.mul_(0.05)
        if len(shape) == 1:
            return noise.mul_(0.1).add_(1.0)
        return noise.mul_(math.prod(shape[1:]) ** -0.5)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def info(self, key: str) -> TensorInfo:
        return TensorInfo(self._shapes[key], self.dtype)


def random_dit(
    config: DiTConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> WanDiT:
    """A DiT with random weights (see `RandomSource`), in eval mode."""
    model = build_meta(config)
    source = RandomSource(module_tensor_shapes(model), seed=seed, dtype=dtype, device=device)
    load_into(model, source, strict=True, dtype=dtype, device=device)
    return model.eval()

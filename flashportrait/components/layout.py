"""Where each file of a FlashPortrait deployment lives, and which files a mode and a set of parts need.

The weights folder has exactly the layout of the two releases, side by side::

    <root>/
      flashportrait_config.json        sizes (DeploymentConfig JSON); absent for the real release
      Wan2.1-I2V-14B-720P/             Wan-AI/Wan2.1-I2V-14B-720P
        config.json                    DiT architecture (checked against the deployment config)
        diffusion_pytorch_model-*.safetensors
        diffusion_pytorch_model.safetensors.index.json
        Wan2.1_VAE.pth
        models_t5_umt5-xxl-enc-bf16.pth
        google/umt5-xxl/               tokenizer (tokenizer.json and/or spiece.model)
        models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
      FlashPortrait/                   FrancisRing/FlashPortrait
        transformer.pt                 DiT weights on top of the Wan shards (with the emo projections)
        portrait_encoder.pt
        pd_fpg.pth                     PD-FGC motion encoder
        face_det.onnx, face_landmark.onnx
        fast_lora_rank64.safetensors   step-distillation LoRA (fast mode)
        fast_vae.pth                   TAEHV tiny VAE (fast mode decoder)

Every path can be overridden on its own (`WeightPaths.under(root, fast_lora=...)`); a relative
override is taken relative to the root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from flashportrait.config import ConfigError

WAN_DIR = "Wan2.1-I2V-14B-720P"
FLASHPORTRAIT_DIR = "FlashPortrait"
CONFIG_FILE = "flashportrait_config.json"
WAN_SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"

Mode = Literal["fast", "quality"]
MODES: tuple[str, ...] = ("fast", "quality")

# The loadable parts, and the subsets each Triton model needs.
PARTS: tuple[str, ...] = (
    "dit",
    "vae",
    "tiny_vae",
    "text_encoder",
    "clip",
    "portrait_encoder",
    "motion_encoder",
    "face",
)
SAMPLER_PARTS = frozenset({"dit", "vae", "tiny_vae", "clip", "portrait_encoder"})
TEXT_ENCODER_PARTS = frozenset({"text_encoder"})
FEATURE_EXTRACTOR_PARTS = frozenset({"motion_encoder"})
FACE_ALIGN_PARTS = frozenset({"face"})
ALL_PARTS = frozenset(PARTS)


class MissingWeightsError(FileNotFoundError):
    """Files a requested mode and set of parts needs are absent; the message lists each one, what it
    is and what needs it. `missing` holds (field name, path) pairs."""

    def __init__(self, message: str, missing: list[tuple[str, Path]]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class WeightPaths:
    """Every file of a deployment (see the module docstring for the default layout)."""

    root: Path
    config: Path  # flashportrait_config.json (optional: the release preset applies without it)
    wan_config: Path
    wan_dit: Path  # the shard index, or the folder of shards (every *.safetensors in it is merged)
    wan_vae: Path
    t5: Path
    tokenizer: Path  # a folder
    clip: Path
    transformer: Path
    portrait_encoder: Path
    motion_encoder: Path
    face_detector: Path
    face_landmarks: Path
    fast_lora: Path
    fast_vae: Path

    @classmethod
    def under(cls, root: str | Path, **overrides: str | Path) -> WeightPaths:
        """The release layout under `root`, with any field replaced by `overrides` (relative paths are
        relative to `root`)."""
        root = Path(root)
        wan, fp = root / WAN_DIR, root / FLASHPORTRAIT_DIR
        default = cls(
            root=root,
            config=root / CONFIG_FILE,
            wan_config=wan / "config.json",
            wan_dit=wan / WAN_INDEX,
            wan_vae=wan / "Wan2.1_VAE.pth",
            t5=wan / "models_t5_umt5-xxl-enc-bf16.pth",
            tokenizer=wan / "google" / "umt5-xxl",
            clip=wan / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
            transformer=fp / "transformer.pt",
            portrait_encoder=fp / "portrait_encoder.pt",
            motion_encoder=fp / "pd_fpg.pth",
            face_detector=fp / "face_det.onnx",
            face_landmarks=fp / "face_landmark.onnx",
            fast_lora=fp / "fast_lora_rank64.safetensors",
            fast_vae=fp / "fast_vae.pth",
        )
        return default.with_overrides(overrides)

    def with_overrides(self, overrides: Mapping[str, str | Path]) -> WeightPaths:
        names = {f.name for f in fields(self)} - {"root"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown weight path override(s) {unknown}; valid names are {sorted(names)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: self.root / Path(v) for k, v in overrides.items()})
        return WeightPaths(**values)

    def dit_base(self) -> Path:
        """What `load_dit` opens: the shard index if it exists, else the folder of shards (the
        reference merges every safetensors file in the folder when there is no index)."""
        if self.wan_dit.exists():
            return self.wan_dit
        return self.wan_dit.parent


@dataclass(frozen=True)
class Requirement:
    field: str
    what: str
    parts: frozenset[str]
    fast_only: bool = False


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("wan_config", "the Wan DiT config.json", frozenset({"dit"})),
    Requirement("wan_dit", "the Wan DiT shards (diffusion_pytorch_model-*.safetensors)", frozenset({"dit"})),
    Requirement("transformer", "FlashPortrait's DiT weights with the expression projections",
                frozenset({"dit"})),
    Requirement("fast_lora", "the step-distillation LoRA merged into the DiT", frozenset({"dit"}),
                fast_only=True),
    Requirement("wan_vae", "the Wan VAE (encoder, and decoder in quality mode)", frozenset({"vae"})),
    Requirement("fast_vae", "the TAEHV tiny VAE decoder", frozenset({"tiny_vae"}), fast_only=True),
    Requirement("t5", "the umT5-XXL text encoder", frozenset({"text_encoder"})),
    Requirement("tokenizer", "the umT5 tokenizer folder (tokenizer.json or spiece.model)",
                frozenset({"text_encoder"})),
    Requirement("clip", "the CLIP ViT-H/14 image encoder", frozenset({"clip"})),
    Requirement("portrait_encoder", "the portrait (expression token) encoder",
                frozenset({"portrait_encoder"})),
    Requirement("motion_encoder", "the PD-FGC motion encoder", frozenset({"motion_encoder"})),
    Requirement("face_detector", "the face detector ONNX model", frozenset({"face"})),
    Requirement("face_landmarks", "the 222-point face landmark ONNX model", frozenset({"face"})),
)  # fmt: skip


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")


def check_parts(parts: Iterable[str]) -> frozenset[str]:
    parts = frozenset(parts)
    unknown = sorted(parts - ALL_PARTS)
    if unknown or not parts:
        raise ConfigError(f"unknown or no parts {unknown or '(none)'}; valid parts are {list(PARTS)}")
    return parts


def _present(field: str, path: Path) -> bool:
    if field == "wan_dit":
        # the index, or (the reference's fallback) a folder holding the shards
        folder = path if path.is_dir() else path.parent
        return path.is_file() or any(folder.glob(WAN_SHARD_GLOB))
    if field == "tokenizer":
        return (path / "tokenizer.json").is_file() or (path / "spiece.model").is_file()
    return path.is_file()


def required_files(mode: str, parts: Iterable[str]) -> list[Requirement]:
    """The requirements of `parts` in `mode` (the tiny VAE is only needed, and loaded, in fast mode)."""
    check_mode(mode)
    parts = check_parts(parts)
    return [r for r in REQUIREMENTS if r.parts & parts and (mode == "fast" or not r.fast_only)]


def check_files(paths: WeightPaths, mode: str, parts: Iterable[str]) -> None:
    """Raise one `MissingWeightsError` naming every file `mode` and `parts` need that is absent."""
    parts = check_parts(parts)
    missing = [r for r in required_files(mode, parts) if not _present(r.field, getattr(paths, r.field))]
    if not missing:
        return
    lines = []
    for r in missing:
        needed_by = ", ".join(sorted(r.parts & parts))
        when = f"{mode} mode (mode='quality' does not use it)" if r.fast_only else f"{mode} mode"
        lines.append(f"  {getattr(paths, r.field)}: {r.what}; needed by {needed_by} in {when}")
    raise MissingWeightsError(
        f"FlashPortrait weights under {paths.root} are incomplete ({len(missing)} missing file(s)):\n"
        + "\n".join(lines)
        + "\n(the weights come from the FrancisRing/FlashPortrait and Wan-AI/Wan2.1-I2V-14B-720P releases, "
        "or `python -m flashportrait.export.demo_weights --out DIR` for tiny demo weights)",
        [(r.field, getattr(paths, r.field)) for r in missing],
    )


__all__ = [
    "ALL_PARTS",
    "CONFIG_FILE",
    "FACE_ALIGN_PARTS",
    "FEATURE_EXTRACTOR_PARTS",
    "FLASHPORTRAIT_DIR",
    "MODES",
    "PARTS",
    "SAMPLER_PARTS",
    "TEXT_ENCODER_PARTS",
    "WAN_DIR",
    "WAN_INDEX",
    "MissingWeightsError",
    "Mode",
    "Requirement",
    "WeightPaths",
    "check_files",
    "required_files",
]

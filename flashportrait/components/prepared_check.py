"""Checking a prepared weights folder (`prepared.py`) against its manifest and against the models.

What each tensor file must hold is derived from the models themselves, built on the meta device at
the folder's config (`component_specs`), and compared with the release checkpoints' key space
(`release_shapes`: each model's `manifest_shapes`, which the golden manifest checks hold equal to
the manifests of the real files): exactly at full size, by name with block indices folded otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from flashportrait.components.config import DeploymentConfig
from flashportrait.components.prepared import (
    FLOAT32_COMPONENTS,
    PreparedPaths,
    PreparedWeightsError,
    fp8_buffer_names,
    fp8_meta_dit,
    manifest_config,
    read_manifest,
)
from flashportrait.models import clip as clip_model
from flashportrait.models import motion_encoder as motion_model
from flashportrait.models import portrait_encoder as portrait_model
from flashportrait.models import t5 as t5_model
from flashportrait.models import tiny_vae as tiny_model
from flashportrait.models import wan_vae as vae_model
from flashportrait.models.dit_loading import CONFIG_METADATA_KEY
from flashportrait.models.transformer import DiTConfig, build_meta
from flashportrait.weights import SafetensorsFile, TensorInfo, module_tensor_shapes

_REPEATED = re.compile(r"(blocks|transformer|layers)\.\d+\.")


def component_module(component: str, config: DeploymentConfig) -> tuple[nn.Module, str]:
    """The component's model on the meta device, and the prefix its file puts before the model's keys."""
    with torch.device("meta"):
        if component.startswith("dit_"):
            return (fp8_meta_dit(config.dit) if component.endswith("_fp8") else build_meta(config.dit)), ""
        builders = {
            "wan_vae": lambda: (vae_model.WanVAE(config.wan_vae), ""),
            "tiny_vae": lambda: (tiny_model.TinyVaeDecoder(config.tiny_vae), ""),
            "text_encoder": lambda: (t5_model.UMT5Encoder(config.text_encoder), ""),
            "clip": lambda: (clip_model.build_clip_vision(config.clip), "visual."),
            "portrait_encoder": lambda: (portrait_model.PortraitEncoder(config.portrait_encoder), ""),
            "motion_encoder": lambda: (motion_model.MotionEncoder(config.motion_encoder), ""),
        }
        if component not in builders:
            raise KeyError(f"unknown prepared component {component!r}")
        return builders[component]()


def component_specs(component: str, config: DeploymentConfig, dtype: torch.dtype) -> dict[str, TensorInfo]:
    """Name -> (shape, dtype) of every tensor the component's prepared file holds, in model order.

    dtype: the folder's storage dtype for floating tensors (float32 for the encoders the reference
    keeps in float32); integer buffers and the FP8Linear buffers keep their own dtypes.
    """
    module, prefix = component_module(component, config)
    keep = fp8_buffer_names(module)
    float_dtype = torch.float32 if component in FLOAT32_COMPONENTS else dtype
    specs = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name in keep or not tensor.is_floating_point():
            specs[prefix + name] = TensorInfo(tuple(tensor.shape), tensor.dtype)
        else:
            specs[prefix + name] = TensorInfo(tuple(tensor.shape), float_dtype)
    return specs


@functools.cache
def release_shapes(component: str) -> dict[str, tuple[int, ...]]:
    """The full-size release checkpoint's names and shapes for `component`, in the prepared file's key
    space: each model's `manifest_shapes` (which the golden manifest checks hold equal to the
    manifests of the real files) without the prefix the reference loader adds."""
    if component.startswith("dit_"):
        return module_tensor_shapes(build_meta(DiTConfig.wan_i2v_14b()))
    functions = {
        "wan_vae": (vae_model.manifest_shapes, vae_model.WRAPPER_PREFIX),
        "tiny_vae": (tiny_model.manifest_shapes, ""),
        "text_encoder": (t5_model.manifest_shapes, ""),
        "clip": (clip_model.manifest_shapes, clip_model.REFERENCE_PREFIX),
        "portrait_encoder": (portrait_model.manifest_shapes, ""),
        "motion_encoder": (motion_model.manifest_shapes, ""),
    }
    function, prefix = functions[component]
    return {k.removeprefix(prefix): tuple(v) for k, v in function({}).items()}


def fold(key: str) -> str:
    """A key with the index of repeated blocks folded (`blocks.#.`), so 2 tiny blocks match 40 real."""
    return _REPEATED.sub(r"\1.#.", key)


def release_key_problems(component: str, shapes: dict[str, tuple[int, ...]], *, exact: bool) -> list[str]:
    """Problems of a prepared file's keys against the release checkpoint's (`release_shapes`).

    exact (full-size config): every key must be a release key with the release's shape. Otherwise
    (other sizes) names are compared with block indices folded, and ranks must agree. The fp8 DiT's
    `<linear>.weight_scale` has no release counterpart: its `<linear>.weight` must be in the file.
    """
    release = release_shapes(component)
    ranks = {fold(k): len(s) for k, s in release.items()}
    problems = []
    for key, shape in shapes.items():
        if component.endswith("_fp8") and key.endswith(".weight_scale"):
            if key.removesuffix("_scale") not in shapes:
                problems.append(f"{component}: {key} has no weight beside it")
            continue
        if exact:
            if key not in release:
                problems.append(f"{component}: {key} is not a key of the release checkpoint")
            elif tuple(shape) != tuple(release[key]):
                problems.append(f"{component}: {key} {list(shape)}, release {list(release[key])}")
        elif fold(key) not in ranks:
            problems.append(f"{component}: {key} matches no key of the release checkpoint")
        elif ranks[fold(key)] != len(shape):
            problems.append(f"{component}: {key} has rank {len(shape)}, the release's {ranks[fold(key)]}")
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(4 * 2**20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def verify_prepared(root: str | Path, *, hashes: bool = True) -> list[str]:
    """Every problem of a prepared folder (empty when it is sound).

    Checks that each file the manifest lists exists with its size (and sha256 when `hashes`), that
    each tensor file holds exactly the names, shapes and dtypes its model loads at the folder's
    config, that those are the release checkpoint's keys (`release_key_problems`), and that the DiT
    files carry the config in their metadata.
    """
    paths = PreparedPaths(Path(root))
    manifest = read_manifest(paths.root)
    config = manifest_config(manifest)
    dtype = getattr(torch, manifest["dtype"])
    exact = config == DeploymentConfig.release()
    problems = []
    for name, record in sorted(manifest["files"].items()):
        path = paths.root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != record["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {record['size']}")
        elif hashes and _sha256(path) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest's (the file was altered)")
    for component in manifest["components"]:
        path = paths.tensors(component)
        if not path.is_file():
            continue  # reported above
        source = SafetensorsFile(path)
        got = {k: source.info(k) for k in source}
        want = component_specs(component, config, dtype)
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing:
            problems.append(f"{path.name}: {len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if extra:
            problems.append(f"{path.name}: {len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
        wrong = [k for k in set(got) & set(want) if got[k] != want[k]]
        for key in sorted(wrong)[:5]:
            problems.append(f"{path.name}: {key} is {got[key].dtype} {list(got[key].shape)}, expected "
                            f"{want[key].dtype} {list(want[key].shape)}")  # fmt: skip
        problems += release_key_problems(component, {k: v.shape for k, v in got.items()}, exact=exact)
        if component.startswith("dit_"):
            stated = source.metadata.get(CONFIG_METADATA_KEY)
            if stated is None or DiTConfig.from_reference(json.loads(stated)) != config.dit:
                problems.append(f"{path.name}: its {CONFIG_METADATA_KEY!r} metadata is not the folder's DiT")
    return problems


def check_prepared(root: str | Path, *, hashes: bool = True) -> None:
    """Raise `PreparedWeightsError` listing every problem `verify_prepared` finds."""
    problems = verify_prepared(root, hashes=hashes)
    if problems:
        raise PreparedWeightsError(
            f"prepared weights {root} fail verification ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )


__all__ = [
    "check_prepared",
    "component_module",
    "component_specs",
    "fold",
    "release_key_problems",
    "release_shapes",
    "verify_prepared",
]

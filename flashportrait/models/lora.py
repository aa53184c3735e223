"""Merging the step-distillation LoRA (`fast_lora_rank64.safetensors`) into a model's weights.

Reference: `wan.utils.step_distill_lora.apply_step_distill_lora` (REFERENCE.md 1.1, quirk 17; golden
`lora_merge_tiny`). Keys, after stripping a leading `diffusion_model.`:

    <t>.lora_down.weight + <t>.lora_up.weight  ->  <t>.weight += strength * (up @ down)
    <t>.lora_A.weight    + <t>.lora_B.weight   ->  the same (A = down, B = up)
    <t>.diff    -> <t>.weight if the model has it, else the bare name <t> (e.g. `blocks.1.modulation`)
    <t>.diff_b  -> <t>.bias
    <t>.diff_m  -> <t>.modulation (LightX2V's block/head modulation differences)
    <t>.alpha   -> ignored: the reference applies NO alpha/rank scaling

A LoRA pair needs `param.shape == (up.rows, down.cols)`; a 4-D (Conv2d) parameter whose first two
dims match gets the product as a [out, in, 1, 1] term broadcast over the kernel, as the reference
does; anything else (the 5-D Conv3d `patch_embedding`) is skipped, as are keys whose target does not
exist, unpaired halves and unrecognised keys. Every skip is listed in the returned report (the
reference skips silently).

Precision: the reference casts the LoRA tensors to the parameter's dtype and computes the product,
the strength multiply and the `+=` in it, so with the release's bf16 transformer the merge rounds in
bf16. `compute_dtype=None` reproduces that; `compute_dtype=torch.float32` computes the update in
float32 and rounds once into the parameter (more accurate for bf16 weights, not the reference's
numbers). Merging again with `-strength` undoes a merge (exactly up to rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flashportrait.weights import TensorSource, open_checkpoint

RELEASE_PREFIX = "diffusion_model."
_PAIR_SUFFIXES = {
    ".lora_down.weight": ("lora_down/up", "down"),
    ".lora_up.weight": ("lora_down/up", "up"),
    ".lora_A.weight": ("lora_A/B", "down"),
    ".lora_B.weight": ("lora_A/B", "up"),
}
_DIFF_SUFFIXES = (".diff_b", ".diff_m", ".diff")  # longest first: ".diff" is a prefix of the others


@dataclass
class LoraMergeReport:
    """What a merge did. `merged`: (parameter, how) in merge order; `skipped`: (LoRA key, why)."""

    source: str
    strength: float
    merged: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def merged_parameters(self) -> list[str]:
        return sorted({name for name, _ in self.merged})

    def __str__(self) -> str:
        lines = [
            f"LoRA {self.source} at strength {self.strength:g}: {len(self.merged)} update(s) to "
            f"{len(self.merged_parameters)} parameter(s), {len(self.skipped)} skipped, "
            f"{len(self.ignored)} alpha key(s) ignored"
        ]
        lines += [f"  skipped {key}: {why}" for key, why in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class LoraUpdate:
    """One planned update `param += strength * delta`; delta = up @ down (a pair) or a diff tensor."""

    param: str
    how: str
    keys: tuple[str, ...]  # the LoRA keys it reads: (down, up) for a pair, (diff,) otherwise


def _strip(key: str) -> str:
    return key[len(RELEASE_PREFIX) :] if key.startswith(RELEASE_PREFIX) else key


def plan_lora_merge(
    lora: Mapping[str, torch.Tensor] | TensorSource, param_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[LoraUpdate], list[tuple[str, str]], list[str]]:
    """Resolve LoRA keys against parameter names/shapes without reading tensor data.

    Returns (updates in the file's key order, skipped (key, reason), ignored alpha keys).
    """

    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(lora.info(key).shape if isinstance(lora, TensorSource) else lora[key].shape)

    pairs: dict[tuple[str, str], dict[str, str]] = {}
    order: list[tuple[str, tuple[str, str] | str]] = []  # (kind, pair id or diff key) in key order
    skipped: list[tuple[str, str]] = []
    ignored: list[str] = []
    for key in lora:
        name = _strip(key)
        pair_suffix = next((s for s in _PAIR_SUFFIXES if name.endswith(s)), None)
        if pair_suffix is not None:
            style, role = _PAIR_SUFFIXES[pair_suffix]
            pair = (name[: -len(pair_suffix)], style)
            if pair not in pairs:
                pairs[pair] = {}
                order.append(("pair", pair))
            pairs[pair][role] = key
        elif name.endswith(_DIFF_SUFFIXES):
            order.append(("diff", key))
        elif name.endswith(".alpha"):
            ignored.append(key)
        else:
            skipped.append((key, "not a LoRA key this merge understands"))

    updates: list[LoraUpdate] = []
    for kind, item in order:
        if kind == "pair":
            target, style = item
            roles = pairs[item]
            if set(roles) != {"down", "up"}:
                (have,) = roles.values()
                missing = "up" if "down" in roles else "down"
                skipped.append((have, f"no {missing} partner ({style})"))
                continue
            param = f"{target}.weight"
            down, up = roles["down"], roles["up"]
            if param not in param_shapes:
                skipped.append((f"{target} ({style})", f"the model has no parameter {param}"))
                continue
            shape = tuple(param_shapes[param])
            up_shape, down_shape = shape_of(up), shape_of(down)
            product = (up_shape[0], down_shape[1]) if len(up_shape) >= 2 and len(down_shape) >= 2 else None
            if len(shape) == 2 and len(up_shape) == 2 and len(down_shape) == 2 and shape == product:
                updates.append(LoraUpdate(param, style, (down, up)))
            elif len(shape) == 4 and shape[:2] == product and _ones(up_shape[2:]) and _ones(down_shape[2:]):
                updates.append(LoraUpdate(param, f"{style} (1x1 conv term)", (down, up)))
            else:
                skipped.append(
                    (
                        f"{target} ({style})",
                        f"{param} {list(shape)} cannot take up {list(up_shape)} @ "
                        f"down {list(down_shape)} (only Linear and 4-D conv targets are merged)",
                    )
                )
        else:
            key = item
            name = _strip(key)
            suffix = next(s for s in _DIFF_SUFFIXES if name.endswith(s))
            target = name[: -len(suffix)]
            if suffix == ".diff":
                param = f"{target}.weight" if f"{target}.weight" in param_shapes else target
            else:
                param = f"{target}.bias" if suffix == ".diff_b" else f"{target}.modulation"
            if param not in param_shapes:
                skipped.append((key, f"the model has no parameter {param}"))
            elif shape_of(key) != tuple(param_shapes[param]):
                skipped.append((key, f"shape {list(shape_of(key))} != {param} {list(param_shapes[param])}"))
            else:
                updates.append(LoraUpdate(param, suffix[1:], (key,)))
    return updates, skipped, ignored


def _ones(dims: tuple[int, ...]) -> bool:
    return all(d == 1 for d in dims)


@torch.no_grad()
def merge_lora(
    module: nn.Module,
    lora: str | Path | Mapping[str, torch.Tensor] | TensorSource,
    *,
    strength: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> LoraMergeReport:
    """Merge `lora` into `module`'s parameters in place (tensors sharing their memory change too),
    one LoRA tensor at a time.

    module: any module whose parameter names are the release's (the DiT, or a container of them);
        parameters must be materialised (not on the meta device).
    lora: a path (safetensors or torch pickle, opened lazily) or a mapping key -> tensor.
    compute_dtype: None = each parameter's own dtype (the reference); else the update is computed and
        added in this dtype and rounded once into the parameter.
    """
    source = open_checkpoint(lora) if isinstance(lora, (str, Path)) else lora
    description = getattr(source, "description", str(lora) if isinstance(lora, (str, Path)) else "mapping")
    params = dict(module.named_parameters())
    updates, skipped, ignored = plan_lora_merge(source, {k: tuple(v.shape) for k, v in params.items()})
    report = LoraMergeReport(source=description, strength=strength, skipped=skipped, ignored=ignored)
    for update in updates:
        param = params[update.param]
        if param.device.type == "meta":
            raise ValueError(
                f"cannot merge a LoRA into {update.param}: it is on the meta device (load weights first)"
            )
        dtype = compute_dtype or param.dtype
        tensors = [source[key].to(device=param.device, dtype=dtype) for key in update.keys]
        if len(tensors) == 2:
            down, up = tensors
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            if param.dim() == 4:
                delta = delta[:, :, None, None]
        else:
            (delta,) = tensors
        if dtype == param.dtype:
            param.add_(strength * delta)
        else:
            param.copy_(param.to(dtype) + strength * delta)
        report.merged.append((update.param, update.how))
    return report


__all__ = ["RELEASE_PREFIX", "LoraMergeReport", "LoraUpdate", "merge_lora", "plan_lora_merge"]

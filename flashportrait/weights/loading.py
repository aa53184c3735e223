"""Strict loading of a `TensorSource` into a module, one tensor at a time, with a readable report.

The module may live on the `meta` device (no memory): every parameter and buffer is replaced by the
checkpoint tensor, converted to the requested dtype and device as it is read. Peak host memory is
therefore the module's final size plus one tensor, never two copies of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from flashportrait.weights.checkpoint import TensorSource, _preview


@dataclass
class LoadReport:
    """What a checkpoint provided compared with what a module expects."""

    target: str
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.source}: {self.loaded} tensors loaded into {self.target}"
        lines = [f"checkpoint {self.source} does not match {self.target}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s): {_preview(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s): {_preview(self.unexpected)}")
        if self.shape_mismatch:
            shown = [f"{k} (checkpoint {list(c)}, model {list(m)})" for k, c, m in self.shape_mismatch]
            lines.append(f"  {len(self.shape_mismatch)} shape mismatch(es): {_preview(shown)}")
        return "\n".join(lines)


class CheckpointMismatchError(RuntimeError):
    """Raised by strict loading; `report` holds the full lists of keys."""

    def __init__(self, report: LoadReport):
        super().__init__(str(report))
        self.report = report


def module_tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of everything `module.state_dict()` would hold, without touching data."""
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def compare_keys(
    expected: dict[str, tuple[int, ...]],
    source: TensorSource,
    *,
    target: str,
    ignore: Callable[[str], bool] | None = None,
    allow_missing: Iterable[str] = (),
) -> LoadReport:
    """Compare a source's keys and shapes with `expected` (name -> shape)."""
    report = LoadReport(target=target, source=source.description)
    allowed_missing = set(allow_missing)
    for key in source:
        if key in expected:
            shape = source.info(key).shape
            if tuple(shape) != tuple(expected[key]):
                report.shape_mismatch.append((key, tuple(shape), tuple(expected[key])))
        elif ignore is not None and ignore(key):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    report.missing = [k for k in expected if k not in source and k not in allowed_missing]
    return report


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")


def load_into(
    module: nn.Module,
    source: TensorSource,
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ignore: Callable[[str], bool] | None = None,
    allow_missing: Iterable[str] = (),
    keep_dtype: Callable[[str], bool] | None = None,
) -> LoadReport:
    """Load `source` into `module` tensor by tensor.

    strict: missing, unexpected (not matched by `ignore`) or mis-shaped keys raise
        `CheckpointMismatchError` before anything is loaded. Non-strict loads what matches and
        returns the report (the caller decides what to tell the user).
    dtype: floating tensors are converted to it (integer buffers keep theirs); None keeps each of the
        module's own dtypes, and `keep_dtype(name)` exempts tensors that must keep the module's dtype
        (float32 islands).
    device: where the loaded tensors live; defaults to the module's current device, or the CPU for a
        module on the meta device.
    """
    expected = module_tensor_shapes(module)
    report = compare_keys(
        expected, source, target=type(module).__name__, ignore=ignore, allow_missing=allow_missing
    )
    if strict and not report.ok:
        raise CheckpointMismatchError(report)
    current = dict(module.state_dict(keep_vars=True))
    bad = {k for k, _, _ in report.shape_mismatch}
    for key in source:
        if key not in expected or key in bad:
            continue
        tensor = source[key]
        like = current[key]
        target_device = (
            device if device is not None else (like.device if like.device.type != "meta" else "cpu")
        )
        keep = dtype is None or (keep_dtype is not None and keep_dtype(key))
        target_dtype = like.dtype if keep else dtype
        if tensor.is_floating_point() and like.is_floating_point():
            tensor = tensor.to(device=target_device, dtype=target_dtype)
        else:
            tensor = tensor.to(device=target_device)
        _set_tensor(module, key, tensor)
        report.loaded += 1
    return report

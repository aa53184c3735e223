"""A golden case: its JSON description and its tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flashportrait.weights import SafetensorsFile, TensorSource, strip_prefix


@dataclass
class GoldenCase:
    """`NAME.json` plus (usually) `NAME.safetensors`; see `golden/README.md` for the layout."""

    path: Path
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> GoldenCase:
        path = Path(path)
        return cls(path=path, meta=json.loads(path.read_text()))

    @property
    def name(self) -> str:
        return str(self.meta.get("case", self.path.stem))

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def call(self) -> dict[str, Any]:
        return self.meta.get("call", {})

    @property
    def tolerance(self) -> dict[str, Any]:
        return self.meta.get("tolerance", {})

    @cached_property
    def tensors(self) -> TensorSource:
        """All tensors of the case (memory-mapped); the file is named by the JSON's `file` entry."""
        name = self.meta.get("file") or f"{self.path.stem}.safetensors"
        return SafetensorsFile(self.path.parent / name)

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def has(self, key: str) -> bool:
        return key in self.tensors

    def group(self, prefix: str) -> TensorSource:
        """The tensors under `prefix` (e.g. `param/`) with the prefix removed."""
        return strip_prefix(self.tensors, prefix)

    def params(self) -> TensorSource:
        """Weights under the real checkpoints' key names."""
        return self.group("param/")

    def sibling(self, file_name: str) -> Path:
        return self.path.parent / file_name

    def rtol_atol(self, output: str | None = None) -> tuple[float, float]:
        """`tolerance.rtol` and the per-output suggested atol when there is one, else `tolerance.atol`."""
        tol = self.tolerance
        rtol = float(tol.get("rtol", 0.0))
        atol = float(tol.get("atol", 0.0))
        per = tol.get("per_output", {})
        if output is not None and isinstance(per, dict) and isinstance(per.get(output), dict):
            atol = float(per[output].get("suggested_atol", atol))
        return rtol, atol

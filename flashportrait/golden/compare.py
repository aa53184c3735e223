"""Numerical comparison of our outputs with golden outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Comparison:
    """One compared output. `max_rel` is max|ours - golden| / max|golden| (0 when golden is all zero)."""

    name: str
    passed: bool
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    detail: str = ""

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        text = (
            f"  {self.name} {verdict} max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}"
            f" (rtol={self.rtol:g} atol={self.atol:g})"
        )
        return text + (f" {self.detail}" if self.detail else "")


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.as_tensor(np.asarray(value))


def compare(name: str, ours, golden, *, rtol: float, atol: float) -> Comparison:
    """allclose(ours, golden, rtol, atol) in float64, with shapes required to be equal."""
    a = _as_tensor(ours)
    e = _as_tensor(golden)
    if tuple(a.shape) != tuple(e.shape):
        return Comparison(
            name,
            False,
            float("inf"),
            float("inf"),
            rtol,
            atol,
            f"shape {list(a.shape)} != golden {list(e.shape)}",
        )
    if a.numel() == 0:
        return Comparison(name, True, 0.0, 0.0, rtol, atol)
    a64 = a.to(torch.float64)
    e64 = e.to(torch.float64)
    if not torch.isfinite(a64).all() and torch.isfinite(e64).all():
        return Comparison(
            name, False, float("nan"), float("nan"), rtol, atol, "non-finite values in our output"
        )
    diff = (a64 - e64).abs()
    finite = torch.isfinite(diff)
    max_abs = float(diff[finite].max()) if finite.any() else 0.0
    scale = float(e64[torch.isfinite(e64)].abs().max()) if torch.isfinite(e64).any() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = bool(torch.allclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True))
    detail = ""
    if not passed:
        bad = ~torch.isclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True)
        detail = f"{int(bad.sum())}/{bad.numel()} elements outside tolerance"
    return Comparison(name, passed, max_abs, max_rel, rtol, atol, detail)


def compare_exact(name: str, ours, golden) -> Comparison:
    """Exact equality for integers, index lists and structures (nested lists/dicts of numbers)."""
    if isinstance(ours, (torch.Tensor, np.ndarray)) or isinstance(golden, (torch.Tensor, np.ndarray)):
        return compare(name, ours, golden, rtol=0.0, atol=0.0)
    if ours == golden:
        return Comparison(name, True, 0.0, 0.0, 0.0, 0.0)
    return Comparison(
        name, False, float("inf"), float("inf"), 0.0, 0.0, f"ours {_short(ours)} != golden {_short(golden)}"
    )


def failure(name: str, message: str) -> Comparison:
    """A check that could not be made (an exception, an unsupported kind) is a failure."""
    return Comparison(name, False, float("nan"), float("nan"), 0.0, 0.0, message)


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

"""What the two VAE kinds share: the config from the case's `neutral` names, and the checks of the
numbers a case only states for the reader (derived factors, the latent normalisation constants)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from flashportrait.config import from_mapping
from flashportrait.golden import Comparison, GoldenCase, compare_exact
from flashportrait.models.wan_vae import LATENTS_MEAN, LATENTS_STD

T = TypeVar("T")


def config_and_stated_checks(
    case: GoldenCase, cls: type[T], derived: tuple[str, ...]
) -> tuple[T, list[Comparison]]:
    """`cls` built from `config.neutral` without the `derived` entries, which are compared with the
    config's own properties instead (checked, not configured), plus the Wan latent mean/std against the
    case's `const/` tensors where it has them."""
    neutral: dict[str, Any] = case.config["neutral"]
    config = from_mapping(cls, {k: v for k, v in neutral.items() if k not in derived})
    results = [
        compare_exact(name, getattr(config, name), int(neutral[name])) for name in derived if name in neutral
    ]
    for name, values in (("latents_mean", LATENTS_MEAN), ("latents_std", LATENTS_STD)):
        if case.has(f"const/{name}"):
            ours = torch.tensor(values, dtype=torch.float32)
            results.append(compare_exact(name, ours, case.tensor(f"const/{name}")))
    return config, results

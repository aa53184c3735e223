"""Guidance passes and their combination, exactly as the reference long pipeline runs them."""

from __future__ import annotations

import pytest
import torch

from flashportrait.sampling.guidance import (
    GuidanceConfig,
    combine_batched,
    combine_guidance,
    guidance_passes,
)


def _passes(config):
    return [(p.name, p.negative_prompt, p.ip_scale) for p in guidance_passes(config)]


def test_fast_default_is_two_passes():
    config = GuidanceConfig()
    assert (config.emo_cfg_scale, config.text_cfg_scale, config.ip_scale) == (4.0, 1.0, 1.0)
    assert _passes(config) == [("posi", False, 1.0), ("no_emo", False, 0.0)]


@pytest.mark.parametrize(
    ("emo", "text", "expected"),
    [
        (4.0, 2.0, [("posi", False, 0.7), ("no_emo", False, 0.0), ("no_cond", True, 0.0)]),
        (1.0, 2.0, [("posi", False, 0.7), ("no_text", True, 0.7)]),
        (0.5, 1.0, [("posi", False, 0.7)]),
        (1.0, 1.0, [("posi", False, 0.7)]),
        (1.0001, 1.0, [("posi", False, 0.7), ("no_emo", False, 0.0)]),
        (4.0, 0.5, [("posi", False, 0.7), ("no_emo", False, 0.0), ("no_cond", True, 0.0)]),
    ],
)
def test_passes_per_configuration(emo, text, expected):
    assert _passes(GuidanceConfig(emo, text, ip_scale=0.7)) == expected


def _predictions(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 5, 3, 3, generator=g) for _ in range(count)]


def test_combination_is_the_reference_expression_bit_for_bit():
    posi, no_emo, no_cond = _predictions(3)
    both = combine_guidance(GuidanceConfig(4.0, 2.5), [posi, no_emo, no_cond])
    assert torch.equal(both, no_cond + 2.5 * (no_emo - no_cond) + 4.0 * (posi - no_emo))
    emo_only = combine_guidance(GuidanceConfig(3.0, 1.0), [posi, no_emo])
    assert torch.equal(emo_only, no_emo + 3.0 * (posi - no_emo))
    text_only = combine_guidance(GuidanceConfig(1.0, 1.5), [posi, no_cond])
    assert torch.equal(text_only, no_cond + 1.5 * (posi - no_cond))
    assert combine_guidance(GuidanceConfig(1.0, 1.0), [posi]) is posi


def test_combination_values():
    ones, twos, threes = (torch.full((1, 16, 1, 1, 1), v) for v in (1.0, 2.0, 3.0))
    # no_cond + text*(no_emo - no_cond) + emo*(posi - no_emo) = 3 + 2*(2 - 3) + 4*(1 - 2) = -3
    assert combine_guidance(GuidanceConfig(4.0, 2.0), [ones, twos, threes]).unique().tolist() == [-3.0]


def test_batched_call_splits_pass_major():
    config = GuidanceConfig(4.0, 2.0)
    predictions = _predictions(3, seed=1)
    batched = torch.cat(predictions, dim=0)
    assert torch.equal(combine_batched(config, batched), combine_guidance(config, predictions))
    with pytest.raises(ValueError, match="passes"):
        combine_batched(config, batched[:5])


def test_wrong_number_of_predictions_and_bad_scales_are_errors():
    with pytest.raises(ValueError, match="2 pass"):
        combine_guidance(GuidanceConfig(), _predictions(3))
    with pytest.raises(ValueError, match="finite"):
        GuidanceConfig(emo_cfg_scale=float("nan"))

"""Golden kind `portrait_encoder`: `PortraitEncoder` (models/portrait_encoder.py) and the split of its
tokens per latent frame (models/emo_split.py), built from the case's `config.neutral`."""

from __future__ import annotations

import torch

from flashportrait.config import from_mapping
from flashportrait.golden import Comparison, GoldenCase, compare, compare_exact, failure
from flashportrait.models.emo_split import plan_emotion_split, split_emotion_tokens
from flashportrait.models.portrait_encoder import (
    PortraitEncoder,
    PortraitEncoderConfig,
    load_portrait_encoder_weights,
)

# Derived quantities the case states for the reader; checked, not configured.
_DERIVED = ("tokens_per_frame",)


def run(case: GoldenCase) -> list[Comparison]:
    neutral = case.config["neutral"]
    cfg = from_mapping(PortraitEncoderConfig, {k: v for k, v in neutral.items() if k not in _DERIVED})
    results: list[Comparison] = []
    if "tokens_per_frame" in neutral:
        expected_tpf = int(neutral["tokens_per_frame"])
        results.append(compare_exact("tokens_per_frame", cfg.tokens_per_frame, expected_tpf))
    with torch.device("meta"):
        model = PortraitEncoder(cfg)
    load_portrait_encoder_weights(model, case.params(), device="cpu")
    features = case.tensor("input/head_emo_feat")
    with torch.no_grad():
        tokens = model.eval()(features)
    rtol, atol = case.rtol_atol("adapter_proj")
    results.append(compare("adapter_proj", tokens, case.tensor("output/adapter_proj"), rtol=rtol, atol=atol))

    _, num_frames, _ = features.shape
    if int(case.call.get("frames", num_frames)) != num_frames:
        results.append(failure("frames", f"call.frames {case.call['frames']} != input frames {num_frames}"))
    plan = plan_emotion_split(tokens.shape[1], num_frames)
    chunks, lens = split_emotion_tokens(tokens, num_frames, plan=plan)
    ranges = torch.tensor(plan.ranges)
    results.append(compare_exact("emo_split_ranges", ranges, case.tensor("output/emo_split_ranges")))
    results.append(compare_exact("emo_context_lens", lens, case.tensor("output/emo_context_lens")))
    index_map = case.tensor("output/emo_split_index_map")
    results.append(compare_exact("emo_split_index_map", plan.index_map(), index_map))
    # The golden stores the split as an index map; rebuild the golden tensor from it and our tokens'
    # golden counterpart to check the gathered values too.
    golden_tokens = case.tensor("output/adapter_proj")
    valid = (index_map >= 0)[None, :, :, None]
    expected = torch.where(valid, golden_tokens[:, index_map.clamp(min=0)], golden_tokens.new_zeros(()))
    results.append(compare("emo_proj", chunks, expected, rtol=rtol, atol=atol))
    return results

"""Golden kind `text_encoder`: the umT5 encoder, its position buckets/bias, masking and trimming."""

from __future__ import annotations

import torch

from flashportrait.config import from_mapping
from flashportrait.golden import Comparison, GoldenCase, compare, compare_exact
from flashportrait.models.t5 import T5EncoderConfig, build_umt5_encoder, trim_to_lengths
from flashportrait.weights import load_into


def run(case: GoldenCase) -> list[Comparison]:
    config = from_mapping(T5EncoderConfig, case.config["neutral"])
    model = build_umt5_encoder(config)
    load_into(model, case.params(), dtype=torch.float32)
    model.eval()
    input_ids = case.tensor("input/input_ids")
    mask = case.tensor("input/attention_mask")
    _, length = input_ids.shape
    results = []
    with torch.no_grad():
        hidden = model(input_ids, mask)
        buckets = model.buckets(length)
        if case.has("output/relative_position_buckets"):
            results.append(
                compare_exact(
                    "relative_position_buckets", buckets, case.tensor("output/relative_position_buckets")
                )
            )
        if case.has("output/pos_bias_block0"):
            rtol, atol = case.rtol_atol("pos_bias_block0")
            bias = model.blocks[0].pos_embedding(buckets)
            results.append(
                compare("pos_bias_block0", bias, case.tensor("output/pos_bias_block0"), rtol=rtol, atol=atol)
            )
    rtol, atol = case.rtol_atol("last_hidden_state")
    results.append(
        compare("last_hidden_state", hidden, case.tensor("output/last_hidden_state"), rtol=rtol, atol=atol)
    )
    lengths = mask.gt(0).sum(dim=1)
    valid_lens = case.call.get("valid_lens")
    if valid_lens is not None:
        results.append(compare_exact("valid_lens", lengths.tolist(), list(valid_lens)))
    for b, trimmed in enumerate(trim_to_lengths(hidden, lengths)):
        key = f"output/context_trimmed_{b}"
        if case.has(key):
            rtol, atol = case.rtol_atol(f"context_trimmed_{b}")
            results.append(compare(f"context_trimmed_{b}", trimmed, case.tensor(key), rtol=rtol, atol=atol))
    return results

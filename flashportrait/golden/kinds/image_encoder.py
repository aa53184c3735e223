"""Golden kind `image_encoder`: the CLIP image tower of the I2V path, loaded from the full state dict."""

from __future__ import annotations

import torch

from flashportrait.golden import Comparison, GoldenCase, compare, failure
from flashportrait.models.clip import CLIPVisionConfig, XLMRobertaTowerSpec, load_clip_vision


def _configs(case: GoldenCase) -> tuple[CLIPVisionConfig, XLMRobertaTowerSpec]:
    neutral = case.config["neutral"]
    ctor = case.config["reference_ctor"]
    vision = CLIPVisionConfig(
        image_size=int(neutral["image_size"]),
        patch_size=int(neutral["patch_size"]),
        hidden_dim=int(neutral["hidden_dim"]),
        mlp_ratio=int(neutral["mlp_ratio"]),
        num_heads=int(neutral["num_heads"]),
        num_layers=int(neutral["num_layers"]),
        layers_applied=int(neutral["layers_applied"]),
        embed_dim=int(ctor["embed_dim"]),
        norm_eps=float(neutral["norm_eps"]),
        pixel_mean=tuple(neutral["pixel_mean"]),
        pixel_std=tuple(neutral["pixel_std"]),
    )
    text = XLMRobertaTowerSpec(
        vocab_size=int(ctor["vocab_size"]),
        max_text_len=int(ctor["max_text_len"]),
        type_size=int(ctor["type_size"]),
        dim=int(ctor["text_dim"]),
        num_layers=int(ctor["text_layers"]),
        out_dim=int(ctor["embed_dim"]),
    )
    return vision, text


def run(case: GoldenCase) -> list[Comparison]:
    neutral = case.config["neutral"]
    if neutral.get("activation", "gelu(erf)") != "gelu(erf)" or not neutral.get("pre_norm", True):
        return [failure("config", f"unsupported CLIP variant: {neutral}")]
    vision, text = _configs(case)
    # the case stores the reference's `model.`-prefixed state dict, text tower included
    model, _ = load_clip_vision(case.params(), vision, text, dtype=torch.float32)
    image = case.tensor("input/image")
    results = []
    with torch.no_grad():
        pixels = model.preprocess([image])
        hidden = model.embed(pixels)
        states = []
        for block in model.transformer:
            hidden = block(hidden)
            states.append(hidden)
        tokens = model.encode([image])
    checks = {"preprocessed": pixels, "tokens": tokens}
    if states:
        checks["after_block0"] = states[0]
    for name, ours in checks.items():
        key = f"output/{name}"
        if case.has(key):
            rtol, atol = case.rtol_atol(name)
            results.append(compare(name, ours, case.tensor(key), rtol=rtol, atol=atol))
    return results

"""Golden kind `motion_encoder`: the PD-FGC FanEncoder at full size, weights upcast to float32."""

from __future__ import annotations

import torch

from flashportrait.golden import Comparison, GoldenCase, compare
from flashportrait.models.motion_encoder import MotionEncoderConfig, load_motion_encoder


def _config(case: GoldenCase) -> MotionEncoderConfig:
    neutral = case.config["neutral"]
    outputs = neutral["outputs"]
    return MotionEncoderConfig(
        input_size=int(neutral["input_hw"]),
        feature_dim=int(outputs["mouth"]),
        pose_dim=int(outputs["headpose"]),
        eye_dim=int(outputs["eye"]),
        emotion_dim=int(outputs["emotion"]),
    )


def run(case: GoldenCase) -> list[Comparison]:
    if case.call.get("mode", "eval") != "eval":
        raise ValueError(f"only eval mode is implemented, the case asks for {case.call['mode']!r}")
    model, _ = load_motion_encoder(case.params(), _config(case))
    crops = case.tensor("input/face_crops")
    with torch.no_grad():
        feature = model.model(crops)
        out = model(crops)
    ours = {
        "headpose_emb": out.headpose,
        "eye_embed": out.eye,
        "emo_embed": out.emotion,
        "mouth_feat": out.mouth,
        "fan_feature": feature,
    }
    results = []
    for name, value in ours.items():
        key = f"output/{name}"
        if case.has(key):
            rtol, atol = case.rtol_atol(name)
            results.append(compare(name, value, case.tensor(key), rtol=rtol, atol=atol))
    return results

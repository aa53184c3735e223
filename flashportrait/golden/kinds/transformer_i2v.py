"""Golden kind `transformer_i2v`: the I2V DiT with FlashPortrait's expression cross-attention.

Driven by the case's JSON: the architecture from `config.reference_ctor`, the variants (seq_len,
ip_scale, whether intermediates were recorded) from `call.variants`. Weights are loaded from the
case's `param/` tensors through the strict loader, so the release key layout is exercised.
Intermediates `output/<variant>.<name>` are captured with forward hooks on our modules, the way the
reference recorded them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from flashportrait.golden.case import GoldenCase
from flashportrait.golden.compare import Comparison, compare, failure
from flashportrait.models.transformer import DiTConfig, WanDiT, build_meta
from flashportrait.weights import load_into


def _hook_target(model: WanDiT, name: str) -> nn.Module | None:
    """Our module whose output is the golden intermediate `name`."""
    fixed = {
        "patch_embedding": model.patch_embedding,
        "time_embedding_e": model.time_embedding,
        "time_projection_e0_flat": model.time_projection,
        "text_embedding": model.text_embedding,
        "img_emb": model.img_emb,
        "head": model.head,
    }
    if name in fixed:
        return fixed[name]
    match = re.fullmatch(r"block(\d+)_(out|cross_attn|self_attn|ffn)", name)
    if match is None or int(match.group(1)) >= len(model.blocks):
        return None
    block = model.blocks[int(match.group(1))]
    return block if match.group(2) == "out" else getattr(block, match.group(2))


def _capture(
    model: WanDiT, names: list[str]
) -> tuple[dict[str, torch.Tensor], Callable[[], None], list[str]]:
    captured: dict[str, torch.Tensor] = {}
    handles, unknown = [], []
    for name in names:
        target = _hook_target(model, name)
        if target is None:
            unknown.append(name)
            continue

        def hook(_module, _inputs, output, name=name):
            captured[name] = output.detach().clone()

        handles.append(target.register_forward_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return captured, remove, unknown


def run(case: GoldenCase) -> list[Comparison]:
    config = DiTConfig.from_reference(case.config["reference_ctor"])
    model = build_meta(config)
    load_into(model, case.params(), strict=True, dtype=torch.float32, device="cpu")
    model.eval()

    batch = int(case.call.get("batch", case.tensor("input/x").shape[0]))
    context = [case.tensor(f"input/context_{i}") for i in range(batch)]
    inputs = dict(
        x=case.tensor("input/x"),
        t=case.tensor("input/t"),
        context=context,
        clip_fea=case.tensor("input/clip_fea"),
        y=case.tensor("input/y"),
        emo_proj=case.tensor("input/emo_proj") if case.has("input/emo_proj") else None,
    )
    comparisons = []
    for variant in case.call["variants"]:
        name = variant["name"]
        prefix = f"output/{name}."
        inter = sorted(k[len(prefix) :] for k in case.tensors if k.startswith(prefix))
        captured, remove, unknown = _capture(model, inter)
        try:
            with torch.no_grad():
                seq_len = variant.get("seq_len")
                out = model(
                    **inputs,
                    ip_scale=float(variant.get("ip_scale", 1.0)),
                    seq_len=None if seq_len is None else int(seq_len),
                )
        finally:
            remove()
        rtol, atol = case.rtol_atol(name)
        comparisons.append(compare(name, out, case.tensor(f"output/{name}"), rtol=rtol, atol=atol))
        for item in inter:
            full = f"{name}.{item}"
            if item in unknown or item not in captured:
                comparisons.append(failure(full, f"no module of ours corresponds to intermediate {item!r}"))
                continue
            rtol, atol = case.rtol_atol(full)
            comparisons.append(
                compare(full, captured[item], case.tensor(f"output/{full}"), rtol=rtol, atol=atol)
            )
    return comparisons

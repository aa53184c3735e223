"""Golden kind `lora_merge`: the step-distillation LoRA merge of `models/lora.py`.

The case holds the base weights of the parameters the LoRA touches (plus ones it must leave alone)
under the DiT's names; they are loaded through `load_into` into a container module with exactly those
names, so the merge resolves every key against the real DiT layout. The LoRA is read from the case's
`lora_file` in the release's on-disk format. Strengths come from `call.apply_step_distill_lora`, the
bf16 variant from `call.bf16_variant`.
"""

from __future__ import annotations

import torch
from torch import nn

from flashportrait.golden import Comparison, GoldenCase, compare, compare_exact
from flashportrait.models.lora import LoraMergeReport, merge_lora
from flashportrait.weights import TensorSource, load_into


class ParameterContainer(nn.Module):
    """A module whose parameters are exactly `shapes` (dotted names become nested sub-modules)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        for name, shape in shapes.items():
            owner: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(
                leaf, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
            )


def parameter_container(params: TensorSource, dtype: torch.dtype) -> ParameterContainer:
    """A `ParameterContainer` holding a private copy of `params` (strictly loaded) in `dtype`."""
    module = ParameterContainer(params.shapes())
    load_into(module, params, strict=True, dtype=dtype, device="cpu")
    # Loaded tensors may share memory with the case's (cached) tensors; the merge works in place.
    for param in module.parameters():
        param.data = param.data.clone()
    return module


def _check_report(prefix: str, report: LoraMergeReport, case: GoldenCase) -> list[Comparison]:
    call = case.call
    results = [
        compare_exact(
            f"{prefix}/changed_parameters", report.merged_parameters, sorted(call["changed_parameters"])
        )
    ]
    # Each entry the reference skips or ignores on purpose must appear in our report, named.
    reported = [key for key, _ in report.skipped] + report.ignored
    for expected in call.get("skipped_or_ignored", []):
        target = expected.split(" ")[0]
        stem = target.split(".lora_")[0]
        found = any(stem in key for key in reported)
        results.append(compare_exact(f"{prefix}/reported {target}", found, True))
    return results


def run(case: GoldenCase) -> list[Comparison]:
    lora_path = case.sibling(case.meta["lora_file"])
    params = case.params()
    results: list[Comparison] = []
    rtol, atol = float(case.tolerance["rtol"]), float(case.tolerance["atol"])
    merge_call = case.call["apply_step_distill_lora"]
    dtype = getattr(torch, merge_call.get("dtype", "float32"))
    for strength in merge_call["strength"]:
        module = parameter_container(params, dtype)
        report = merge_lora(module, lora_path, strength=float(strength))
        results += _check_report(f"s{strength}", report, case)
        results += _compare_params(case, module, f"merged_s{strength}", rtol, atol)

    bf16 = case.call.get("bf16_variant")
    if bf16 is not None:
        strength = float(bf16["strength"])
        module = parameter_container(params, torch.bfloat16)
        report = merge_lora(module, lora_path, strength=strength)  # computed in bf16, as the reference
        results += _check_report(f"bf16_s{strength}", report, case)
        tol = case.tolerance.get("bf16", {})
        results += _compare_params(
            case,
            module,
            f"merged_bf16_s{strength}",
            float(tol.get("rtol", 2**-7)),
            float(tol.get("atol", 0.0)),
        )
    return results


def _compare_params(
    case: GoldenCase, module: nn.Module, group: str, rtol: float, atol: float
) -> list[Comparison]:
    """Merged parameters against `output/<group>/<name>`; every other parameter must be unchanged."""
    outputs = case.group(f"output/{group}/")
    results = []
    for name, param in module.named_parameters():
        if name in outputs:
            results.append(compare(f"{group}/{name}", param, outputs[name], rtol=rtol, atol=atol))
        else:
            base = case.tensor(f"param/{name}").to(param.dtype)
            results.append(compare_exact(f"{group}/{name} unchanged", param, base))
    return results

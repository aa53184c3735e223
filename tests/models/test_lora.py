"""The step-distillation LoRA merge: every key style of the release format, strengths, dtypes, reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flashportrait.models.lora import merge_lora, plan_lora_merge
from flashportrait.weights import save_safetensors


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.modulation = nn.Parameter(torch.randn(1, 6, 5))


class TinyNet(nn.Module):
    """Parameter names shaped like the DiT's: blocks.N.*, a 1x1 Conv2d, a Conv3d patch embedding."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj = nn.Conv2d(5, 3, 1)
        self.patch_embedding = nn.Conv3d(4, 5, (1, 2, 2), stride=(1, 2, 2))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _write(tmp_path, tensors: dict[str, torch.Tensor], dtype=torch.bfloat16):
    path = tmp_path / "lora.safetensors"
    save_safetensors({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path)
    return path


def test_down_up_pairs_with_release_prefix(tmp_path, net):
    before = _snapshot(net)
    down, up = torch.randn(2, 6), torch.randn(5, 2)
    path = _write(
        tmp_path,
        {
            "diffusion_model.blocks.0.q.lora_down.weight": down,
            "diffusion_model.blocks.0.q.lora_up.weight": up,
            "diffusion_model.blocks.0.q.alpha": torch.tensor(8.0),
        },
        dtype=torch.float32,
    )
    report = merge_lora(net, path, strength=0.5)
    torch.testing.assert_close(net.blocks[0].q.weight, before["blocks.0.q.weight"] + 0.5 * (up @ down))
    # alpha is ignored: no alpha/rank scaling
    assert report.ignored == ["diffusion_model.blocks.0.q.alpha"]
    assert report.merged == [("blocks.0.q.weight", "lora_down/up")]
    for name, value in before.items():
        if name != "blocks.0.q.weight":
            assert torch.equal(dict(net.named_parameters())[name], value), name


def test_a_b_pairs_without_prefix(tmp_path, net):
    before = _snapshot(net)
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    path = _write(
        tmp_path, {"blocks.1.q.lora_A.weight": a, "blocks.1.q.lora_B.weight": b}, dtype=torch.float32
    )
    report = merge_lora(net, path)
    torch.testing.assert_close(net.blocks[1].q.weight, before["blocks.1.q.weight"] + b @ a)
    assert report.merged_parameters == ["blocks.1.q.weight"]


def test_diff_diff_b_diff_m(tmp_path, net):
    before = _snapshot(net)
    tensors = {
        "diffusion_model.blocks.0.norm.diff": torch.randn(5),  # -> norm.weight
        "diffusion_model.blocks.0.norm.diff_b": torch.randn(5),  # -> norm.bias
        "diffusion_model.blocks.0.q.diff_b": torch.randn(5),  # -> q.bias
        "diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 5),  # -> blocks.0.modulation
        "diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, 5),  # bare name: no .weight exists
    }
    path = _write(tmp_path, tensors, dtype=torch.float32)
    report = merge_lora(net, path, strength=0.7)
    params = dict(net.named_parameters())
    expected = {
        "blocks.0.norm.weight": "diffusion_model.blocks.0.norm.diff",
        "blocks.0.norm.bias": "diffusion_model.blocks.0.norm.diff_b",
        "blocks.0.q.bias": "diffusion_model.blocks.0.q.diff_b",
        "blocks.0.modulation": "diffusion_model.blocks.0.diff_m",
        "blocks.1.modulation": "diffusion_model.blocks.1.modulation.diff",
    }
    for name, key in expected.items():
        torch.testing.assert_close(params[name], before[name] + 0.7 * tensors[key])
    assert report.merged_parameters == sorted(expected)
    assert report.skipped == []


def test_one_by_one_conv_and_skipped_keys_are_reported(tmp_path, net):
    before = _snapshot(net)
    down, up = torch.randn(2, 5, 1, 1), torch.randn(3, 2, 1, 1)
    tensors = {
        "diffusion_model.proj.lora_down.weight": down,
        "diffusion_model.proj.lora_up.weight": up,
        # 5-D Conv3d target: the reference does not handle it
        "diffusion_model.patch_embedding.lora_down.weight": torch.randn(2, 4, 1, 2, 2),
        "diffusion_model.patch_embedding.lora_up.weight": torch.randn(5, 2, 1, 1, 1),
        # no such parameter
        "diffusion_model.blocks.7.q.lora_down.weight": torch.randn(2, 6),
        "diffusion_model.blocks.7.q.lora_up.weight": torch.randn(5, 2),
        # unpaired half
        "diffusion_model.blocks.0.q.extra.lora_down.weight": torch.randn(2, 6),
        # wrong shape for a diff
        "diffusion_model.blocks.1.q.diff_b": torch.randn(4),
        # not a LoRA key at all
        "diffusion_model.blocks.1.q.scale": torch.randn(1),
    }
    report = merge_lora(net, _write(tmp_path, tensors, dtype=torch.float32))
    expected = before["proj.weight"] + (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    torch.testing.assert_close(net.proj.weight, expected)
    assert report.merged_parameters == ["proj.weight"]
    skipped = " | ".join(f"{k}: {why}" for k, why in report.skipped)
    for needle in (
        "patch_embedding",
        "blocks.7.q",
        "blocks.0.q.extra.lora_down",
        "blocks.1.q.diff_b",
        "q.scale",
    ):
        assert needle in skipped
    assert len(report.skipped) == 5
    assert "5 skipped" in str(report)
    assert torch.equal(net.patch_embedding.weight, before["patch_embedding.weight"])


def test_bf16_merge_rounds_like_the_reference(tmp_path, net):
    net = net.to(torch.bfloat16)
    base = net.blocks[0].q.weight.detach().clone()
    down, up = torch.randn(4, 6).bfloat16(), torch.randn(5, 4).bfloat16()
    path = _write(tmp_path, {"blocks.0.q.lora_down.weight": down, "blocks.0.q.lora_up.weight": up})
    merge_lora(net, path)
    # product rounded to bf16, then the sum rounded to bf16
    assert torch.equal(net.blocks[0].q.weight, base + (up @ down))

    other = TinyNet().to(torch.bfloat16)
    other.blocks[0].q.weight.data.copy_(base)
    merge_lora(other, path, compute_dtype=torch.float32)
    exact = (base.float() + up.float() @ down.float()).bfloat16()
    assert torch.equal(other.blocks[0].q.weight, exact)


def test_negative_strength_undoes_the_merge(tmp_path, net):
    before = _snapshot(net)
    tensors = {
        "blocks.0.q.lora_down.weight": torch.randn(2, 6),
        "blocks.0.q.lora_up.weight": torch.randn(5, 2),
        "blocks.0.diff_m": torch.randn(1, 6, 5),
    }
    path = _write(tmp_path, tensors, dtype=torch.float32)
    merge_lora(net, path, strength=0.8)
    assert not torch.equal(net.blocks[0].q.weight, before["blocks.0.q.weight"])
    merge_lora(net, path, strength=-0.8)
    for name, value in net.named_parameters():
        torch.testing.assert_close(value, before[name], rtol=0, atol=1e-6)


def test_plan_needs_no_tensor_data():
    shapes = {"blocks.0.q.weight": (5, 6), "blocks.0.q.bias": (5,)}
    lora = {
        "blocks.0.q.lora_down.weight": torch.empty(2, 6, device="meta"),
        "blocks.0.q.lora_up.weight": torch.empty(5, 2, device="meta"),
        "blocks.0.q.diff_b": torch.empty(5, device="meta"),
    }
    updates, skipped, ignored = plan_lora_merge(lora, shapes)
    assert [(u.param, u.how) for u in updates] == [
        ("blocks.0.q.weight", "lora_down/up"),
        ("blocks.0.q.bias", "diff_b"),
    ]
    assert skipped == [] and ignored == []


def test_golden_lora_file_merges_into_the_dit_names(golden_dir):
    from flashportrait.golden import GoldenCase
    from flashportrait.golden.kinds.lora_merge import parameter_container

    case = GoldenCase.load(golden_dir / "lora_merge_tiny.json")
    module = parameter_container(case.params(), torch.float32)
    report = merge_lora(module, case.sibling(case.meta["lora_file"]), strength=0.7)
    assert report.merged_parameters == sorted(case.call["changed_parameters"])
    for name, value in module.named_parameters():
        key = f"output/merged_s0.7/{name}"
        if case.has(key):
            torch.testing.assert_close(value, case.tensor(key), rtol=1e-6, atol=2e-6)

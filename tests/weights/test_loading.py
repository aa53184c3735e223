"""Strict tensor-by-tensor loading into (meta-device) modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flashportrait.weights import CheckpointMismatchError, InMemorySource, load_into, module_tensor_shapes


def make(device="cpu") -> nn.Module:
    with torch.device(device):
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.tensor(5))
        for k, v in make().state_dict().items()
    }


def test_meta_module_is_filled_in_the_requested_dtype():
    module = make("meta")
    tensors = state()
    report = load_into(module, InMemorySource(tensors), dtype=torch.bfloat16, device="cpu")
    assert report.ok and report.loaded == len(tensors)
    assert module[0].weight.device.type == "cpu" and module[0].weight.dtype == torch.bfloat16
    assert torch.equal(module[0].weight, tensors["0.weight"].bfloat16())
    assert module[1].num_batches_tracked.dtype == torch.int64  # integer buffers keep their dtype
    assert not module[0].weight.requires_grad


def test_keep_dtype_exempts_float32_islands():
    module = make("meta")
    load_into(module, InMemorySource(state()), dtype=torch.bfloat16, keep_dtype=lambda k: k.startswith("1."))
    assert module[0].weight.dtype == torch.bfloat16 and module[1].weight.dtype == torch.float32


def test_strict_errors_name_every_key_and_load_nothing():
    module = make()
    before = module[0].weight.clone()
    tensors = state()
    del tensors["0.bias"]
    tensors["0.weight"] = torch.zeros(4, 2)
    tensors["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(module, InMemorySource(tensors, description="ckpt.pt"))
    text = str(info.value)
    assert "ckpt.pt" in text and "missing key(s): 0.bias" in text and "unexpected key(s): 2.weight" in text
    assert "0.weight (checkpoint [4, 2], model [4, 3])" in text
    assert info.value.report.missing == ["0.bias"]
    assert torch.equal(module[0].weight, before)


def test_non_strict_loads_what_matches_and_reports_the_rest():
    module = make()
    tensors = state()
    del tensors["1.running_var"]
    tensors["extra"] = torch.zeros(1)
    report = load_into(module, InMemorySource(tensors), strict=False, ignore=lambda k: k == "extra")
    assert report.missing == ["1.running_var"] and report.ignored == ["extra"] and not report.unexpected
    assert torch.equal(module[0].weight, tensors["0.weight"])


def test_module_tensor_shapes_needs_no_memory():
    shapes = module_tensor_shapes(make("meta"))
    assert shapes["0.weight"] == (4, 3) and shapes["1.num_batches_tracked"] == ()

"""Memory modes on a CUDA device (skipped without one): the block streamer's asynchronous copies on
its own stream give the resident result bit for bit, with at most two blocks' weights allocated."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flashportrait.memory import BlockStreamer, OnDemand
from flashportrait.models.dit_loading import random_dit
from flashportrait.sampling.random_models import SamplerSizes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _inputs(dit, device, frames: int = 4, size: int = 16, batch: int = 2):
    cfg = dit.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        x=torch.randn(1, 16, frames, size, size, generator=g),
        t=torch.tensor([700.0]),
        context=torch.randn(batch, 7, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, frames, size, size, generator=g),
        emo_proj=torch.randn(1, frames, 5, cfg.emo_dim, generator=g),
    )
    out = {k: v.to(device) for k, v in inputs.items()}
    for name in ("x", "y", "clip_fea", "emo_proj", "t"):
        out[name] = out[name].expand(batch, *out[name].shape[1:])
    out["ip_scale"] = torch.tensor([1.0, 0.0], device=device)
    return out


@pytest.mark.parametrize("fp8", [False, True])
def test_streamed_blocks_on_cuda_equal_resident(fp8):
    device = torch.device("cuda")
    config = dataclasses.replace(SamplerSizes.tiny(width=64).dit, num_layers=8, num_heads=4)
    dit = random_dit(config, seed=1, dtype=torch.bfloat16, device=device)
    if fp8:
        dit.convert_to_fp8()
    inputs = _inputs(dit, device)
    with torch.no_grad():
        expected = dit(**inputs)
    streamer = BlockStreamer(dit.blocks, device)
    block = streamer.block_bytes[0]
    peaks = []
    for b in dit.blocks:
        b.register_forward_pre_hook(lambda *_: peaks.append(streamer.device_bytes()))
    with torch.no_grad():
        first = dit(**inputs)
        second = dit(**inputs)
    torch.cuda.synchronize()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert block < max(peaks) <= 2 * block
    assert streamer.resident_blocks() == [0]


def test_on_demand_frees_cuda_memory_between_calls():
    device = torch.device("cuda")
    tower = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024)).to(
        device
    )
    x = torch.randn(8, 1024, device=device)
    with torch.no_grad():
        expected = tower(x)
    wrapper = OnDemand(tower, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        out = tower(x)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert torch.cuda.memory_allocated(device) - before < wrapper.nbytes // 4  # weights freed again
    assert wrapper.hosted.groups[0].host.is_pinned()

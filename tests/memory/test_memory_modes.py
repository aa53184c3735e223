"""Memory modes on the tiny models on the CPU: same results as `resident`, and the offloaded weights
really leave the "device" (the CPU stands in for it: a released weight's storage holds 0 bytes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flashportrait.config import ConfigError
from flashportrait.memory import (
    MEMORY_MODES,
    BlockStreamer,
    HostedTensors,
    MemoryMode,
    OnDemand,
    apply_memory_mode,
)
from flashportrait.memory.blockwise import derived_bytes
from flashportrait.models.dit_loading import random_dit
from flashportrait.models.fp8_linear import FP8Linear
from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler
from flashportrait.sampling.sampler import GenerationRequest
from flashportrait.sampling.wavefront import FinalLatents

TEXT_DIM = 16
# 6 latent frames in windows of 5 overlapping by 2 (two windows), 2 Euler steps.
PARAMS = GenerationParams(max_size=32, context_size=5, context_overlap=2, scheduler="euler", steps=2, seed=3)
# fp8 e4m3 keeps 3 mantissa bits: one layer's output carries about 4% relative L2 error (fp8_linear.py).
# The tiny model has 28 fp8 layers in 2 blocks, and their errors add up through the residual stream,
# 2 Euler steps and the guidance combination: the final latents move by 5.6% (measured). A broken fp8
# path (a lost weight scale, a dropped layer) moves them by O(1).
FP8_LATENT_RTOL = 0.1


def _request(frames: int = 21) -> GenerationRequest:
    rng = np.random.default_rng(0)
    return GenerationRequest(
        image=rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8),
        features=rng.standard_normal((frames, 554)).astype(np.float32),
        prompt_embeds=torch.from_numpy(rng.standard_normal((6, TEXT_DIM)).astype(np.float32)),
        params=PARAMS,
    )


def _run(mode: str) -> torch.Tensor:
    """Final latents [1, 16, F, h, w] float32 of a fresh tiny sampler (the same weights every time) in
    `mode`: they depend on every model the modes move (VAE encoder and CLIP through the conditioning,
    the portrait encoder, the DiT); the decoder is resident in every mode."""
    sampler = random_sampler(SamplerSizes.tiny(), seed=1)
    state = apply_memory_mode(sampler, mode, "cpu")
    prepared = sampler.prepare(_request())
    latents = torch.cat([e.latents for e in sampler.denoise(prepared) if isinstance(e, FinalLatents)], dim=2)
    if MemoryMode.parse(mode).offloads:
        assert state.host_bytes() > 0 and state.offloaded_device_bytes() < state.host_bytes()
    return latents


@pytest.fixture(scope="module")
def resident() -> torch.Tensor:
    return _run("resident")


@pytest.fixture(scope="module")
def fp8() -> torch.Tensor:
    return _run("fp8")


def test_mode_names():
    assert len(MEMORY_MODES) == 8 and MEMORY_MODES[0] == "resident"
    for name in MEMORY_MODES:
        assert MemoryMode.parse(name).name == name
    assert MemoryMode.parse("Blockwise+FP8") == MemoryMode(fp8=True, blockwise=True)
    assert MemoryMode.parse("blockwise+fp8").name == "fp8+blockwise"
    for bad in ("", "gpu", "fp8+fp8", "resident+fp8", "fp8+"):
        with pytest.raises(ConfigError, match="memory mode"):
            MemoryMode.parse(bad)


@pytest.mark.parametrize("mode", [m for m in MEMORY_MODES if m != "resident" and "fp8" not in m])
def test_offloading_modes_are_bit_identical_to_resident(mode, resident):
    assert torch.equal(_run(mode), resident)


def test_fp8_is_within_its_error_budget(resident, fp8):
    error = float((fp8 - resident).norm() / resident.norm())
    assert 1e-3 < error < FP8_LATENT_RTOL  # it is fp8 (not the float32 path) and within budget


@pytest.mark.parametrize("mode", [m for m in MEMORY_MODES if m.startswith("fp8+")])
def test_fp8_combinations_are_bit_identical_to_fp8(mode, fp8):
    assert torch.equal(_run(mode), fp8)


def _dit_inputs(dit, frames: int = 3, height: int = 4, width: int = 4, batch: int = 2):
    cfg = dit.config
    g = torch.Generator().manual_seed(5)
    return dict(
        x=torch.randn(1, 16, frames, height, width, generator=g).expand(batch, -1, -1, -1, -1),
        t=torch.tensor([700.0]).expand(batch),
        context=torch.randn(batch, 7, cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g).expand(batch, -1, -1),
        y=torch.randn(1, 20, frames, height, width, generator=g).expand(batch, -1, -1, -1, -1),
        emo_proj=torch.randn(batch, frames, 5, cfg.emo_dim, generator=g),
        ip_scale=torch.tensor([1.0, 0.0]),
    )


@pytest.mark.parametrize("fast", [False, True])
def test_blockwise_holds_at_most_two_blocks(fast):
    """Six blocks streamed: at every block boundary and inside every self-attention at most two
    blocks' weights (plus one block's fused q/k/v copy on the fast path) hold device bytes, every
    block was loaded, and the output is the resident one bit for bit."""
    config = dataclasses.replace(SamplerSizes.tiny().dit, num_layers=6)
    dit = random_dit(config, seed=2)
    dit.fast_path = fast
    inputs = _dit_inputs(dit)
    with torch.no_grad():
        expected = dit(**inputs)
    # Unique storages: after a fast call q/k/v are views of one fused weight.
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in dit.blocks[0].parameters()
    }
    block_bytes = sum(storages.values())
    streamer = BlockStreamer(dit.blocks, "cpu")
    assert streamer.block_bytes == [block_bytes] * 6 and streamer.device_bytes() == 0
    samples: list[int] = []
    seen: set[int] = set()

    def measure(*_):
        samples.append(streamer.device_bytes())
        seen.update(streamer.resident_blocks())

    for block in dit.blocks:  # registered after the streamer's hooks: they see its loads
        block.register_forward_pre_hook(measure)
        block.self_attn.register_forward_hook(measure)
    with torch.no_grad():
        out = dit(**inputs)
        again = dit(**inputs)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert seen == set(range(6))
    fused = 3 * config.dim * config.dim * 4 + 3 * config.dim * 4 if fast else 0  # q/k/v weight + bias
    assert max(samples) <= 2 * block_bytes + fused
    assert max(samples) > block_bytes  # the next block really is prefetched
    # After a call only block 0 is resident (prefetched for the next call), no derived cache kept.
    assert streamer.resident_blocks() == [0]
    assert all(derived_bytes(b) == 0 for b in dit.blocks)


def test_blockwise_without_prefetch_holds_one_block():
    dit = random_dit(dataclasses.replace(SamplerSizes.tiny().dit, num_layers=3), seed=2)
    inputs = _dit_inputs(dit)
    with torch.no_grad():
        expected = dit(**inputs)
    streamer = BlockStreamer(dit.blocks, "cpu", prefetch=False)
    samples = []
    for block in dit.blocks:
        block.register_forward_pre_hook(lambda *_: samples.append(streamer.resident_blocks()))
    with torch.no_grad():
        assert torch.equal(dit(**inputs), expected)
    assert samples == [[0], [1], [2]] and streamer.device_bytes() == 0
    streamer.close()  # resident again, hooks gone
    assert streamer.resident_blocks() == [0, 1, 2]
    with torch.no_grad():
        assert torch.equal(dit(**inputs), expected)


def test_fp8_blockwise_streams_fp8_weights():
    dit = random_dit(SamplerSizes.tiny().dit, seed=2)
    bf16_bytes = sum(p.untyped_storage().nbytes() for p in dit.blocks[0].parameters())
    state = apply_memory_mode(type("Target", (), {"dit": dit})(), "fp8+blockwise", "cpu")
    # Per block: self-attention q, k, v, o; cross-attention q, k, v, o, k_img, v_img, emo_k, emo_v; FFN 2.
    assert state.fp8_layers == 2 * 14
    assert all(isinstance(m, FP8Linear) for m in (dit.blocks[1].self_attn.q, dit.blocks[1].ffn[2]))
    assert state.streamer is not None and state.streamer.block_bytes[0] < bf16_bytes / 2


class _Tower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.full((8,), 2.0))
        self.register_buffer("offset", torch.arange(8.0))
        self.inside: list[int] = []

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        if fail:
            raise ValueError("bad input")
        return self.inner(x) * self.scale + self.offset

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) + self(x)


def test_on_demand_loads_only_while_an_entry_point_runs():
    tower = _Tower()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = tower.encode(x)
    wrapper = OnDemand(tower, "cpu", methods=("forward", "encode"))
    assert wrapper.device_bytes() == 0 and wrapper.nbytes == (64 + 8 + 8 + 8) * 4
    seen = []
    tower.inner.register_forward_hook(lambda *_: seen.append(wrapper.device_bytes()))
    with torch.no_grad():
        assert torch.equal(tower.encode(x), expected)
    assert seen == [wrapper.nbytes] * 2 and wrapper.device_bytes() == 0
    assert wrapper.calls == 1  # encode's two forwards nest inside one load
    assert tower.inner.weight.shape == (8, 8)  # shapes and dtypes stay readable while released
    with pytest.raises(ValueError, match="bad input"):
        tower(x, fail=True)
    assert wrapper.device_bytes() == 0  # released after the error too
    wrapper.close()
    assert wrapper.device_bytes() == wrapper.nbytes
    assert torch.equal(tower.encode(x), expected) and wrapper.calls == 2


def test_components_mode_offloads_vae_encoder_and_clip_between_uses():
    sampler = random_sampler(SamplerSizes.tiny(), seed=1, mode="quality")
    state = apply_memory_mode(sampler, "components", "cpu")
    labels = {w.label: w for w in state.on_demand}
    assert set(labels) == {"clip", "vae_encoder"}
    during: dict[str, int] = {}

    def record(name: str, label: str):
        def hook(*_) -> None:  # returns None: the module's output is kept
            during.setdefault(name, labels[label].device_bytes())

        return hook

    sampler.vae.encoder.register_forward_hook(record("vae", "vae_encoder"))
    sampler.clip.transformer[0].register_forward_hook(record("clip", "clip"))
    decoder_bytes = sum(p.untyped_storage().nbytes() for p in sampler.vae.decoder.parameters())
    sampler.prepare(_request())
    assert during == {"vae": labels["vae_encoder"].nbytes, "clip": labels["clip"].nbytes}
    assert state.offloaded_device_bytes() == 0
    # The decoder half of the Wan VAE (quality mode's decoder) stays resident.
    assert decoder_bytes > 0 and all(p.untyped_storage().nbytes() for p in sampler.vae.decoder.parameters())


def test_hosted_tensors_rebind_unresizable_storages_and_keep_sharing():
    """A weight over memory that cannot be resized (a memory-mapped file, here a Python buffer) gets
    a new storage (tensor object replaced in its slot); tied weights stay one storage."""
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    raw = bytearray(first.weight.detach().numpy().tobytes())
    tied = torch.nn.Parameter(torch.frombuffer(raw, dtype=torch.float32).view(4, 4), requires_grad=False)
    first.weight = second.weight = tied
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = second(first(x))
    hosted = HostedTensors([first, second], "cpu")
    assert len(hosted.groups) == 3 and hosted.nbytes == (16 + 4 + 4) * 4
    assert first.weight.untyped_storage().resizable() and hosted.device_bytes() == 0
    assert first.weight is second.weight and first.weight is not tied
    hosted.load()
    with torch.no_grad():
        assert torch.equal(second(first(x)), expected)
    hosted.release()
    assert hosted.device_bytes() == 0

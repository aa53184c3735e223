"""What the two gloo processes of `test_sequence_parallel.py` run (a module of its own: the spawned
processes import it by name). Every rank reports its outputs; the test compares them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashportrait.models.dit_loading import random_dit
from flashportrait.models.transformer import DiTConfig
from flashportrait.parallel.driver import CallBroadcaster, serve_calls
from flashportrait.parallel.ulysses import SequenceParallel
from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler
from flashportrait.sampling.sampler import GenerationRequest
from flashportrait.sampling.wavefront import FinalLatents

# 4 heads (2 per rank), 5 latent frames of 2x3 tokens: shards of 2 and 3 frames (12 and 18 tokens).
DIT = DiTConfig(dim=32, ffn_dim=64, num_heads=4, num_layers=2, in_dim=36, out_dim=16, freq_dim=32,
                text_len=16, text_dim=16, clip_dim=32, emo_dim=32, clip_tokens=5)  # fmt: skip
FRAMES, HEIGHT, WIDTH = 5, 4, 6
# seq_len 32: groups of 32 // 5 = 6 tokens and 2 padding tokens, fewer than the last rank's 3 groups
# (sharded); 33 has 3 padding tokens, as many as its groups (run unsharded).
SEQ_LENS = {"exact": None, "padded": 32, "padded_fallback": 33}
PARAMS = GenerationParams(max_size=32, context_size=5, context_overlap=2, scheduler="euler", steps=2, seed=3)


def dit_inputs(batch: int = 2, emo: bool = True) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    shape = (FRAMES, HEIGHT, WIDTH)
    return dict(
        x=torch.randn(1, 16, *shape, generator=g).expand(batch, -1, -1, -1, -1),
        t=torch.tensor([500.0]).expand(batch),
        context=torch.randn(batch, 7, DIT.text_dim, generator=g),
        clip_fea=torch.randn(1, DIT.clip_tokens, DIT.clip_dim, generator=g).expand(batch, -1, -1),
        y=torch.randn(1, 20, *shape, generator=g).expand(batch, -1, -1, -1, -1),
        emo_proj=torch.randn(1, FRAMES, 3, DIT.emo_dim, generator=g).expand(batch, -1, -1, -1)
        if emo
        else None,
        ip_scale=torch.tensor([1.0, 0.5]),
    )


def request() -> GenerationRequest:
    rng = np.random.default_rng(0)
    return GenerationRequest(
        image=rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8),
        features=rng.standard_normal((21, 554)).astype(np.float32),
        prompt_embeds=torch.from_numpy(rng.standard_normal((6, 16)).astype(np.float32)),
        params=PARAMS,
    )


def final_latents(sampler) -> torch.Tensor:
    events = sampler.denoise(sampler.prepare(request()))
    return torch.cat([e.latents for e in events if isinstance(e, FinalLatents)], dim=2)


@torch.no_grad()
def run(rank: int, world: int, folder: str) -> None:
    """DiT calls single-process and sharded (reference and fast path, with and without seq_len
    padding and expression tokens), then the tiny sampler driven by rank 0 with rank 1 following.
    Results go to `folder`/rank<r>.pt (a queue would block: the launcher joins before anyone reads)."""
    out: dict[str, Any] = {}
    dit = random_dit(DIT, seed=3)
    for fast in (False, True):
        dit.fast_path = fast
        cases = [(name, seq_len, True) for name, seq_len in SEQ_LENS.items()] + [("no_emo", None, False)]
        for name, seq_len, emo in cases:
            inputs = dit_inputs(emo=emo)
            single = dit(**inputs, seq_len=seq_len)
            parallel = SequenceParallel(dit)
            sharded = dit(**inputs, seq_len=seq_len)
            parallel.remove()
            out[(name, fast)] = (single, sharded, parallel.fallbacks)
    sampler = random_sampler(SamplerSizes.tiny(), seed=1)
    parallel = SequenceParallel(sampler.dit)
    if rank == 0:
        parallel.remove()
        single = final_latents(sampler)
        parallel = SequenceParallel(sampler.dit)
        broadcaster = CallBroadcaster(sampler.dit)
        sharded = final_latents(sampler)
        broadcaster.stop()
        out["sampler"] = (single, sharded, parallel.fallbacks, broadcaster.calls)
    else:
        out["served"] = serve_calls(sampler.dit)
    torch.save(out, Path(folder) / f"rank{rank}.pt")


@torch.no_grad()
def run_cuda(rank: int, world: int, folder: str) -> None:
    """`run` on one GPU per rank (NCCL), bf16 as served: the DiT's fast path and the driven sampler."""
    device = torch.device("cuda", rank)
    out: dict[str, Any] = {}
    dit = random_dit(DIT, seed=3, dtype=torch.bfloat16, device=device)
    for name, seq_len in SEQ_LENS.items():
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dit_inputs().items()}
        single = dit(**inputs, seq_len=seq_len)
        parallel = SequenceParallel(dit)
        sharded = dit(**inputs, seq_len=seq_len)
        parallel.remove()
        out[name] = (single.float().cpu(), sharded.float().cpu(), parallel.fallbacks)
    sampler = random_sampler(SamplerSizes.tiny(), seed=1, device=device, dtype=torch.bfloat16)
    if rank == 0:
        single = final_latents(sampler)
        parallel = SequenceParallel(sampler.dit)
        broadcaster = CallBroadcaster(sampler.dit)
        sharded = final_latents(sampler)
        broadcaster.stop()
        out["sampler"] = (single.cpu(), sharded.cpu(), parallel.fallbacks, broadcaster.calls)
    else:
        SequenceParallel(sampler.dit)
        out["served"] = serve_calls(sampler.dit)
    torch.save(out, Path(folder) / f"rank{rank}.pt")

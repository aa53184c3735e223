"""DiT forward at 512x512 on 1, 2 and 4 GPUs with sequence parallelism: speed-up and output equality.

One process per GPU (`flashportrait.parallel.launch.spawn`, NCCL, NVLink multicast off). Every rank
builds the full-size DiT (Wan2.1-I2V-14B + expression branch, bf16) directly on its GPU with random
weights, then rank 0's weights are broadcast so every copy is bit-identical. The call is the
sampler's window-step call: both guidance passes batched (ip_scale 1 and 0; x, y, t, CLIP and
expression tokens shared rows), 21 or 51 latent frames at 512x512 (21,504 or 52,224 tokens per pass).

- 1 GPU: rank 0 alone, the plain forward (the reference output and time);
- n GPUs: ranks 0..n-1 in a process group, `ulysses.SequenceParallel` (tokens split on latent-frame
  boundaries, all-to-all over heads around self-attention); the other ranks wait.

Columns: median seconds of one forward (after one warm-up), the speed-up over 1 GPU, rank 0's peak
GPU memory, and the difference of rank 0's (gathered, full) output from the 1-GPU output: relative L2
and max abs. Yardstick for "within bf16 tolerance": the same 1-GPU forward with another attention
kernel (SDPA's memory-efficient one) differs from the default by the `1 GPU, other attention kernel`
row; a row is ok when its error is below max(2e-2, 2 x that).

    python3 bench/sequence_parallel.py --gpus 1,2,4 --frames 21,51   # nvidia-h200-x4, ~6 min
    python3 bench/sequence_parallel.py --gpus 1,2 --frames 21,51     # nvidia-h200-x2
    python3 bench/sequence_parallel.py --tiny --device cpu --gpus 1,2,4   # CPU smoke test (gloo)

Needs torch and this repository only (run from the repository root). Exit status 0 when every row is ok.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from flashportrait.models.attention import set_default_backend
from flashportrait.models.dit_loading import random_dit
from flashportrait.models.transformer import DiTConfig
from flashportrait.parallel.launch import spawn
from flashportrait.parallel.ulysses import SequenceParallel
from flashportrait.sampling.random_models import SamplerSizes

GIB = 2**30
EMO_TOKENS = 97  # expression tokens per latent frame in FlashPortrait


def config(tiny: bool) -> DiTConfig:
    if tiny:  # 4 heads: splits over 1, 2 and 4 ranks
        return dataclasses.replace(SamplerSizes.tiny(width=64).dit, num_heads=4)
    return DiTConfig.wan_i2v_14b()


def inputs(cfg: DiTConfig, frames: int, latent: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The sampler's batched call for 2 guidance passes; the same values on every rank (CPU generator)."""
    g = torch.Generator().manual_seed(frames)
    shared = {
        "x": torch.randn(1, 16, frames, latent, latent, generator=g),
        "y": torch.randn(1, 20, frames, latent, latent, generator=g),
        "clip_fea": torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g),
        "emo_proj": torch.randn(1, frames, EMO_TOKENS, cfg.emo_dim, generator=g),
        "t": torch.tensor([875.0]),
    }
    out = {k: v.to(device).expand(2, *v.shape[1:]) for k, v in shared.items()}
    out["clip_fea"] = out["clip_fea"].to(dtype)
    out["context"] = torch.randn(1, 24, cfg.text_dim, generator=g).expand(2, -1, -1).contiguous().to(device)
    out["ip_scale"] = torch.tensor([1.0, 0.0], device=device)
    out["seq_len"] = frames * (latent // 2) ** 2
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(dit, call: dict, repeats: int, group: Any, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` forwards after one warm-up, and the output."""
    out = dit(**call)
    times = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group=group)
        sync(device)
        start = time.perf_counter()
        out = dit(**call)
        sync(device)
        times.append(time.perf_counter() - start)
    return (statistics.median(times) if times else float("nan")), out.float()


def errors(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = out - reference
    return float(diff.norm() / reference.norm()), float(diff.abs().max())


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / GIB:.1f}" if device.type == "cuda" else "n/a"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def worker(rank: int, world: int, args: argparse.Namespace, status: Any) -> None:
    cuda = args.device != "cpu"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = config(args.tiny)
    started = time.perf_counter()
    dit = random_dit(cfg, seed=0, dtype=dtype, device=device)
    with torch.no_grad():  # rank 0's weights everywhere, bit for bit
        for tensor in [*dit.parameters(), *dit.buffers()]:
            dist.broadcast(tensor.data, src=0)
    sync(device)
    gpus = sorted({int(g) for g in args.gpus.split(",")})
    groups = {n: dist.new_group(list(range(n))) for n in gpus if n > 1}  # every rank, same order
    latent = 8 if args.tiny else 64
    frame_counts = (
        [int(f) for f in args.frames.split(",")] if args.frames else ([5] if args.tiny else [21, 51])
    )
    ok = True
    if rank == 0:
        print(f"# command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
        name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
        params = sum(p.numel() for p in dit.parameters()) / 1e9
        built = time.perf_counter() - started
        print(f"# torch {torch.__version__}, {world} x {name}, {str(dtype).removeprefix('torch.')}; DiT "
              f"{params:.2f}B parameters built and broadcast in {built:.0f} s", flush=True)  # fmt: skip
        print()
        row("latent frames", "tokens per pass", "GPUs", "median s", "speed-up", "peak GiB (rank 0)",
            "rel L2 vs 1 GPU", "max abs vs 1 GPU", "ok")  # fmt: skip
        row(*["---"] * 9)
    for frames in frame_counts:
        call = inputs(cfg, frames, latent, device, dtype)
        tokens = call["seq_len"]
        reference, single, tolerance = None, None, 2e-2
        if rank == 0:
            reset_peak(device)
            single, reference = timed(dit, call, args.repeats, None, device)
            row(frames, f"{tokens:,}", 1, f"{single:.3f}", "1.00x", peak_gib(device), "0", "0", "yes")
            if cuda:
                set_default_backend("sdpa_efficient")
                _, other = timed(dit, call, 0, None, device)
                set_default_backend(None)
                rel, worst = errors(other, reference)
                tolerance = max(tolerance, 2 * rel)
                row(frames, f"{tokens:,}", "1, other attention kernel", "-", "-", "-", f"{rel:.2e}",
                    f"{worst:.2e}", "reference")  # fmt: skip
        dist.barrier()
        for n in gpus:
            if n == 1:
                continue
            if rank < n:
                parallel = SequenceParallel(dit, groups[n])
                reset_peak(device)
                seconds, out = timed(dit, call, args.repeats, groups[n], device)
                parallel.remove()
                if rank == 0:
                    rel, worst = errors(out, reference)
                    good = rel <= tolerance and parallel.fallbacks == 0
                    ok = ok and good
                    row(frames, f"{tokens:,}", n, f"{seconds:.3f}", f"{single / seconds:.2f}x",
                        peak_gib(device), f"{rel:.2e}", f"{worst:.2e}", "yes" if good else "NO")  # fmt: skip
            dist.barrier()
    if rank == 0:
        status.put(0 if ok else 1)


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4", help="group sizes to measure (the largest = processes)")
    parser.add_argument("--frames", default="", help="latent frames per window (default 21,51; tiny: 5)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards after one warm-up")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL, one GPU per process) or cpu (gloo)")
    parser.add_argument("--tiny", action="store_true", help="a tiny DiT at 64x64 (CPU smoke test)")
    args = parser.parse_args(argv)
    world = max(int(g) for g in args.gpus.split(","))
    status = mp.get_context("spawn").SimpleQueue()
    spawn(worker, world, args, status, backend="gloo" if args.device == "cpu" else "nccl")
    return int(status.get()) if not status.empty() else 1


if __name__ == "__main__":
    sys.exit(main())

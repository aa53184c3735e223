"""Benchmark of the streaming sampler at full size with random weights, bf16 on the GPU.

- one window-step at 512x512: the batched DiT call over the fast default's 2 guidance passes
  (51 latent frames, 2 x 52,224 tokens) plus the guidance combination, CUDA-synchronised;
- time to first frame of a 297-frame and a 3,000-frame request in fast mode (StepDistill, 4 steps,
  tiny VAE decoder): from `Sampler.generate` until the first `VideoChunk` is on the host, which covers
  validation, the first-frame condition (Wan VAE encode of 201 frames, CLIP), the window-steps before
  the first final latents (the wavefront runs only those) and the first decode; with the window-steps
  run before it and the peak GPU memory.

Every model is built directly on the device with random weights (`flashportrait.sampling.random_models`:
the DiT through `random_dit`), so the 14B DiT never exists on the host. Features, image and text
embeddings are random. Rows are printed as they finish.

    python3 bench/sampler.py                                   # H200: everything (about 8 minutes)
    python3 bench/sampler.py --frames 297                      # the window-step and the short request
    python3 bench/sampler.py --skip-step --frames 3000         # the long request alone
    python3 bench/sampler.py --tiny --device cpu               # CPU smoke test: tiny models, 32x32

Needs torch, numpy and pillow and this repository only (run from the repository root).
Exit status 0 when every measurement finished with finite outputs.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler
from flashportrait.sampling.sampler import (
    GenerationProgress,
    GenerationRequest,
    Sampler,
    VideoChunk,
    WindowDenoiser,
)

GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def make_request(sampler: Sampler, frames: int, size: int, seed: int) -> GenerationRequest:
    rng = np.random.default_rng(seed)
    text_dim = sampler.dit.config.text_dim
    return GenerationRequest(
        image=rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8),
        features=rng.standard_normal((frames, sampler.portrait_encoder.cfg.feature_dim), dtype=np.float32),
        prompt_embeds=torch.from_numpy(rng.standard_normal((12, text_dim), dtype=np.float32)),
        params=GenerationParams(max_size=size, seed=seed),
        request_id=f"bench-{frames}",
    )


def time_window_step(sampler: Sampler, size: int, repeats: int) -> dict[str, float | bool]:
    """The DiT call of one (window, step) with every guidance pass batched, and the combination."""
    device = sampler.device
    prepared = sampler.prepare(make_request(sampler, 4 * 50 + 1, size, seed=0))
    denoiser = WindowDenoiser(sampler, prepared)
    h, w = prepared.conditioning.latent_size
    x = torch.randn(1, 16, prepared.plan.context_size, h, w, device=device)
    denoiser(0, 1, x)  # warm-up (also computes the window's expression tokens)
    sync(device)
    reset_peak(device)
    times, finite = [], True
    for _ in range(repeats):
        start = time.perf_counter()
        out = denoiser(0, 1, x)
        sync(device)
        times.append(time.perf_counter() - start)
        finite = finite and bool(torch.isfinite(out).all())
    tokens = prepared.plan.context_size * (h // 2) * (w // 2)
    return {"seconds": statistics.median(times), "peak": peak_gib(device), "finite": finite,
            "passes": len(prepared.passes), "tokens": tokens}  # fmt: skip


def time_to_first_frame(sampler: Sampler, frames: int, size: int) -> dict[str, float | int | bool]:
    """Seconds from `generate` to the first chunk on the host; the generation is then abandoned."""
    device = sampler.device
    request = make_request(sampler, frames, size, seed=1)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    units, units_total, unit_times, conditioning = 0, 0, [], float("nan")
    events = sampler.generate(request)
    for event in events:
        if isinstance(event, VideoChunk):
            seconds = time.perf_counter() - start
            chunk = event
            units += 1  # the unit that finalised these frames (its progress event comes after them)
            events.close()
            break
        if isinstance(event, GenerationProgress):
            units_total = event.units_total
            if event.window is None:
                conditioning = event.unit_s
            else:
                units = event.units_done
                unit_times.append(event.unit_s)
    else:
        raise RuntimeError(f"the {frames}-frame request produced no frame")
    return {
        "seconds": seconds,
        "units": units,
        "units_total": units_total,
        "conditioning": conditioning,
        "unit_mean": statistics.mean(unit_times) if unit_times else 0.0,
        "first_frames": chunk.frames.shape[0],
        "peak": peak_gib(device),
        "ok": chunk.frame_start == 0 and chunk.frames.shape[0] > 0,
    }


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on CUDA, else fp32"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32x32 (CPU smoke test)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, 32 with --tiny)")
    parser.add_argument("--frames", default="297,3000", help="driving frame counts for time to first frame")
    parser.add_argument("--repeats", type=int, default=2, help="timed window-steps after one warm-up")
    parser.add_argument("--skip-step", action="store_true", help="skip the window-step timing")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    size = args.size or (32 if args.tiny else 512)
    frame_counts = [int(f) for f in args.frames.split(",") if f.strip()]

    print(f"# command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, {gpu}, {dtype_name}", flush=True)
    built = time.perf_counter()
    sizes = SamplerSizes.tiny() if args.tiny else SamplerSizes.release()
    sampler = random_sampler(sizes, mode="fast", device=device, dtype=dtype)
    sync(device)
    params = sum(p.numel() for p in sampler.dit.parameters())
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    built_s = time.perf_counter() - built
    print(f"# models built in {built_s:.1f} s: DiT {params / 1e9:.2f}B parameters, {weights:.1f} GiB on the "
          "device with the VAEs, CLIP and portrait encoder", flush=True)  # fmt: skip
    ok = True
    if not args.skip_step:
        step = time_window_step(sampler, size, args.repeats)
        print()
        row(
            f"window-step {size}x{size}",
            "guidance passes",
            "tokens per pass",
            "median s",
            "peak GiB",
            "finite",
        )
        row(*["---"] * 6)
        row("DiT batched + combine", step["passes"], f"{step['tokens']:,}", f"{step['seconds']:.3f}",
            f"{step['peak']:.1f}", "yes" if step["finite"] else "NO")  # fmt: skip
        ok = ok and bool(step["finite"])
    if frame_counts:
        print()
        row(f"fast mode {size}x{size}", "time to first frame s", "window-steps run / total",
            "conditioning s", "mean window-step s", "first chunk frames", "peak GiB", "ok")  # fmt: skip
        row(*["---"] * 8)
    for frames in frame_counts:
        first = time_to_first_frame(sampler, frames, size)
        row(f"{frames} driving frames", f"{first['seconds']:.2f}",
            f"{first['units']} / {first['units_total']}", f"{first['conditioning']:.2f}",
            f"{first['unit_mean']:.2f}", first["first_frames"], f"{first['peak']:.1f}",
            "yes" if first["ok"] else "NO")  # fmt: skip
        ok = ok and bool(first["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

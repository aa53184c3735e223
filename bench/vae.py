"""Benchmark of the video VAEs at full size with random weights, in bf16 on the GPU.

- Wan 2.1 VAE encoder on the I2V first-frame condition: the reference image followed by 200 zero
  frames (201 frames, REFERENCE.md 2.3) at 512x512 and 720x720 -> [1, 16, 51, H/8, W/8];
- both streaming decoders at 512x512 on 21 latent frames (81 video frames), fed in chunks of
  1, 7 and 21 latent frames from a fresh stream; the Wan VAE decoder also with 1 and 4 latent
  frames per internal pass (`decode_step_frames`, bounds activation memory, same frames).

Each measurement: one untimed warm-up run of the same call, then the median of `--repeats` timed runs
(CUDA-synchronised), with the peak device memory during the timed runs (total, and above what was
allocated before: weights and inputs) and a finiteness check of the output.

    python bench/vae.py                          # H200: full size
    python bench/vae.py --tiny --device cpu      # CPU smoke test: tiny widths, short and small videos

Needs torch and this repository only (run from the repository root, installed or not).
Exit status 0 when every run finished with finite outputs.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from flashportrait.models.tiny_vae import TinyVaeConfig, TinyVaeDecoder
from flashportrait.models.wan_vae import WanVAE, WanVaeConfig

TINY_WAN = WanVaeConfig(base_channels=8)
TINY_TAEHV = TinyVaeConfig(decoder_widths=(32, 16, 8, 8))


@torch.no_grad()
def randomize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Allocate a meta-device module on `device` in `dtype` with well-scaled random weights."""
    module = module.to(dtype).to_empty(device=device)
    for name, p in module.named_parameters():
        if name.endswith("gamma"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    return module.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> dict[str, float]:
    """Warm-up once, then time `repeats` calls; peak memory over the timed calls."""
    fn()
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, finite = [], True
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
        finite = finite and bool(torch.isfinite(out).all())
        del out
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"seconds": statistics.median(times), "peak": peak, "above": peak - base, "finite": finite}


def encode_condition(vae: WanVAE, size: int, frames: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """The reference's masked conditioning clip: frame 0 the image in [-1, 1], the rest zeros."""
    video = torch.zeros(1, 3, frames, size, size, device=device)
    video[:, :, 0] = torch.rand(1, 3, size, size, device=device) * 2 - 1
    return lambda: vae.encode(video)


def stream_decode(decoder, latents: torch.Tensor, chunk: int) -> Callable[[], torch.Tensor]:
    """A fresh stream fed `chunk` latent frames at a time; frames are dropped as a server sends them."""

    def run() -> torch.Tensor:
        state = decoder.begin(latents.shape[0])
        last = None
        for start in range(0, latents.shape[2], chunk):
            last, state = decoder.decode(latents[:, :, start : start + chunk], state)
        decoder.finish(state)
        return last

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="tiny widths and short, small videos (CPU test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark=True")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)

    wan_config = TINY_WAN if args.tiny else WanVaeConfig.wan21()
    tiny_config = TINY_TAEHV if args.tiny else TinyVaeConfig.taew2_1()
    enc_sizes = (32, 48) if args.tiny else (512, 720)
    enc_frames = 9 if args.tiny else 201
    dec_size = 32 if args.tiny else 512
    latent_frames = 5 if args.tiny else 21
    chunks = (1, 2, latent_frames) if args.tiny else (1, 7, latent_frames)

    print(f"# command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, {gpu}, {args.dtype}, cudnn.benchmark={args.cudnn_benchmark}")
    with torch.device("meta"):
        wan = WanVAE(wan_config)
        taehv = TinyVaeDecoder(tiny_config)
    wan = randomize(wan, device, dtype)
    taehv = randomize(taehv, device, dtype)
    params = sum(p.numel() for p in wan.parameters()), sum(p.numel() for p in taehv.parameters())
    print(f"# Wan VAE {params[0] / 1e6:.1f}M parameters, TAEHV decoder {params[1] / 1e6:.2f}M parameters")

    cases: list[tuple[str, str, Callable[[], Callable[[], torch.Tensor]], int]] = []
    for size in enc_sizes:
        latents_out = 1 + (enc_frames - 1) // 4
        cases.append(
            (
                f"Wan VAE encode {enc_frames} frames {size}x{size}",
                f"{latents_out} latent frames",
                lambda size=size: encode_condition(wan, size, enc_frames, device),
                enc_frames,
            )
        )
    h = dec_size // 8
    video_frames = 4 * (latent_frames - 1) + 1
    latents = torch.randn(1, 16, latent_frames, h, h, device=device)
    for step in (1, 4):
        for chunk in chunks:

            def make(step=step, chunk=chunk):
                wan.decode_step_frames = step
                return stream_decode(wan, latents, chunk)

            cases.append(
                (
                    f"Wan VAE decode {latent_frames} latent frames {dec_size}x{dec_size}",
                    f"chunk {chunk}, step {step}",
                    make,
                    video_frames,
                )
            )
    for chunk in chunks:
        cases.append(
            (
                f"TAEHV decode {latent_frames} latent frames {dec_size}x{dec_size}",
                f"chunk {chunk}",
                lambda chunk=chunk: stream_decode(taehv, latents, chunk),
                video_frames,
            )
        )

    print("| what | variant | seconds | video frames/s | peak GiB | above start GiB | finite |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for what, variant, make, frames in cases:
        try:
            result = measure(make(), device, args.repeats)
        except Exception as exc:  # one shot on the GPU machine: report and go on
            ok = False
            print(f"| {what} | {variant} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | | |")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        ok = ok and result["finite"]
        gib = 1024**3
        print(
            f"| {what} | {variant} | {result['seconds']:.3f} | {frames / result['seconds']:.1f} | "
            f"{result['peak'] / gib:.2f} | {result['above'] / gib:.2f} | {result['finite']} |",
            flush=True,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

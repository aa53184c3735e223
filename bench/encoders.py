"""Benchmark of the conditioning encoders at full size: umT5-XXL, CLIP ViT-H/14 tower, PD-FGC motion encoder.

Each model is built with random weights created directly on the device (the host never holds the
5.7B-parameter text encoder), then timed (median of per-call timings after warm-up, CUDA-synchronised),
with the peak device memory, a finiteness check of the outputs and the exact command:

- umT5-XXL encoder, bf16: 1 and 2 prompts padded to 512 tokens (the reference always pads to 512,
  so the cost does not depend on the prompt);
- CLIP ViT-H/14 tower, bf16: one 720x720 reference image -> [1, 257, 1280] (resize included);
- motion encoder, fp32 as the reference runs it: batches of 1, 16 and 64 face crops of 224x224.

    python bench/encoders.py                  # H200: full size
    python bench/encoders.py --tiny --device cpu  # CPU smoke test (the motion encoder has one size)

Needs torch and this repository only (run from the repository root, installed or not).
Exit status 0 when every output is finite.
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
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from flashportrait.models.clip import VIT_H14, CLIPVisionConfig, build_clip_vision
from flashportrait.models.motion_encoder import PD_FGC, build_motion_encoder
from flashportrait.models.t5 import UMT5_XXL, T5EncoderConfig, build_umt5_encoder

TINY_T5 = T5EncoderConfig(vocab_size=256, hidden_dim=64, attn_dim=64, ffn_dim=128, num_heads=4, num_layers=2)
TINY_CLIP = CLIPVisionConfig(
    image_size=56, patch_size=14, hidden_dim=64, mlp_ratio=4, num_heads=4, num_layers=3, layers_applied=2,
    embed_dim=32,
)  # fmt: skip


@torch.no_grad()
def randomize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Allocate a meta-device module on `device` and fill it with well-scaled random values."""
    # cast on the meta device first: the full-size text encoder is allocated once, in its final dtype
    module = module.to(dtype).to_empty(device=device)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            fan_in = sub.weight[0].numel()
            sub.weight.normal_(0.0, 1.0 / math.sqrt(fan_in))
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.Embedding):
            sub.weight.normal_(0.0, 1.0)
        elif isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
            sub.running_mean.zero_()
            sub.running_var.fill_(1.0)
            sub.num_batches_tracked.zero_()
    for name, param in module.named_parameters(recurse=True):
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "pre_norm.weight")):
            param.fill_(1.0)
        elif name.endswith(("norm.bias", "norm1.bias", "norm2.bias", "pre_norm.bias")):
            param.zero_()
        elif name in ("cls_embedding", "pos_embedding"):
            param.normal_(0.0, 0.02)
    return module.eval()


def timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int):
    """(median seconds, peak memory GiB or nan, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu (with --tiny)", file=sys.stderr)
        return 2
    t5_cfg, clip_cfg = (TINY_T5, TINY_CLIP) if args.tiny else (UMT5_XXL, VIT_H14)
    text_len = 16 if args.tiny else 512
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    rows: list[tuple[str, str, float, float]] = []
    finite = True

    def record(name: str, shape: str, fn: Callable[[], torch.Tensor]) -> None:
        nonlocal finite
        seconds, peak, out = timed(fn, device, args.warmup, args.repeats)
        tensors = out if isinstance(out, tuple) else (out,)
        ok = all(bool(torch.isfinite(t).all()) for t in tensors)
        finite &= ok
        rows.append((name + ("" if ok else " NON-FINITE"), shape, seconds * 1e3, peak))

    with torch.no_grad():
        t5 = randomize(build_umt5_encoder(t5_cfg), device, half)
        for batch in (1, 2):
            ids = torch.randint(3, t5_cfg.vocab_size, (batch, text_len), device=device, generator=generator)
            mask = torch.ones_like(ids)
            mask[:, text_len // 4 :] = 0  # a short prompt: most positions are padding, as in practice
            record(f"umT5 encoder {half}", f"{batch} x {text_len} tokens", partial(t5, ids, mask))
        t5 = None  # free the 11 GiB before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        clip = randomize(build_clip_vision(clip_cfg), device, half)
        side = 64 if args.tiny else 720
        image = torch.rand(1, 3, side, side, device=device, generator=generator) * 2 - 1
        record(
            f"CLIP tower {half}",
            f"1 x {side}x{side} -> {clip_cfg.num_tokens} tokens",
            partial(clip.encode, image),
        )
        clip = None

        motion = randomize(build_motion_encoder(PD_FGC), device, torch.float32)
        size = PD_FGC.input_size
        for batch in (1, 2) if args.tiny else (1, 16, 64):
            x = torch.rand(batch, 3, size, size, device=device, generator=generator) * 2 - 1
            record("motion encoder fp32", f"{batch} x {size}x{size} crops", partial(motion, x))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; tf32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
    print(f"{'model':32} {'input':32} {'ms (median)':>12} {'peak GiB (with weights)':>24}")
    for model_name, shape, ms, peak in rows:
        print(f"{model_name:32} {shape:32} {ms:12.2f} {peak:24.2f}")
    print(
        "command: "
        + shlex.join(["python", "bench/encoders.py", *(argv if argv is not None else sys.argv[1:])])
    )
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())

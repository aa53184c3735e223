"""Forward-pass benchmark of the full-size FlashPortrait DiT (Wan2.1-I2V-14B + expression attention).

Builds the DiT with random weights created directly on the GPU in bf16 (the host never holds the
model), runs one forward pass of a 512x512 window of 51 latent frames (x [1, 16, 51, 64, 64]:
52,224 tokens, text padded to 512, 257 CLIP tokens, 97 expression tokens per latent frame) with
each attention backend, checks that the output is finite, and prints the time per forward (median
of CUDA-event timings after warm-up), the peak GPU memory and the exact command.

    python bench/dit_forward.py                      # H200: full size, every available backend
    python bench/dit_forward.py --batch 2            # both guidance passes as one batch
    python bench/dit_forward.py --batch 2 --shared   # ... with their shared inputs expanded (sampler)
    python bench/dit_forward.py --fp8                # fp8 block linears (convert_to_fp8)
    python bench/dit_forward.py --path reference     # the unfused reference arithmetic on the GPU
    python bench/dit_forward.py --tiny               # CPU smoke test of this script

Needs torch and this repository only (run from the repository root, installed or not).
Exit status 0 when at least one backend ran and every output that was produced is finite.
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

import torch

from flashportrait.models.attention import (
    _fa2,
    _fa3,
    available_backends,
    set_default_backend,
)
from flashportrait.models.dit_loading import random_dit
from flashportrait.models.transformer import DiTConfig, WanDiT

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPRESSION_TOKENS = 97  # per latent frame (FlashPortrait's split_audio_adapter_sequence)
VAE_STRIDE = 8  # pixels per latent cell


def tiny_config() -> DiTConfig:
    return DiTConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=36, out_dim=16, freq_dim=32, text_len=16,
        text_dim=32, clip_dim=48, emo_dim=40,
    )  # fmt: skip


def default_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return [b for b in available_backends(device) if b != "sdpa"]
    names = []
    if _fa3() is not None:
        names.append("fa3")
    if _fa2() is not None:
        names.append("fa2")
    # exact and sdpa_math would materialise [heads, L, L] scores (hundreds of GB at full size).
    return [*names, "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"]


def forward_flops(cfg: DiTConfig, batch: int, frames: int, tokens: int) -> float:
    """Multiply-adds x 2 of one forward: the linear layers and the attention score/value products."""
    dim, layers = cfg.dim, cfg.num_layers
    per_token = 6 * dim * dim + 2 * dim * cfg.ffn_dim  # self q,k,v,o + cross q,o + FFN
    context = (
        2 * dim * dim * (cfg.text_len + cfg.clip_tokens) + 2 * cfg.emo_dim * dim * frames * EXPRESSION_TOKENS
    )
    attention = 2 * tokens * dim * (tokens + cfg.text_len + cfg.clip_tokens + EXPRESSION_TOKENS)
    return 2.0 * batch * layers * (per_token * tokens + context + attention)


def make_inputs(cfg: DiTConfig, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Random window inputs; with --shared the per-sample latents, condition, timestep, CLIP
    features and expression tokens are one row expanded over the batch, as the sampler passes the
    guidance passes (the DiT's fast path then computes shared work once)."""
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    b, f = args.batch, args.frames
    rows = 1 if args.shared else b
    h, w = args.height // VAE_STRIDE, args.width // VAE_STRIDE

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.expand(b, *t.shape[1:])

    return dict(
        x=per_sample(randn(rows, cfg.in_dim - 20, f, h, w)),
        t=per_sample(torch.full((rows,), 937.5, device=device)),
        context=randn(b, min(args.text_tokens, cfg.text_len), cfg.text_dim).to(dtype),
        clip_fea=per_sample(randn(rows, cfg.clip_tokens, cfg.clip_dim).to(dtype)),
        y=per_sample(randn(rows, 20, f, h, w)),
        emo_proj=per_sample(randn(rows, f, EXPRESSION_TOKENS, cfg.emo_dim).to(dtype)),
        ip_scale=torch.tensor([1.0, 0.0] * (b // 2) + [1.0] * (b % 2), device=device),
    )


def time_backend(model: WanDiT, inputs: dict, backend: str, args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    set_default_backend(backend)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    out = None
    try:
        with torch.inference_mode():
            for _ in range(args.warmup):
                out = model(**inputs)
            if cuda:
                torch.cuda.synchronize(device)
            for _ in range(args.repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = model(**inputs)
                    end.record()
                    torch.cuda.synchronize(device)
                    times.append(start.elapsed_time(end) / 1000.0)
                else:
                    begin = time.perf_counter()
                    out = model(**inputs)
                    times.append(time.perf_counter() - begin)
            finite = bool(torch.isfinite(out).all())
            shape = list(out.shape)
    except Exception as exc:  # one backend failing (unsupported, out of memory) must not stop the others
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"backend": backend, "error": f"{type(exc).__name__}: {message[:200]}"}
    finally:
        set_default_backend(None)
        del out
        if cuda:
            torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"backend": backend, "times": times, "finite": finite, "peak_gib": peak, "shape": shape}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (tests this script)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default 51; 5 with --tiny)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default 512; 64 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 512; 64 with --tiny)")
    parser.add_argument("--batch", type=int, default=1, help="samples per forward (2: both guidance passes)")
    parser.add_argument("--text-tokens", type=int, default=24, help="prompt length before padding")
    parser.add_argument(
        "--backends", default=None, help="comma-separated (default: every fast one available)"
    )
    parser.add_argument("--shared", action="store_true", help="per-sample inputs expanded from one row")
    parser.add_argument(
        "--path", choices=["auto", "fast", "reference"], default="auto",
        help="DiT arithmetic: fused fast path, unfused reference, or the model's default (fast on CUDA)",
    )  # fmt: skip
    parser.add_argument("--fp8", action="store_true", help="fp8 block linear layers (convert_to_fp8)")
    parser.add_argument("--fp8-layers", default=None, help="fp8 layer set (default: convert_to_fp8's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --tiny (or --device cpu) to run on the CPU", file=sys.stderr)
        return 2
    args.frames = args.frames or (5 if args.tiny else 51)
    args.height = args.height or (64 if args.tiny else 512)
    args.width = args.width or (64 if args.tiny else 512)
    cfg = tiny_config() if args.tiny else DiTConfig.wan_i2v_14b()
    dtype = DTYPES[args.dtype]
    backends = args.backends.split(",") if args.backends else default_backends(device)

    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {device} ({gpu})")

    begin = time.perf_counter()
    model = random_dit(cfg, seed=args.seed, dtype=dtype, device=device)
    model.fast_path = {"auto": None, "fast": True, "reference": False}[args.path]
    if args.fp8:
        with torch.no_grad():
            model.convert_to_fp8(*([args.fp8_layers] if args.fp8_layers else []))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tensors = [*model.parameters(), *model.buffers()]  # FP8Linear keeps its weights as buffers
    params = sum(t.numel() for t in tensors)
    weights_gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    built = time.perf_counter() - begin
    print(f"DiT: dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, {params / 1e9:.2f}B "
          f"parameters, {weights_gib:.1f} GiB {args.dtype}{' + fp8 blocks' if args.fp8 else ''} weights "
          f"built in {built:.1f}s; fast path: {model.uses_fast_path()}")  # fmt: skip

    inputs = make_inputs(cfg, args, device, dtype)
    b, _, f, h, w = inputs["x"].shape
    pt, ph, pw = cfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    flops = forward_flops(cfg, b, f, tokens)
    print(f"input: x [{b}, 16, {f}, {h}, {w}] ({args.height}x{args.width} px), {tokens} tokens per sample, "
          f"~{flops / 1e15:.2f} PFLOP per forward; warm-up {args.warmup}, timed {args.repeats}")  # fmt: skip

    results = [time_backend(model, inputs, name, args, device) for name in backends]

    print()
    print("| backend | median s/forward | min s | TFLOP/s | peak GiB | finite | note |")
    print("|---|---|---|---|---|---|---|")
    ok = False
    all_finite = True
    for r in results:
        if "error" in r:
            print(f"| {r['backend']} | - | - | - | - | - | {r['error']} |")
            continue
        median = statistics.median(r["times"])
        ok = True
        all_finite &= r["finite"]
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] == r["peak_gib"] else "-"
        print(f"| {r['backend']} | {median:.3f} | {min(r['times']):.3f} | {flops / median / 1e12:.3g} | "
              f"{peak} | {'yes' if r['finite'] else 'NO'} | output {r['shape']} |")  # fmt: skip
    if not ok:
        print("no backend ran", file=sys.stderr)
    return 0 if ok and all_finite else 1


if __name__ == "__main__":
    sys.exit(main())

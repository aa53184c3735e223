"""fp8 error budget of the full-size DiT: fp8 block linears against bf16, same random weights.

Builds the DiT (Wan2.1-I2V-14B + expression attention) with random bf16 weights on the GPU and runs
one fast-mode window twice from the same fixed noise: a 4-step StepDistill generation of 51 latent
frames at 512x512 (a whole 201-frame clip's window) with the default guidance (emo 4, text 1: the
passes posi and no_emo as one batch of 2, inputs shared as the sampler passes them), once with the
bf16 weights and once after `convert_to_fp8(--layers)`. Reports the relative L2 error (||fp8 - bf16|| /
||bf16||) of
- the velocity prediction of each pass and of the guided velocity at the first step (identical
  inputs: the error of one forward);
- the guided velocity at every later step (inputs drift apart as the two trajectories do);
- the final latents.
With --layer-sets, also which block linears to quantise: for each set, the first step's forward time
(batch 2) and velocity error, so the error can be traded against speed.
Noise is the sampler's per-frame noise (`frame_noise(seed, frame, ...)`); conditioning inputs are
seeded random tensors. With random weights the numbers say how much fp8 rounding moves this network,
not how the output looks.

    python bench/dit_fp8_error.py                   # H200, full size (~2 minutes)
    python bench/dit_fp8_error.py --no-generation --layer-sets all,ffn,self_attn+ffn
    python bench/dit_fp8_error.py --tiny            # CPU smoke test (fp8 emulated)

Needs torch and this repository only.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flashportrait.models.dit_loading import random_dit
from flashportrait.models.fp8_linear import DEFAULT_FP8_LAYERS, DIT_FP8_LAYER_SETS
from flashportrait.models.transformer import DiTConfig, WanDiT
from flashportrait.sampling.guidance import GuidanceConfig, combine_batched, guidance_passes
from flashportrait.sampling.sampler import frame_noise
from flashportrait.sampling.schedulers import StepDistillScheduler

EXPRESSION_TOKENS = 97
VAE_STRIDE = 8


def tiny_config() -> DiTConfig:
    return DiTConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=36, out_dim=16, freq_dim=32, text_len=16,
        text_dim=32, clip_dim=48, emo_dim=40,
    )  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def window_inputs(cfg: DiTConfig, args, device: torch.device, passes: int) -> dict:
    """Conditioning shared by every pass (expanded, as the sampler passes it) and the per-pass prompt
    rows and expression weights of the fast default (posi: ip_scale 1, no_emo: 0)."""
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    f, h, w = args.frames, args.height // VAE_STRIDE, args.width // VAE_STRIDE
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    prompt = randn(1, min(args.text_tokens, cfg.text_len), cfg.text_dim)
    guidance = GuidanceConfig()
    scales = [p.ip_scale for p in guidance_passes(guidance)]
    return dict(
        y=randn(1, 20, f, h, w, dtype=torch.float32).expand(passes, -1, -1, -1, -1),
        clip_fea=randn(1, cfg.clip_tokens, cfg.clip_dim).expand(passes, -1, -1),
        emo_proj=randn(1, f, EXPRESSION_TOKENS, cfg.emo_dim).expand(passes, -1, -1, -1),
        context=torch.cat([prompt] * passes),
        ip_scale=torch.tensor(scales, device=device),
    )


def generate(model: WanDiT, noise: torch.Tensor, inputs: dict, device: torch.device) -> dict:
    """The 4-step window: per step the per-pass predictions [P, 16, F, h, w] and the guided velocity;
    the final latents; seconds per step."""
    scheduler = StepDistillScheduler()
    guidance = GuidanceConfig()
    passes = inputs["ip_scale"].shape[0]
    timesteps = scheduler.timesteps.to(device)
    x = noise
    record: dict = {"passes": [], "guided": [], "step_s": []}
    with torch.inference_mode():
        for step in range(scheduler.num_steps):
            begin = time.perf_counter()
            out = model(
                x.expand(passes, -1, -1, -1, -1), timesteps[step].reshape(1).expand(passes), **inputs
            ).float()
            v = combine_batched(guidance, out)
            x, _ = scheduler.step(v, step, x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record["step_s"].append(time.perf_counter() - begin)
            record["passes"].append(out)
            record["guided"].append(v)
    record["latents"] = x
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (tests this script)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default 51; 5 with --tiny)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-generation", dest="generation", action="store_false", help="skip the 4 steps")
    parser.add_argument("--layers", default=DEFAULT_FP8_LAYERS, choices=sorted(DIT_FP8_LAYER_SETS),
                        help="fp8 layer set of the 4-step generation")  # fmt: skip
    parser.add_argument("--layer-sets", default="", help=f"comma-separated, of {sorted(DIT_FP8_LAYER_SETS)}")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --tiny to run on the CPU", file=sys.stderr)
        return 2
    args.frames = args.frames or (5 if args.tiny else 51)
    args.height = args.height or (64 if args.tiny else 512)
    args.width = args.width or (64 if args.tiny else 512)
    cfg = tiny_config() if args.tiny else DiTConfig.wan_i2v_14b()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {gpu}")

    model = random_dit(cfg, seed=args.seed, dtype=dtype, device=device)
    passes = len(guidance_passes(GuidanceConfig()))
    inputs = window_inputs(cfg, args, device, passes)
    h, w = args.height // VAE_STRIDE, args.width // VAE_STRIDE
    noise = torch.cat([frame_noise(args.seed, f, h, w) for f in range(args.frames)], dim=2).to(device)
    print(f"window: {args.frames} latent frames at {args.height}x{args.width}, {passes} guidance passes "
          f"per step, fast path {model.uses_fast_path()}")  # fmt: skip
    step0 = dict(
        inputs, x=noise.expand(passes, -1, -1, -1, -1), t=torch.full((passes,), 1000.0, device=device)
    )
    finite = True
    if args.layer_sets:
        finite &= layer_sets(cfg, args, device, dtype, model, step0)
    if args.generation:
        finite &= generation(model, noise, inputs, device, passes, args.layers)
    return 0 if finite else 1


def timed_forward(model: WanDiT, inputs: dict, device: torch.device) -> tuple[torch.Tensor, float]:
    """(output, seconds of the second of two calls)."""
    with torch.inference_mode():
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        out = model(**inputs).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out, time.perf_counter() - begin


def layer_sets(cfg, args, device, dtype, model: WanDiT, inputs: dict) -> bool:
    """Forward time and first-step velocity error for each set of quantised block linears."""
    bf16, bf16_s = timed_forward(model, inputs, device)
    rows = [("none (bf16)", 0, bf16_s, 0.0, 0.0, 0.0)]
    guidance = GuidanceConfig()
    finite = True
    for name in args.layer_sets.split(","):
        variant = random_dit(cfg, seed=args.seed, dtype=dtype, device=device)  # the same weights
        with torch.no_grad():
            count = len(variant.convert_to_fp8(name))
        out, seconds = timed_forward(variant, inputs, device)
        finite &= bool(torch.isfinite(out).all())
        guided = rel(combine_batched(guidance, out), combine_batched(guidance, bf16))
        rows.append((name, count, seconds, rel(out[0], bf16[0]), rel(out[1], bf16[1]), guided))
        del variant
    print("\n| fp8 layers | count | s/forward (batch 2) | velocity error pass 0 | pass 1 | guided |")
    print("|---|---|---|---|---|---|")
    for name, count, seconds, e0, e1, eg in rows:
        print(f"| {name} | {count} | {seconds:.3f} | {e0:.3e} | {e1:.3e} | {eg:.3e} |")
    return finite


def generation(
    model: WanDiT, noise: torch.Tensor, inputs: dict, device: torch.device, passes: int, layers: str
) -> bool:
    """The 4-step window in bf16, then with the `layers` set in fp8 (converts `model`)."""
    bf16 = generate(model, noise, inputs, device)
    converted = model.convert_to_fp8(layers)
    print(f"fp8: {len(converted)} block linear layers quantised ({layers})")
    fp8 = generate(model, noise, inputs, device)

    rows = [
        (
            f"step 0 velocity, pass {i} (one forward, same input)",
            rel(fp8["passes"][0][i], bf16["passes"][0][i]),
        )
        for i in range(passes)
    ]
    rows += [(f"step {s} guided velocity", rel(fp8["guided"][s], bf16["guided"][s])) for s in range(4)]
    rows.append(("final latents after 4 steps", rel(fp8["latents"], bf16["latents"])))
    rows.append(("  (scale: final latents vs the noise)", rel(bf16["latents"], noise)))
    finite = all(torch.isfinite(r["latents"]).all().item() for r in (bf16, fp8))
    print("\n| quantity | relative L2, fp8 vs bf16 |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3e} |")
    print(f"\nseconds per step (batch {passes}): bf16 {[round(s, 3) for s in bf16['step_s']]}, "
          f"fp8 {[round(s, 3) for s in fp8['step_s']]}; outputs finite: {finite}")  # fmt: skip
    return finite


if __name__ == "__main__":
    sys.exit(main())

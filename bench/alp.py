"""Benchmark of Adaptive Latent Prediction (ALP, `flashportrait/sampling/alp.py`) at full size.

Sampler section (GPU): every model at full size with random bf16 weights built on the device
(`random_sampler(SamplerSizes.release(), mode="quality")`), a 30-step quality request (Euler, emotion
guidance 4 = 2 passes batched per window-step) at 512x512 on ONE window: 81 driving frames = 21 latent
frames with context_size 21 (a 51-frame window needs ~2.4x the DiT time per step; one window keeps the
whole run inside the device budget, and ALP is per window anyway). For the full computation and for
ALP at each K (order 3, adaptive, plus the plain Taylor forecast at K = 5):
wall time of the denoising (CUDA-synchronised, after one warm-up DiT call), DiT calls counted by a
forward hook, speed-up vs full, peak GPU memory, and the relative L2 error of the final latents vs the
full computation. With random weights the DiT output is not a smooth function of the step (the
'mean step change' column shows how much the guided prediction changes per step in the full run), so
these errors say how ALP behaves on this model, NOT what quality it keeps on the trained one.

Analytic section (`--analytic`, CPU, seconds): the forecast on a flow whose exact velocity is known
(data = a two-component Gaussian mixture per dimension), final-latent error vs the full Euler run for
plain Taylor, our adaptive factors, each factor alone, and the amplifying reading of the latent
variation rate (r(s)/r(a))^1.5 (the choice documented in alp.py); geometric mean over 30/50 steps,
shifts 3/5, two data scales and three seeds.

    python3 bench/alp.py                              # H200: full, K = 2, 3, 5 and plain K = 5 (~6 min)
    python3 bench/alp.py --intervals 5 --no-plain     # H200: full and K = 5 only
    python3 bench/alp.py --tiny --device cpu          # CPU smoke test: tiny models, 32x32, 3 windows
    python3 bench/alp.py --analytic                   # CPU: the analytic-flow ablation only

Needs torch, numpy and pillow and this repository only (run from the repository root).
Exit status 0 when every run finished with finite latents and the expected DiT call count.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from flashportrait.sampling.alp import AdaptiveLatentPredictor, ALPConfig
from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler
from flashportrait.sampling.sampler import GenerationRequest, PreparedRequest, Sampler, WindowDenoiser
from flashportrait.sampling.schedulers import SchedulerConfig, build_scheduler
from flashportrait.sampling.wavefront import FinalLatents

GIB = 2**30
STEPS = 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


# -- sampler section --------------------------------------------------------------------------------


def make_request(sampler: Sampler, tiny: bool, size: int) -> GenerationRequest:
    """Full size: 81 frames = 21 latent frames, one window of 21. Tiny: 33 frames = 9 latent frames,
    windows of 5 overlapping by 2 (3 windows, so the interleaving is exercised)."""
    rng = np.random.default_rng(0)
    frames, window, overlap = (33, 5, 2) if tiny else (81, 21, 0)
    text_dim = sampler.dit.config.text_dim
    params = GenerationParams(
        max_size=size, context_size=window, context_overlap=overlap, steps=STEPS, seed=1
    )
    return GenerationRequest(
        image=rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8),
        features=rng.standard_normal((frames, sampler.portrait_encoder.cfg.feature_dim), dtype=np.float32),
        prompt_embeds=torch.from_numpy(rng.standard_normal((12, text_dim), dtype=np.float32)),
        params=params,
        request_id="bench-alp",
    )


def denoise(sampler: Sampler, prepared: PreparedRequest, on_passes=None) -> dict[str, object]:
    """Final latents of `prepared` with its ALP setting, timed, with DiT calls counted."""
    device = sampler.device
    calls = []
    handle = sampler.dit.register_forward_hook(lambda *_: calls.append(1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    try:
        finals = [e for e in sampler.denoise(prepared, on_passes=on_passes) if isinstance(e, FinalLatents)]
        latents = torch.cat([f.latents for f in finals], dim=2)
        sync(device)
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    return {"latents": latents, "seconds": seconds, "calls": len(calls), "peak": peak}


def sampler_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> bool:
    size = args.size or (32 if args.tiny else 512)
    built = time.perf_counter()
    sizes = SamplerSizes.tiny() if args.tiny else SamplerSizes.release()
    sampler = random_sampler(sizes, mode="quality", device=device, dtype=dtype)
    sync(device)
    params = sum(p.numel() for p in sampler.dit.parameters())
    print(
        f"# models built in {time.perf_counter() - built:.1f} s: DiT {params / 1e9:.2f}B parameters",
        flush=True,
    )
    request = make_request(sampler, args.tiny, size)
    prepared = sampler.prepare(request)
    windows, window = prepared.plan.num_windows, prepared.plan.context_size
    h, w = prepared.conditioning.latent_size
    print(f"# {size}x{size}, {prepared.counts.latent_length} latent frames, {windows} window(s) of {window} "
          f"({window * h * w // 4:,} tokens per pass), {len(prepared.passes)} guidance passes, "
          f"{prepared.num_steps} Euler steps", flush=True)  # fmt: skip
    # Warm-up: one DiT call (kernel selection, expression tokens) outside the timings.
    warm = WindowDenoiser(sampler, prepared)
    warm.predict_passes(0, 0, torch.zeros(1, 16, window, h, w, device=device))
    sync(device)

    changes: list[float] = []
    last: dict[int, torch.Tensor] = {}

    def step_change(window_index: int, step: int, passes: torch.Tensor) -> None:
        if window_index in last:
            previous = last[window_index]
            changes.append(float((passes - previous).norm() / previous.norm().clamp_min(1e-30)))
        last[window_index] = passes.clone()

    full = denoise(sampler, prepared, on_passes=step_change)
    full_latents = full["latents"]
    ok = bool(torch.isfinite(full_latents).all()) and full["calls"] == windows * prepared.num_steps
    print(f"# mean step change of the per-pass predictions in the full run: "
          f"{statistics.mean(changes):.3f} (relative L2 between consecutive steps)", flush=True)  # fmt: skip
    print()
    row("30-step request", "ALP", "DiT calls", "seconds", "speed-up (ideal)", "rel. L2 error vs full",
        "max abs error", "peak GiB", "ok")  # fmt: skip
    row(*["---"] * 9)
    row("full computation", "off", full["calls"], f"{full['seconds']:.2f}", "1.00", "0", "0",
        f"{full['peak']:.1f}", "yes" if ok else "NO")  # fmt: skip
    configs = [ALPConfig(interval=k, order=args.order) for k in args.intervals]
    if not args.no_plain:
        configs.append(ALPConfig(interval=5, order=args.order, adaptive=False))
    for config in configs:
        run = denoise(sampler, dataclasses.replace(prepared, alp=config))
        latents = run["latents"]
        expected = windows * len(config.model_steps(prepared.num_steps))
        finite = bool(torch.isfinite(latents).all())
        error = float((latents - full_latents).norm() / full_latents.norm())
        good = finite and run["calls"] == expected
        ok = ok and good
        label = f"K={config.interval}, order {config.order}" + ("" if config.adaptive else ", plain Taylor")
        row(label, "on", run["calls"], f"{run['seconds']:.2f}",
            f"{full['seconds'] / run['seconds']:.2f} ({full['calls'] / max(run['calls'], 1):.2f})",
            f"{error:.4f}", f"{float((latents - full_latents).abs().max()):.4f}", f"{run['peak']:.1f}",
            "yes" if good else "NO")  # fmt: skip
    return ok


# -- analytic section -------------------------------------------------------------------------------


class GaussianMixtureFlow:
    """Data per dimension: an equal mixture of N(mu_k, s_k^2), k = 1, 2; x_sigma = (1 - sigma) x0 +
    sigma eps. The exact flow-matching velocity E[eps - x0 | x_sigma] in closed form."""

    def __init__(self, dims: int, scale: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.mu = 1.5 * torch.randn(2, dims, generator=generator, dtype=torch.float64)
        self.s = scale + 0.3 * torch.rand(2, dims, generator=generator, dtype=torch.float64)

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: [1, dims] float32 -> [1, dims] float32."""
        x = x.double()
        a = 1.0 - sigma
        variance = a * a * self.s**2 + sigma**2
        centred = x - a * self.mu
        weights = torch.softmax(-0.5 * centred**2 / variance - 0.5 * torch.log(variance), dim=0)
        x0 = self.mu + a * self.s**2 / variance * centred
        eps = sigma / variance * centred
        return (weights * (eps - x0)).sum(0, keepdim=True).float()


class _AmplifyingRate(AdaptiveLatentPredictor):
    """The reading NOT taken: gamma = (r(s) / r(a)) ** exponent, clamped to [1/2, 2]."""

    def _gamma(self, history):
        if history.rate is None or history.anchor_rate is None or float(history.anchor_rate) == 0:
            return torch.ones(())
        return (history.rate / history.anchor_rate).pow(self.config.rate_exponent).clamp(0.5, 2.0)


class _RateOnly(AdaptiveLatentPredictor):
    """gamma without lambda."""

    def _record(self, history, step, predictions):
        super()._record(history, step, predictions)
        if history.trust is not None:
            history.trust.fill_(1.0)


def _euler(flow, sigmas: torch.Tensor, x: torch.Tensor, predictor: AdaptiveLatentPredictor | None):
    for step in range(len(sigmas) - 1):
        sigma = float(sigmas[step])
        if predictor is None:
            v = flow.velocity(x, sigma)
        else:
            v = predictor(0, step, x, lambda x=x, sigma=sigma: flow.velocity(x, sigma))
        x = x + (sigmas[step + 1] - sigmas[step]) * v
    return x


def analytic_section(intervals: list[int], order: int) -> bool:
    variants = {
        "plain Taylor": lambda k, n: AdaptiveLatentPredictor(ALPConfig(k, n, adaptive=False), n_steps),
        "adaptive (ours: gamma and lambda)": lambda k, n: AdaptiveLatentPredictor(ALPConfig(k, n), n_steps),
        "lambda only": lambda k, n: AdaptiveLatentPredictor(ALPConfig(k, n, rate_exponent=0.0), n_steps),
        "gamma only": lambda k, n: _RateOnly(ALPConfig(k, n), n_steps),
        "amplifying gamma (r(s)/r(a))^1.5": lambda k, n: _AmplifyingRate(ALPConfig(k, n), n_steps),
    }
    logs: dict[str, dict[int, list[float]]] = {name: {k: [] for k in intervals} for name in variants}
    ok = True
    for n_steps in (30, 50):
        for shift in (3.0, 5.0):
            sigmas = build_scheduler(SchedulerConfig(kind="euler", num_steps=n_steps, shift=shift)).sigmas
            for scale in (0.05, 0.3):
                for seed in range(3):
                    flow = GaussianMixtureFlow(4096, scale, seed)
                    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(100 + seed))
                    full = _euler(flow, sigmas, x, None)
                    for name, make in variants.items():
                        for k in intervals:
                            out = _euler(flow, sigmas, x, make(k, order))
                            error = float((out - full).norm() / full.norm())
                            ok = ok and math.isfinite(error)
                            logs[name][k].append(math.log(max(error, 1e-30)))
    print()
    row(f"analytic flow, order {order}", *[f"K={k} error" for k in intervals])
    row(*["---"] * (len(intervals) + 1))
    for name in variants:
        row(name, *[f"{math.exp(statistics.mean(logs[name][k])):.4f}" for k in intervals])
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on CUDA")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32x32 (CPU smoke test)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, 32 with --tiny)")
    parser.add_argument("--intervals", default="2,3,5", help="ALP intervals K to run (comma-separated)")
    parser.add_argument("--order", type=int, default=3, help="ALP order n")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-Taylor K=5 run")
    parser.add_argument("--analytic", action="store_true", help="only the analytic-flow ablation (CPU)")
    args = parser.parse_args(argv)
    args.intervals = [int(k) for k in args.intervals.split(",") if k.strip()]

    print(f"# command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    if args.analytic:
        print(f"# torch {torch.__version__}, CPU {platform.processor() or platform.machine()}", flush=True)
        return 0 if analytic_section(args.intervals, args.order) else 1
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, {gpu}, {dtype_name}", flush=True)
    with torch.no_grad():
        ok = sampler_section(args, device, getattr(torch, dtype_name))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

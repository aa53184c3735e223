"""fp8 (e4m3) vs bf16 linear layers at the DiT's full width: time and error.

Layers of the Wan2.1-14B block at one 512x512 window of 51 latent frames (52,224 tokens): 5120->5120
(attention projections), 5120->13824 and 13824->5120 (FFN), random weights N(0, 1/fan_in) with a
bias. For each layer: the bf16 matmul (F.linear), `FP8Linear` including the per-token activation
quantisation, and the fp8 matmul alone (input already quantised, as the fused norm kernels deliver
it), with fast accumulation on and off; TFLOP/s counts 2*M*K*N. Errors are relative L2 norms of the
outputs against the float32 product of the same bf16 operands (TF32 off) and fp8 against bf16, for
Gaussian activations and for activations with a few large outlier channels (0.5% of channels x30,
the pattern that per-token scaling handles worst). The FFN stack (5120->13824, GELU(tanh) fused
into the quantisation, 13824->5120) is measured end to end the same way.

    python bench/fp8_error.py                        # H200, full size
    python bench/fp8_error.py --device cpu --tiny    # CPU smoke test (fp8 matmul emulated)

Needs torch and this repository only (triton for the GPU quantisation kernel).
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
import torch.nn.functional as F
from flashportrait.kernels import quantize_fp8
from torch import nn

from flashportrait.models.fp8_linear import FP8Linear

OUTLIER_FRACTION = 0.005
OUTLIER_GAIN = 30.0


def time_fn(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b (computed in float64 chunks: no full float64 copies)."""
    num = den = 0.0
    for x, y in zip(a.split(4096), b.split(4096), strict=True):
        num += (x.double() - y.double()).pow(2).sum().item()
        den += y.double().pow(2).sum().item()
    return (num / max(den, 1e-300)) ** 0.5


def make_linear(k: int, n: int, device: torch.device, g: torch.Generator) -> nn.Linear:
    lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g, device=device) * k**-0.5)
        lin.bias.copy_(0.05 * torch.randn(n, generator=g, device=device))
    return lin


def make_input(tokens: int, k: int, outliers: bool, device: torch.device, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=g, device=device)
    if outliers:
        channels = torch.randperm(k, generator=g, device=device)[: max(1, int(OUTLIER_FRACTION * k))]
        x[:, channels] *= OUTLIER_GAIN
    return x.to(torch.bfloat16)


def fp32_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    return F.linear(x.float(), lin.weight.float(), lin.bias.float())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (tests this script on the CPU)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--tokens", type=int, default=None, help="default 52224 (64 with --tiny)")
    parser.add_argument("--dim", type=int, default=None, help="default 5120 (128 with --tiny)")
    parser.add_argument("--ffn", type=int, default=None, help="default 13824 (384 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (2 with --tiny)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --tiny to run on the CPU", file=sys.stderr)
        return 2
    tiny = args.tiny
    tokens = args.tokens or (64 if tiny else 52224)
    dim, ffn = args.dim or (128 if tiny else 5120), args.ffn or (384 if tiny else 13824)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    repeats = args.repeats or (2 if tiny else 10)
    # The float32 reference must be a float32 product, not TF32.
    torch.backends.cuda.matmul.allow_tf32 = False

    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {device} ({name})")
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    matmul = "torch._scaled_mm (row-wise scales)" if device.type == "cuda" else "float32 emulation"
    print(f"{tokens} tokens, width {dim}, FFN {ffn}; fp8 matmul: {matmul}; median of {repeats}")

    g = torch.Generator(device=device).manual_seed(0)
    layers = {
        f"{dim}->{dim}": make_linear(dim, dim, device, g),
        f"{dim}->{ffn}": make_linear(dim, ffn, device, g),
        f"{ffn}->{dim}": make_linear(ffn, dim, device, g),
    }
    fp8 = {
        accum: {key: FP8Linear.from_linear(lin, fast_accum=accum) for key, lin in layers.items()}
        for accum in (True, False)
    }

    print()
    print("Time per layer (Gaussian input):")
    columns = ["layer", "bf16 ms", "fp8 ms (incl. quant)", "fp8 matmul ms", "fast accum", "bf16 TFLOP/s"]
    columns += ["fp8 TFLOP/s", "speed-up"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    with torch.inference_mode():
        for key, lin in layers.items():
            x = make_input(tokens, lin.in_features, False, device, g)
            flops = 2.0 * tokens * lin.in_features * lin.out_features
            t_bf16 = time_fn(lambda lin=lin, x=x: lin(x), device, warmup, repeats)
            for accum in (True, False):
                layer = fp8[accum][key]
                act = quantize_fp8(x)
                t_fp8 = time_fn(lambda layer=layer, x=x: layer(x), device, warmup, repeats)
                t_mm = time_fn(lambda layer=layer, act=act: layer(act), device, warmup, repeats)
                times = f"{t_bf16 * 1e3:.2f} | {t_fp8 * 1e3:.2f} | {t_mm * 1e3:.2f} | {accum}"
                rates = f"{flops / t_bf16 / 1e12:.0f} | {flops / t_mm / 1e12:.0f} | {t_bf16 / t_fp8:.2f}x"
                print(f"| {key} | {times} | {rates} |")
            del x, act
            if device.type == "cuda":
                torch.cuda.empty_cache()

        print()
        print("Relative L2 error of the outputs (vs the float32 product of the same bf16 operands):")
        print("| layer | input | bf16 vs fp32 | fp8 vs fp32 | fp8 vs bf16 | fp8 fast-accum vs fp32 |")
        print("|---|---|---|---|---|---|")
        worst = 0.0
        for outliers in (False, True):
            kind = "outlier channels" if outliers else "Gaussian"
            for key, lin in layers.items():
                x = make_input(tokens, lin.in_features, outliers, device, g)
                ref = fp32_linear(x, lin)
                out_bf16 = lin(x)
                out_fp8 = fp8[False][key](x)
                out_fast = fp8[True][key](x)
                errors = (rel(out_bf16, ref), rel(out_fp8, ref), rel(out_fp8, out_bf16), rel(out_fast, ref))
                worst = max(worst, *errors[1:])
                print(f"| {key} | {kind} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
                del x, ref, out_bf16, out_fp8, out_fast

            # The FFN stack: 5120 -> 13824, GELU(tanh), 13824 -> 5120.
            up, down = layers[f"{dim}->{ffn}"], layers[f"{ffn}->{dim}"]
            x = make_input(tokens, dim, outliers, device, g)
            ref = fp32_linear(F.gelu(fp32_linear(x, up), approximate="tanh"), down)
            out_bf16 = down(F.gelu(up(x), approximate="tanh"))
            row = []
            for accum in (False, True):
                hidden = fp8[accum][f"{dim}->{ffn}"](x)
                row.append(fp8[accum][f"{ffn}->{dim}"](quantize_fp8(hidden, "gelu_tanh")))
            errors = (rel(out_bf16, ref), rel(row[0], ref), rel(row[0], out_bf16), rel(row[1], ref))
            worst = max(worst, *errors[1:])
            print(f"| FFN stack | {kind} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
            del x, ref, out_bf16, row, hidden
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # A broken fp8 path shows up as an O(1) error; e4m3 itself stays at a few percent.
    if not worst < 0.2:
        print(f"fp8 error {worst:.3g} is far above e4m3 rounding: the fp8 path is broken", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

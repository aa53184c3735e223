"""Where the full-size DiT forward's time goes, and what each speed change buys.

Builds the DiT with random bf16 weights on the GPU (never on the host) and, for one 512x512 window
of 51 latent frames (52,224 tokens; 97 expression tokens per latent frame):

- `micro`: the pieces at full size: self-attention (cuDNN) with v as a strided slice of the fused
  q/k/v output vs contiguous; text/image cross-attention; the expression attention (51 groups of
  1,024 queries over 97 keys) per backend and as explicit matmuls; q/k/v as one matmul vs three;
  the FFN's first layer + GELU(tanh) in cuBLASLt's epilogue vs separate; the expression
  renormalisation, reference vs fast; and whether cuDNN SDPA takes fp8 inputs here;
- `model`: whole forwards, one change added at a time (reference path; fast path with the kernels
  off, GELU and renormalisation unfused; + Triton kernels; + GELU epilogue; + fast renormalisation),
  batch 2 with the guidance passes' shared inputs (as the sampler passes them: `expand`ed) and
  without, fp8 linear layers at batch 1 and 2, a CUDA-graph replay; torch.profiler tables for the
  reference, fast and fp8 forwards grouped by kernel kind, against FLOP-counted floors.

    python bench/profile_dit.py                        # H200: everything (~5 minutes)
    python bench/profile_dit.py --parts micro          # just the pieces
    python bench/profile_dit.py --tiny                 # CPU smoke test of this script

Prints short tables (last); `--out DIR` also gets the full profiler tables and a JSON of results.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flashportrait.kernels as kernels
import torch
import torch.nn.functional as F

from flashportrait.models import dit_blocks
from flashportrait.models.attention import attention
from flashportrait.models.dit_loading import random_dit
from flashportrait.models.fp8_linear import DEFAULT_FP8_LAYERS, DIT_FP8_LAYER_SETS
from flashportrait.models.transformer import DiTConfig, WanDiT

EXPRESSION_TOKENS = 97
VAE_STRIDE = 8
# Ceilings measured on the H200 (BENCHMARKS.md): bf16 and fp8 matmul, cuDNN attention at this shape.
CEILING_TFLOPS = {"bf16_gemm": 790.0, "fp8_gemm": 1400.0, "attention": 613.0}


def tiny_config() -> DiTConfig:
    return DiTConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=36, out_dim=16, freq_dim=32, text_len=16,
        text_dim=32, clip_dim=48, emo_dim=40,
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Seconds per call (CUDA events on the GPU), `warmup` untimed calls first."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
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
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------ FLOPs


def flop_budget(cfg: DiTConfig, batch: int, frames: int, tokens: int, shared_first: bool = False) -> dict:
    """FLOPs of one forward by kind: self-attention, cross-attention (text+image), expression
    attention, linear layers (block projections and FFN, context projections)."""
    c, layers = cfg.dim, cfg.num_layers
    self_blocks = batch * layers - ((batch - 1) if shared_first else 0)
    per_token = 6 * c * c + 2 * c * cfg.ffn_dim
    context = 4 * c * c * (cfg.text_len + cfg.clip_tokens) + 4 * cfg.emo_dim * c * frames * EXPRESSION_TOKENS
    return {
        "self_attention": 4.0 * tokens * tokens * c * self_blocks,
        "cross_attention": 4.0 * tokens * (cfg.text_len + cfg.clip_tokens) * c * batch * layers,
        "expression_attention": 4.0 * tokens * EXPRESSION_TOKENS * c * batch * layers,
        "linear": 2.0 * per_token * tokens * batch * layers + context * batch * layers,
    }


# ---------------------------------------------------------------------------------------- micro


def micro(cfg: DiTConfig, args, device: torch.device) -> list[tuple[str, float, str]]:
    """(what, ms, note) rows for the pieces of one block at full size."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    tokens = args.frames * (args.height // 16) * (args.width // 16)

    def randn(*shape, dtype=dt, std=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    rows: list[tuple[str, float, str]] = []

    def record(name: str, fn: Callable[[], object], flops: float = 0.0, note: str = "") -> None:
        try:
            ms = statistics.median(time_fn(fn, device, args.warmup_micro, args.repeats_micro)) * 1e3
        except Exception as exc:  # one piece failing must not stop the others
            rows.append((name, float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"))
            return
        if flops:
            note = f"{flops / ms / 1e9:.0f} TFLOP/s" + (f"; {note}" if note else "")
        rows.append((name, ms, note))

    for piece in (_micro_attention, _micro_expression, _micro_projections, _micro_mix, _micro_fp8_sdpa):
        piece(cfg, args, device, tokens, randn, record, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _backends(device: torch.device) -> list[str]:
    return ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"] if device.type == "cuda" else ["exact", "sdpa_math"]


def _micro_attention(cfg, args, device, tokens, randn, record, rows) -> None:
    """Self-attention with v a strided slice of the fused q/k/v output or contiguous; cross-attention."""
    h, c = cfg.num_heads, cfg.dim
    d = c // h
    q, k = randn(1, tokens, h, d), randn(1, tokens, h, d)
    v_slice = randn(1, tokens, 3 * c)[..., 2 * c :].unflatten(-1, (h, d))
    v_cont = v_slice.contiguous()
    flops = 4.0 * tokens * tokens * c
    record("self-attention, v strided (qkv slice)", lambda: attention(q, k, v_slice), flops)
    record("self-attention, v contiguous", lambda: attention(q, k, v_cont), flops)
    for keys in (cfg.text_len, cfg.clip_tokens):
        ck, cv = randn(1, keys, h, d), randn(1, keys, h, d)
        for name in _backends(device):
            fn = lambda name=name, ck=ck, cv=cv: attention(q, ck, cv, backend=name)  # noqa: E731
            record(f"cross-attention over {keys} keys, {name}", fn, 4.0 * tokens * keys * c)


def _micro_expression(cfg, args, device, tokens, randn, record, rows) -> None:
    """frames groups of tokens/frames queries over 97 keys: one batched call per backend."""
    h, c = cfg.num_heads, cfg.dim
    d = c // h
    per = tokens // args.frames
    grouped = randn(args.frames, per, h, d)
    ek, ev = randn(args.frames, EXPRESSION_TOKENS, h, d), randn(args.frames, EXPRESSION_TOKENS, h, d)
    flops = 4.0 * per * args.frames * EXPRESSION_TOKENS * c
    for name in [None, *_backends(device)]:
        record(f"expression attention, {name or 'auto'}",
               lambda name=name: attention(grouped, ek, ev, backend=name), flops)  # fmt: skip

    def explicit():
        scores = torch.einsum("gqhd,gkhd->ghqk", grouped, ek).float() * d**-0.5
        return torch.einsum("ghqk,gkhd->gqhd", scores.softmax(-1).to(grouped.dtype), ev)

    record("expression attention, explicit matmuls", explicit, flops)


def _micro_projections(cfg, args, device, tokens, randn, record, rows) -> None:
    """q/k/v as one matmul or three; FFN first layer with GELU in the epilogue or not."""
    c = cfg.dim
    x = randn(tokens, c)
    w, bias = randn(3 * c, c, std=c**-0.5), randn(3 * c, std=0.05)
    (wq, wk, wv), (bq, bk, bv) = w.chunk(3), bias.chunk(3)
    flops = 2.0 * tokens * c * 3 * c
    record("q/k/v, one matmul", lambda: F.linear(x, w, bias), flops)
    record(
        "q/k/v, three matmuls", lambda: (F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)), flops
    )
    first = torch.nn.Linear(c, cfg.ffn_dim, device=device, dtype=x.dtype)
    with torch.no_grad():
        first.weight.copy_(randn(cfg.ffn_dim, c, std=c**-0.5))
        first.bias.copy_(randn(cfg.ffn_dim, std=0.05))
        flops = 2.0 * tokens * c * cfg.ffn_dim
        record("FFN in + GELU(tanh), separate", lambda: F.gelu(first(x), approximate="tanh"), flops)
        record("FFN in + GELU(tanh), cuBLASLt epilogue", lambda: dit_blocks._linear_gelu(first, x), flops)
        rows_checked = x[:4096]
        want = F.gelu(
            rows_checked.double() @ first.weight.double().T + first.bias.double(), approximate="tanh"
        )
        errors = (rel(F.gelu(first(rows_checked), approximate="tanh"), want),
                  rel(dit_blocks._linear_gelu(first, rows_checked), want))  # fmt: skip
    note = f"{errors[0]:.2e} / {errors[1]:.2e}"
    rows.append(("  GELU error vs float64: separate / epilogue", float("nan"), note))


def _micro_mix(cfg, args, device, tokens, randn, record, rows) -> None:
    """The expression renormalisation + output projection: reference, fast (and torch.compile of the
    reference renormalisation)."""
    out, emo = randn(1, tokens, cfg.dim), randn(1, tokens, cfg.dim, std=0.3)
    ip = torch.ones(1, device=device)
    o = dit_blocks.CastLinear(cfg.dim, cfg.dim, device=device, dtype=out.dtype)
    with torch.no_grad():
        record("expression mix + o projection, reference", lambda: _mix_unfused(o, out, emo, ip))
        record("expression mix + o projection, fast", lambda: dit_blocks._mix_and_project(o, out, emo, ip))
        want = _mix_unfused(copy.deepcopy(o).double(), out.double(), emo.double(), ip.double())
        errors = (
            rel(_mix_unfused(o, out, emo, ip), want),
            rel(dit_blocks._mix_and_project(o, out, emo, ip), want),
        )
    note = f"{errors[0]:.2e} / {errors[1]:.2e}"
    rows.append(("  mix + o error vs float64: reference / fast", float("nan"), note))
    if args.compile_mix:
        compiled = torch.compile(dit_blocks._mix_expression, dynamic=False)
        record("expression mix, torch.compile of the reference", lambda: compiled(out, emo, ip))


def _micro_fp8_sdpa(cfg, args, device, tokens, randn, record, rows) -> None:
    """Whether PyTorch's cuDNN SDPA takes fp8 inputs in this build (4096 tokens)."""
    if device.type != "cuda":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, c = cfg.num_heads, cfg.dim
    q8, k8, v8 = (randn(1, h, 4096, c // h).to(torch.float8_e4m3fn) for _ in range(3))

    def fp8_sdpa():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q8, k8, v8)

    record("fp8 cuDNN SDPA probe (4096 tokens)", fp8_sdpa, 4.0 * 4096 * 4096 * c)


# ---------------------------------------------------------------------------------------- model


def model_inputs(cfg: DiTConfig, args, device: torch.device, batch: int, shared: bool) -> dict:
    """A window's inputs; batch 2 = the fast default's two guidance passes (ip_scale 1 and 0, the same
    prompt). shared: every per-pass input `expand`ed from one row, as the sampler passes them."""
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    f, h, w = args.frames, args.height // VAE_STRIDE, args.width // VAE_STRIDE

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    one = dict(
        x=randn(1, cfg.in_dim - 20, f, h, w),
        y=randn(1, 20, f, h, w),
        t=torch.full((1,), 937.5, device=device),
        clip_fea=randn(1, cfg.clip_tokens, cfg.clip_dim, dtype=dt),
        emo_proj=randn(1, f, EXPRESSION_TOKENS, cfg.emo_dim, dtype=dt),
    )
    context = randn(1, min(args.text_tokens, cfg.text_len), cfg.text_dim, dtype=dt)
    if shared:
        rows = {k: v.expand(batch, *v.shape[1:]) for k, v in one.items()}
    else:
        rows = {k: torch.cat([v] * batch) for k, v in one.items()}
    scales = torch.tensor([1.0, 0.0] * (batch // 2) + [1.0] * (batch % 2), device=device)
    # The prompt is materialised per pass, as the sampler's context is.
    return dict(rows, context=torch.cat([context] * batch), ip_scale=scales)


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("_rmsnorm_rope_kernel", "_residual_norm_kernel", "_quantize_kernel")):
        return "fused glue (Triton)"
    if any(s in n for s in ("fmha", "flash", "sdpa", "attention", "attn")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "gemv")):
        return "matmul"
    if any(s in n for s in ("conv", "implicit")):
        return "conv"
    if "reduce" in n or "norm" in n:
        return "reductions / norms (PyTorch)"
    if any(s in n for s in ("copy", "memcpy", "memset", "cat", "fill")):
        return "copies"
    if any(s in n for s in ("elementwise", "vectorized", "unrolled")):
        return "elementwise (PyTorch)"
    return "other"


def profile_forward(fn: Callable[[], object], out_dir: Path | None, label: str, device: torch.device) -> dict:
    """One forward under torch.profiler: device time per kernel kind, kernel count, wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    begin = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - begin
    kinds: dict[str, float] = {}
    count = 0
    averages = prof.key_averages()
    for evt in averages:
        if device.type == "cuda" and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if device.type != "cuda":
            us = evt.self_cpu_time_total
        if not us:
            continue
        kinds[kernel_kind(evt.key)] = kinds.get(kernel_kind(evt.key), 0.0) + us / 1e6
        count += evt.count
    if out_dir is not None:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            table = averages.table(sort_by=sort, row_limit=60, max_name_column_width=110)
        except Exception:  # column names moved between torch versions
            table = averages.table(row_limit=60, max_name_column_width=110)
        (out_dir / f"profile_{label}.txt").write_text(table)
    return {"wall_s": wall, "kinds_s": kinds, "kernels": count}


def set_variant(model: WanDiT, variant: dict) -> None:
    """Switch the model's path and the bench's ablations (restored by passing {})."""
    model.fast_path = variant.get("fast")
    kernels.set_default_backend(variant.get("kernels"))
    dit_blocks._linear_gelu = variant.get("linear_gelu", ORIGINAL["linear_gelu"])
    dit_blocks._mix_and_project = variant.get("mix", ORIGINAL["mix"])


ORIGINAL = {"linear_gelu": dit_blocks._linear_gelu, "mix": dit_blocks._mix_and_project}


def _mix_unfused(linear, x, emo, ip_scale):
    """The reference renormalisation, then the projection (the fast path before `_mix_and_project`)."""
    return linear(dit_blocks._mix_expression(x, emo, ip_scale))


def _gelu_unfused(linear, h):
    return F.gelu(linear(h), approximate="tanh")


def model_part(cfg: DiTConfig, args, device: torch.device, out_dir: Path | None) -> dict:
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    begin = time.perf_counter()
    model = random_dit(cfg, seed=args.seed, dtype=dt, device=device)
    sync(device)
    print(f"model built in {time.perf_counter() - begin:.1f}s", flush=True)
    tokens = args.frames * (args.height // 16) * (args.width // 16)
    results: dict = {"variants": [], "profiles": {}, "errors": {}}
    outputs: dict[str, torch.Tensor] = {}
    unfused = {"linear_gelu": _gelu_unfused, "mix": _mix_unfused}
    b1 = model_inputs(cfg, args, device, 1, shared=False)
    b2s = model_inputs(cfg, args, device, 2, shared=True)
    b2 = model_inputs(cfg, args, device, 2, shared=False)
    plan = [
        ("reference path (kernels not wired)", {"fast": False}, b1, 1, "ref"),
        (
            "fast: fused q/k/v matmul, PyTorch glue",
            {"fast": True, "kernels": "torch", **unfused},
            b1,
            1,
            None,
        ),
        ("+ Triton fused norm/RoPE/modulation/residual", {"fast": True, **unfused}, b1, 1, None),
        ("+ GELU in the matmul epilogue", {"fast": True, "mix": _mix_unfused}, b1, 1, None),
        ("+ expression renormalisation folded into o (all changes)", {"fast": True}, b1, 1, "fast"),
        ("fast, batch 2 (guidance passes, shared inputs expanded)", {"fast": True}, b2s, 2, "fast_b2"),
        ("fast, batch 2 (same values, nothing shared)", {"fast": True}, b2, 2, None),
    ]
    if args.variants:
        plan = [p for i, p in enumerate(plan) if str(i) in args.variants.split(",")]
    profile_labels = {"ref", "fast"}

    def run(label, variant, inputs, batch, key, fp8=False):
        set_variant(model, variant)
        last: dict[str, torch.Tensor] = {}

        def fn():
            last["out"] = model(**inputs)

        with torch.inference_mode():
            try:
                times = time_fn(fn, device, args.warmup, args.repeats)
                if key is not None:
                    outputs[key] = last["out"].float()
                if key in profile_labels and args.profile:
                    prof = profile_forward(fn, out_dir, key, device)
                    results["profiles"][key] = prof
                    print_profile(key, prof, flop_budget(cfg, 1, args.frames, tokens), fp8=fp8)
            except Exception as exc:
                print(f"{label}: {type(exc).__name__}: {exc}", flush=True)
                set_variant(model, {})
                return
        set_variant(model, {})
        flops = sum(flop_budget(cfg, batch, args.frames, tokens, shared_first=batch > 1).values())
        row = {"label": label, "batch": batch, "fp8": fp8, "times": times, "median": statistics.median(times),
               "tflops": flops / statistics.median(times) / 1e12}  # fmt: skip
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        results["variants"].append(row)
        print(f"{label}: median {row['median']:.3f}s {row['times']}", flush=True)

    for label, variant, inputs, batch, key in plan:
        run(label, variant, inputs, batch, key)
    if "ref" in outputs and "fast" in outputs:
        results["errors"]["fast bf16 vs reference bf16 (velocity)"] = rel(outputs["fast"], outputs["ref"])
    if "fast_b2" in outputs and "fast" in outputs:
        results["errors"]["batch-2 pass 0 vs batch-1"] = rel(outputs["fast_b2"][:1], outputs["fast"])

    if args.fp8:
        begin = time.perf_counter()
        with torch.no_grad():
            converted = model.convert_to_fp8(args.fp8_layers)
        sync(device)
        print(f"fp8 ({args.fp8_layers}): {len(converted)} layers quantised in "
              f"{time.perf_counter() - begin:.1f}s", flush=True)  # fmt: skip
        profile_labels.add("fp8")
        run(f"fp8 {args.fp8_layers} linears, fast, batch 1", {"fast": True}, b1, 1, "fp8", fp8=True)
        run(
            f"fp8 {args.fp8_layers} linears, fast, batch 2 (shared inputs)",
            {"fast": True},
            b2s,
            2,
            "fp8_b2",
            fp8=True,
        )
        if "fp8" in outputs and "ref" in outputs:
            results["errors"]["fp8 vs reference bf16 (velocity)"] = rel(outputs["fp8"], outputs["ref"])
            results["errors"]["fp8 vs fast bf16 (velocity)"] = rel(outputs["fp8"], outputs["fast"])
    if args.graph and device.type == "cuda":  # on the last model (fp8 unless --no-fp8), warm already
        results["graph"] = graph_replay(model, b1, device, outputs.get("fp8" if args.fp8 else "fast"))
        print(f"CUDA graph: {results['graph']}", flush=True)
    return results


def graph_replay(model: WanDiT, inputs: dict, device: torch.device, eager: torch.Tensor | None) -> dict:
    """Capture one fast forward in a CUDA graph (fails if anything synchronises with the host), time
    its replays, and compare its output with the eager forward's."""
    model.fast_path = True
    try:
        with torch.inference_mode():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(**inputs)
            replay = time_fn(graph.replay, device, 0, 2)
            result = {"captured": True, "replay_s": replay}
            if eager is not None:
                result["rel_diff_vs_eager"] = rel(out.float(), eager)
        del graph
        return result
    except Exception as exc:
        return {"captured": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        model.fast_path = None


# ---------------------------------------------------------------------------------------- report


def print_profile(label: str, prof: dict, flops: dict, fp8: bool) -> None:
    wall = prof["wall_s"]
    busy = sum(prof["kinds_s"].values())
    print(f"\nprofile {label}: wall {wall:.3f}s (profiler on), kernels {prof['kernels']}, "
          f"device busy {busy:.3f}s ({100 * busy / wall:.1f}%)")  # fmt: skip
    attn_flops = flops["self_attention"] + flops["cross_attention"] + flops["expression_attention"]
    gemm_ceiling = CEILING_TFLOPS["fp8_gemm" if fp8 else "bf16_gemm"]
    floors = {"attention": attn_flops / CEILING_TFLOPS["attention"] / 1e12,
              "matmul": flops["linear"] / gemm_ceiling / 1e12}  # fmt: skip
    print("| kernel kind | s | % of busy | FLOP-counted floor s | achieved TFLOP/s |")
    print("|---|---|---|---|---|")
    for kind, s in sorted(prof["kinds_s"].items(), key=lambda kv: -kv[1]):
        floor = floors.get(kind)
        work = {"attention": attn_flops, "matmul": flops["linear"]}.get(kind)
        print(f"| {kind} | {s:.3f} | {100 * s / busy:.1f} | {f'{floor:.3f}' if floor else '-'} | "
              f"{f'{work / s / 1e12:.0f}' if work else '-'} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (tests this script)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--parts", default="micro,model", help="comma-separated: micro, model")
    parser.add_argument("--variants", default=None, help="indices of the model plan to run (default all)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-micro", type=int, default=2)
    parser.add_argument("--repeats-micro", type=int, default=5)
    parser.add_argument("--no-fp8", dest="fp8", action="store_false")
    parser.add_argument("--fp8-layers", default=DEFAULT_FP8_LAYERS, choices=sorted(DIT_FP8_LAYER_SETS))
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-graph", dest="graph", action="store_false")
    parser.add_argument("--compile-mix", action="store_true", help="also time torch.compile of the mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for profiler tables and results.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --tiny to run on the CPU", file=sys.stderr)
        return 2
    args.frames = args.frames or (5 if args.tiny else 51)
    args.height = args.height or (64 if args.tiny else 512)
    args.width = args.width or (64 if args.tiny else 512)
    cfg = tiny_config() if args.tiny else DiTConfig.wan_i2v_14b()
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, {gpu}"
    )
    parts = set(args.parts.split(","))
    results: dict = {"args": vars(args)}
    rows = []
    if "micro" in parts:
        rows = micro(cfg, args, device)
        results["micro"] = rows
    if "model" in parts:
        results["model"] = model_part(cfg, args, device, out_dir)
    if out_dir is not None:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))

    if rows:
        print("\n| piece (one block, full size) | ms | note |\n|---|---|---|")
        for name, ms, note in rows:
            print(f"| {name} | {'-' if ms != ms else f'{ms:.3f}'} | {note} |")
    if "model" in results:
        m = results["model"]
        print("\n| forward | batch | median s | TFLOP/s | peak GiB |\n|---|---|---|---|---|")
        for r in m["variants"]:
            peak = r.get("peak_gib", float("nan"))
            print(f"| {r['label']} | {r['batch']} | {r['median']:.3f} | {r['tflops']:.0f} | {peak:.1f} |")
        for name, value in m["errors"].items():
            print(f"relative L2, {name}: {value:.3e}")
        if "graph" in m:
            print(f"CUDA graph: {m['graph']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

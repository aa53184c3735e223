"""Peak GPU memory and speed of each memory mode for one 512x512 fast-mode request at full size.

Every model is built once, directly on the GPU, with random weights (`flashportrait.sampling.
random_models`; the 14B DiT never exists on the host): DiT, Wan VAE, CLIP, TAEHV decoder and portrait
encoder as the sampler holds them, plus umT5-XXL (5.7B) and the PD-FGC motion encoder, which the
`components` option also moves. Then for each mode (`flashportrait.memory`), applied in place and
undone afterwards (fp8 modes last: the conversion is not undone):

- text encoding (umT5-XXL, 2 prompts x 512 tokens) and motion encoding (16 face crops), as a request
  needs them;
- the sampler's request: 81 driving frames = 21 latent frames = ONE window of 21 latent frames
  (context_size 21), 4 StepDistill steps with the 2 guidance passes batched (2 x 21,504 tokens),
  conditioning (Wan VAE encode of 81 frames, CLIP) and tiny-VAE decoding of the 80 output frames.
  A single 21-frame window keeps the activations small enough for a 24 GB card; the default 51-frame
  windows (2.5x the tokens) are what bench/sampler.py measures;
- the same request with the caching allocator capped (`torch.cuda.set_per_process_memory_fraction`)
  at 47 GiB and 23 GiB: a 48 GB and a 24 GB card, less about 1 GiB for the CUDA context, cuBLAS
  workspaces and kernels, which the allocator does not see. A mode that does not fit shows OOM.

Columns: GPU memory held by weights after the mode is applied, peak allocated and reserved during the
request (weights included), seconds for text and motion encoding, the sampler's conditioning, the
mean DiT window-step, the whole request, and the output frames' mean absolute difference from the
resident run (uint8 levels: 0 means bit-identical, the fp8 modes differ by fp8 rounding).

    python3 bench/memory_modes.py --modes resident,components,blockwise,components+blockwise   # H200, ~5 min
    python3 bench/memory_modes.py --modes fp8,fp8+components,fp8+blockwise,fp8+components+blockwise
    python3 bench/memory_modes.py --tiny --device cpu                # CPU smoke test of every mode

Needs torch, numpy and pillow and this repository only (run from the repository root).
Exit status 0 when every run finished (or hit OOM only under a cap) with finite frames.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from flashportrait.memory import MEMORY_MODES, MemoryMode, apply_memory_mode
from flashportrait.models.motion_encoder import PD_FGC, MotionEncoder
from flashportrait.models.t5 import UMT5_XXL, T5EncoderConfig, build_umt5_encoder
from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler, randomize
from flashportrait.sampling.sampler import GenerationProgress, GenerationRequest, VideoChunk

GIB = 2**30
CAPS = {"none": None, "48GB": 47.0, "24GB": 23.0}  # allocator caps in GiB (module docstring)
TINY_T5 = T5EncoderConfig(vocab_size=512, hidden_dim=16, attn_dim=16, ffn_dim=32, num_heads=2, num_layers=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, SimpleNamespace]:
    """(sampler, every model as `apply_memory_mode` targets them), all on `device`."""
    sizes = SamplerSizes.tiny() if tiny else SamplerSizes.release()
    sampler = random_sampler(sizes, mode="fast", device=device, dtype=dtype)
    with torch.device("meta"):
        motion = MotionEncoder(PD_FGC)
    text = randomize(build_umt5_encoder(TINY_T5 if tiny else UMT5_XXL), seed=11, device=device, dtype=dtype)
    motion = randomize(motion, seed=12, device=device, dtype=torch.float32)
    with torch.no_grad():  # batch-norm statistics of an untrained network: identity
        for name, buffer in motion.named_buffers():
            buffer.fill_(1.0 if name.endswith("running_var") else 0.0)
    target = SimpleNamespace(dit=sampler.dit, vae=sampler.vae, clip=sampler.clip, decoder=sampler.decoder,
                             portrait_encoder=sampler.portrait_encoder,
                             text_encoder=SimpleNamespace(encoder=text), motion_encoder=motion)  # fmt: skip
    return sampler, target


def make_request(sampler: Any, size: int, latent_frames: int) -> GenerationRequest:
    rng = np.random.default_rng(0)
    frames = 4 * (latent_frames - 1) + 1
    return GenerationRequest(
        image=rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8),
        features=rng.standard_normal((frames, sampler.portrait_encoder.cfg.feature_dim), dtype=np.float32),
        prompt_embeds=torch.from_numpy(
            rng.standard_normal((12, sampler.dit.config.text_dim), dtype=np.float32)
        ),
        params=GenerationParams(max_size=size, context_size=latent_frames, context_overlap=0, seed=0),
        request_id="bench-memory",
    )


@torch.no_grad()
def run_request(sampler: Any, target: SimpleNamespace, request: GenerationRequest, tiny: bool) -> dict:
    device = sampler.device
    text, motion = target.text_encoder.encoder, target.motion_encoder
    started = time.perf_counter()
    ids = torch.randint(0, text.config.vocab_size, (2, 512), device=device)
    text(ids, torch.ones_like(ids))
    sync(device)
    text_s = time.perf_counter() - started
    mark = time.perf_counter()
    crops = torch.rand(4 if tiny else 16, 3, PD_FGC.input_size, PD_FGC.input_size, device=device) * 2 - 1
    motion(crops)
    sync(device)
    motion_s = time.perf_counter() - mark
    mark = time.perf_counter()
    chunks, steps, conditioning = [], [], float("nan")
    for event in sampler.generate(request):
        if isinstance(event, VideoChunk):
            chunks.append(event.frames)
        elif isinstance(event, GenerationProgress):
            if event.window is None:
                conditioning = event.unit_s
            else:
                steps.append(event.unit_s)
    sync(device)
    frames = np.concatenate(chunks)
    return {"text_s": text_s, "motion_s": motion_s, "conditioning_s": conditioning,
            "step_s": statistics.mean(steps), "request_s": time.perf_counter() - mark,
            "total_s": time.perf_counter() - started, "frames": frames}  # fmt: skip


def cap_memory(device: torch.device, cap_gib: float | None) -> None:
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def gib(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"


def memory_stats(device: torch.device) -> tuple[float, float, float]:
    """(allocated now, peak allocated, peak reserved) in GiB; NaN on the CPU."""
    if device.type != "cuda":
        return float("nan"), float("nan"), float("nan")
    return (torch.cuda.memory_allocated(device) / GIB, torch.cuda.max_memory_allocated(device) / GIB,
            torch.cuda.max_memory_reserved(device) / GIB)  # fmt: skip


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


HEADER = (
    *("mode", "card", "status", "weights on GPU GiB", "peak alloc GiB", "peak reserved GiB", "setup s"),
    *("text s", "motion s", "conditioning s", "DiT window-step s", "request s", "diff vs resident"),
)


def measure(sampler, target, request, mode: str, caps: list[str], reference, tiny: bool, setup_s: float,
            state: Any = None):  # fmt: skip
    """One mode under each cap: prints a row per cap; returns (ok, frames of the uncapped run)."""
    device = sampler.device
    weights, _, _ = memory_stats(device)
    ok, frames_out = True, None
    for cap in caps:
        cap_memory(device, CAPS[cap])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result = run_request(sampler, target, request, tiny)
        except torch.cuda.OutOfMemoryError:
            if state is not None and state.streamer is not None:  # a block prefetched by the failed call
                state.streamer.release_all()
            gc.collect()
            _, peak, reserved = memory_stats(device)
            row(mode, cap, "OOM", gib(weights), gib(peak), gib(reserved), f"{setup_s:.1f}", *["-"] * 6)
            ok = ok and cap != "none"
            continue
        finally:
            cap_memory(device, None)
        _, peak, reserved = memory_stats(device)
        frames = result["frames"]
        finite = frames.size > 0
        diff = "-" if reference is None else f"{np.abs(frames.astype(np.int16) - reference).mean():.3f}"
        row(mode, cap, "ok" if finite else "EMPTY", gib(weights), gib(peak), gib(reserved), f"{setup_s:.1f}",
            f"{result['text_s']:.2f}", f"{result['motion_s']:.2f}", f"{result['conditioning_s']:.2f}",
            f"{result['step_s']:.2f}", f"{result['request_s']:.1f}", diff)  # fmt: skip
        ok = ok and finite
        if cap == "none":
            frames_out = frames
    return ok, frames_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models, 32x32, 5 latent frames (CPU smoke test)"
    )
    parser.add_argument("--modes", default=",".join(MEMORY_MODES), help="comma-separated memory modes")
    parser.add_argument("--caps", default="none,48GB,24GB", help=f"memory caps, from {list(CAPS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = [MemoryMode.parse(m).name for m in args.modes.split(",") if m.strip()]
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    if unknown := [c for c in caps if c not in CAPS]:
        parser.error(f"unknown caps {unknown}; choose from {list(CAPS)}")
    if device.type != "cuda":
        caps = ["none"]  # the caps emulate smaller GPUs
    # bf16 modes first, the fp8 ones after the (irreversible) conversion.
    modes = sorted(dict.fromkeys(modes), key=lambda m: MemoryMode.parse(m).fp8)
    size, latent_frames = (32, 5) if args.tiny else (512, 21)

    print(f"# command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, {gpu}, {str(dtype).removeprefix('torch.')}", flush=True)
    started = time.perf_counter()
    sampler, target = build(args.tiny, device, dtype)
    sync(device)
    dit_params = sum(p.numel() for p in sampler.dit.parameters()) / 1e9
    text_params = sum(p.numel() for p in target.text_encoder.encoder.parameters()) / 1e9
    built = time.perf_counter() - started
    print(f"# models built in {built:.0f} s: DiT {dit_params:.2f}B, umT5 {text_params:.2f}B parameters; "
          f"request {size}x{size}, {4 * (latent_frames - 1) + 1} driving frames = one window of "
          f"{latent_frames} latent frames, fast mode (4 steps x 2 guidance passes)", flush=True)  # fmt: skip
    request = make_request(sampler, size, latent_frames)
    print()
    row(*HEADER)
    row(*["---"] * len(HEADER))
    ok, reference = measure(sampler, target, request, "resident", ["none"], None, args.tiny, 0.0)
    for mode in modes:
        if mode == "resident" and caps == ["none"]:
            continue
        mark = time.perf_counter()
        state = apply_memory_mode(target, mode, device)
        sync(device)
        setup_s = time.perf_counter() - mark
        mode_caps = [c for c in caps if not (mode == "resident" and c == "none")]
        good, _ = measure(sampler, target, request, mode, mode_caps, reference, args.tiny, setup_s, state)
        ok = ok and good
        state.close()  # resident again (the fp8 conversion stays)
        del state
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

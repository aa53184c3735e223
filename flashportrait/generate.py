"""`flashportrait generate`: animate a portrait with a driving video into an MP4 file, locally, no server.

    flashportrait generate --image portrait.png --video driving.mp4 --out result.mp4 --weights WEIGHTS

The whole product pipeline in one process: the face front end turns the driving video into per-frame
expression features (frames without a face take the nearest face frame's features), the text encoder
encodes the prompt, the streaming sampler generates, and each chunk of frames is written as soon as
it is ready, at the driving video's exact frame rate, with its audio carried over (`media_writer.py`).
The output has find_replacement(N) - 1 frames for N driving frames, as the reference script writes.

WEIGHTS is a weights folder in the release layout (`flashportrait.components`); the demo weights
(`python -m flashportrait.export.demo_weights --out DIR`) run everything on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

WEIGHTS_ENV = "FLASHPORTRAIT_WEIGHTS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image", required=True, type=Path, help="the portrait to animate (any image PIL reads)"
    )
    parser.add_argument("--video", required=True, type=Path, help="the driving video (a face)")
    parser.add_argument("--out", required=True, type=Path, help="the MP4 file to write")
    parser.add_argument(
        "--weights",
        type=Path,
        default=os.environ.get(WEIGHTS_ENV),
        help=f"weights folder (default ${WEIGHTS_ENV})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--fast", dest="mode", action="store_const", const="fast", help="4-step distilled (default)"
    )
    mode.add_argument(
        "--quality", dest="mode", action="store_const", const="quality", help="30-step Euler, Wan VAE"
    )
    parser.set_defaults(mode="fast")
    parser.add_argument("--steps", type=int, help="denoising steps (quality mode; default 30)")
    parser.add_argument("--scheduler", choices=["step_distill", "euler", "unipc", "dpmpp"])
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--max-size", type=int, help="longer side of the portrait after resizing (default 512)"
    )
    parser.add_argument("--emo-cfg-scale", type=float)
    parser.add_argument("--text-cfg-scale", type=float)
    parser.add_argument("--ip-scale", type=float)
    parser.add_argument("--context-size", type=int, help="latent frames per window (default 51)")
    parser.add_argument("--context-overlap", type=int, help="latent frames shared by windows (default 30)")
    parser.add_argument("--shift", type=float)
    parser.add_argument("--prompt", help="text prompt (default: the reference script's)")
    parser.add_argument("--negative-prompt", help="used when --text-cfg-scale is not 1")
    parser.add_argument(
        "--max-frames", type=int, default=0, help="use at most this many driving frames (0: all)"
    )
    parser.add_argument("--no-audio", action="store_true", help="do not carry the driving video's audio over")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--memory",
        default="resident",
        help="memory mode: resident (default), or a '+'-joined combination of fp8, components and "
        "blockwise, e.g. fp8+blockwise for 24 GB cards (flashportrait.memory)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="split each DiT call over this many GPUs of this host (sequence parallelism; "
        "with --device cpu: as many CPU processes)",
    )


def run(args: argparse.Namespace, *, sampler_hook: Callable[[Any], None] | None = None) -> int:
    """The command; `sampler_hook(sampler)` is called once the sampler exists (the multi-GPU driver
    attaches sequence parallelism with it)."""
    from flashportrait.components import MissingWeightsError
    from flashportrait.config import ConfigError
    from flashportrait.face.errors import FaceFrontEndError
    from flashportrait.sampling.params import GenerationError
    from flashportrait.weights import CheckpointError, CheckpointMismatchError

    user_errors = (
        GenerationError,  # parameters, image, features
        FaceFrontEndError,  # unreadable driving video, no face
        MissingWeightsError,
        ConfigError,
        CheckpointError,
        CheckpointMismatchError,
    )
    if getattr(args, "gpus", 1) < 1:
        return _fail(f"--gpus must be >= 1, got {args.gpus}")
    if getattr(args, "gpus", 1) > 1:
        from flashportrait.parallel.generate import run_parallel

        return run_parallel(args)
    try:
        return _generate(args, sampler_hook)
    except user_errors as exc:
        return _fail(str(exc))


def _fail(message: str) -> int:
    print(f"flashportrait generate: error: {message}", file=sys.stderr)
    return 2


def _params(args: argparse.Namespace):
    from flashportrait.sampling.params import GenerationParams

    values = {
        "mode": args.mode,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "max_size": args.max_size,
        "emo_cfg_scale": args.emo_cfg_scale,
        "text_cfg_scale": args.text_cfg_scale,
        "ip_scale": args.ip_scale,
        "context_size": args.context_size,
        "context_overlap": args.context_overlap,
        "shift": args.shift,
    }
    return GenerationParams.from_mapping({k: v for k, v in values.items() if v is not None})


def _generate(args: argparse.Namespace, sampler_hook: Callable[[Any], None] | None = None) -> int:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from flashportrait.face.pipeline import FaceFrontEnd, FaceFrontEndConfig
    from flashportrait.face.warp import encoder_input
    from flashportrait.media_writer import VideoWriter
    from flashportrait.memory import MemoryMode, load_components_for
    from flashportrait.sampling.params import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, GenerationError
    from flashportrait.sampling.sampler import GenerationProgress, GenerationRequest, Sampler, VideoChunk

    params = _params(args)  # bad parameters fail before anything is loaded
    memory = MemoryMode.parse(getattr(args, "memory", "resident"))
    if args.weights is None:
        raise GenerationError(f"no weights folder: pass --weights DIR or set ${WEIGHTS_ENV}")
    if args.max_frames < 0:
        raise GenerationError(f"--max-frames must be >= 0, got {args.max_frames}")
    try:
        with Image.open(args.image) as opened:
            image = np.array(opened.convert("RGB"))  # the reference: PIL, converted to RGB
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise GenerationError(f"cannot read the image {args.image}: {exc}") from exc

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    log = _Log(args.quiet)
    log(
        f"loading {args.mode} models from {args.weights} on {device} ({str(dtype).removeprefix('torch.')}, "
        f"memory mode {memory})"
    )
    components, _ = load_components_for(
        args.weights, memory=memory, mode=args.mode, device=device, dtype=dtype
    )

    log(f"tracking the face in {args.video}")
    front = FaceFrontEnd(
        FaceFrontEndConfig(
            detector_model=str(components.face.detector),
            landmark_model=str(components.face.landmarks),
            max_frames=args.max_frames,
        )
    )
    motion = components.motion_encoder

    @torch.no_grad()
    def encode_crops(crops: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(encoder_input(crops)).to(device)
        return motion(x).concatenated().float().cpu().numpy()

    driving = front.extract_features(args.video, encode_crops)
    faceless = int((~driving.mask).sum())
    log(f"{driving.frame_count} driving frames at {driving.info.fps} fps, {faceless} without a face (filled)")

    with torch.no_grad():
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
        negative = args.negative_prompt if args.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
        prompt_embeds, negative_embeds = components.text_encoder.encode([prompt, negative])
    request = GenerationRequest(
        image=image,
        features=driving.features,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        params=params,
        fps=driving.info.fps,
    )
    sampler = Sampler.from_components(components)
    if sampler_hook is not None:
        sampler_hook(sampler)
    audio = None if args.no_audio or driving.info.audio is None else args.video
    writer: VideoWriter | None = None
    started = time.monotonic()
    try:
        for event in sampler.generate(request):
            if isinstance(event, VideoChunk):
                if writer is None:
                    _, height, width, _ = event.frames.shape
                    fps = Fraction(driving.info.fps)
                    # Output frame 0 is driven by driving frame 1: the audio starts one frame in.
                    writer = VideoWriter(
                        args.out, width, height, fps, audio_source=audio, audio_offset=1 / fps
                    )
                    log(f"first frames after {time.monotonic() - started:.1f} s")
                writer.write(event.frames)
            elif isinstance(event, GenerationProgress):
                log.progress(event)
        if writer is None:
            raise GenerationError("no frame was generated")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.close()
            args.out.unlink(missing_ok=True)  # no half-written file that looks like a result
        raise
    log(f"wrote {writer.frames_written} frames to {args.out} in {time.monotonic() - started:.1f} s")
    return 0


class _Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def progress(self, event) -> None:
        if event.window is None:
            self(f"conditioning ready ({event.unit_s:.1f} s); {event.units_total} window-steps to run")
        else:
            self(
                f"window {event.window} step {event.step}: "
                f"{event.units_done}/{event.units_total} window-steps, "
                f"{event.frames_emitted}/{event.frames_total} frames ({event.unit_s:.2f} s)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashportrait generate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

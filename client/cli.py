"""`flashportrait animate`: animate a portrait with a driving video through a Triton server.

    flashportrait animate --image portrait.png --video driving.mp4 --out result.mp4 [--url HOST:PORT]

Uploads the media, streams the frames back and writes each chunk as it arrives, at the driving video's
exact frame rate, with the driving audio muxed in (`flashportrait.media_writer`); shows a progress
line (window/step, frames written, time to first frame). Ctrl-C cancels the request on the server
and keeps the frames written so far. Without `--url` a local server is started for the run (the
embedded default) with the weights of `--weights` or `$FLASHPORTRAIT_WEIGHTS`. By default the
cancellable path is used (features and text first, then the sampler); `--ensemble` sends everything
to the `flashportrait` ensemble in one call (not cancellable in Triton 2.51).

Exit status: 0 written, 1 the server refused or failed the request, 2 bad arguments, 130 cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

PARAMETER_FLAGS = {
    "steps": int,
    "scheduler": str,
    "seed": int,
    "max_size": int,
    "emo_cfg_scale": float,
    "text_cfg_scale": float,
    "ip_scale": float,
    "context_size": int,
    "context_overlap": int,
    "shift": float,
    "alp_interval": int,
    "alp_order": int,
}
DEFAULT_PROMPT = "The girl is singing"  # the reference script's (flashportrait.sampling.params)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, type=Path, help="the portrait (PNG, JPEG, WebP)")
    parser.add_argument("--video", required=True, type=Path, help="the driving video (a face)")
    parser.add_argument("--out", required=True, type=Path, help="the MP4 file to write")
    parser.add_argument("--url", help="gRPC HOST:PORT of a running server (default: start a local one)")
    parser.add_argument(
        "--weights",
        type=Path,
        default=os.environ.get("FLASHPORTRAIT_WEIGHTS") or None,
        help="weights folder for the local server (default $FLASHPORTRAIT_WEIGHTS); unused with --url",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--negative-prompt", default="", help="used when --text-cfg-scale is not 1")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="mode", action="store_const", const="fast", help="4-step distilled mode")
    mode.add_argument("--quality", dest="mode", action="store_const", const="quality", help="30-step mode")
    parser.set_defaults(mode=None)
    for name, kind in PARAMETER_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"generation {name}")
    parser.add_argument(
        "--alp",
        action="store_const",
        const=True,
        default=None,
        help="Adaptive Latent Prediction (many-step quality mode): run the DiT every --alp-interval steps",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other request parameter (model_repository/README.md), sent as text; repeatable",
    )
    parser.add_argument("--ensemble", action="store_true", help="one call to the flashportrait ensemble")
    parser.add_argument("--no-audio", action="store_true", help="do not mux the driving video's audio")
    parser.add_argument("--request-id", default=None, help="request id (default: random)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the features/text calls")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def generation_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The request parameters given on the command line (the server applies defaults to the rest)."""
    values = {name: getattr(args, name) for name in PARAMETER_FLAGS}
    values["mode"] = args.mode
    values["alp"] = args.alp
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--param takes NAME=VALUE, got {item!r}")
        values[name.strip()] = value.strip()
    return {name: value for name, value in values.items() if value is not None}


def _fail(message: str, status: int) -> int:
    print(f"flashportrait animate: error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _server_url(args: argparse.Namespace, say) -> Iterator[str]:
    if args.url:
        yield args.url
        return
    from flashportrait.serving.local import local_server

    say(f"starting a local Triton server with the weights in {args.weights} (first start takes longer)")
    with local_server(args.weights, mode=args.mode) as server:
        say(f"local server ready at {server.grpc_url}")
        yield server.grpc_url


def run(args: argparse.Namespace) -> int:
    for path in (args.image, args.video):
        if not path.is_file():
            return _fail(f"{path} does not exist", 2)
    if not args.url and args.weights is None:
        return _fail(
            "no --url and no weights: pass --url HOST:PORT for a running server, or --weights DIR (or set "
            "$FLASHPORTRAIT_WEIGHTS) to start a local one; `flashportrait demo` writes demo weights",
            2,
        )
    from flashportrait.client.client import RequestFailed
    from flashportrait.client.progress import ProgressLine

    from flashportrait.serving.repository import RepositoryError
    from flashportrait.serving.server import ServerStartError
    from flashportrait.serving.triton_env import TritonNotFoundError

    try:
        generation_parameters(args)
    except ValueError as error:
        return _fail(str(error), 2)
    line = ProgressLine(enabled=not args.quiet)
    try:
        with _server_url(args, line.message) as url:
            return animate(url, args, line)
    except RequestFailed as error:
        line.finish()
        return _fail(str(error), 1)
    except (ServerStartError, TritonNotFoundError, RepositoryError) as error:
        line.finish()
        return _fail(str(error), 1)
    except KeyboardInterrupt:
        line.finish()
        print("flashportrait animate: interrupted", file=sys.stderr)
        return 130


def _probe_fps(video: Path) -> Fraction | None:
    from flashportrait.face.video import VideoReader

    try:
        with VideoReader(video) as reader:
            return reader.info.fps
    except Exception:
        return None


def animate(url: str, args: argparse.Namespace, line) -> int:
    """Stream one generation from the server at `url` into `args.out`; the exit status."""
    from flashportrait.client.client import FlashPortraitClient, FramesChunk, GenerationCancelled

    from flashportrait.media_writer import VideoWriter

    started = time.monotonic()
    image, video = args.image.read_bytes(), args.video.read_bytes()
    parameters = generation_parameters(args)
    with FlashPortraitClient(url, timeout_s=args.timeout) as client:
        generation, driving = client.animate(
            image, video, args.prompt, args.negative_prompt, parameters, args.ensemble, args.request_id
        )
    fps = driving.fps if driving is not None else None
    if driving is not None:
        faceless = int((~driving.face_mask).sum())
        line.message(
            f"driving video: {driving.frame_count} frames at {driving.fps} fps, {faceless} without a face; "
            f"streaming request {generation.request_id} from {url}"
        )
    writer: VideoWriter | None = None
    first_frame_s: float | None = None
    written = 0
    total = 0
    try:
        for event in generation:
            progress = event.progress if isinstance(event, FramesChunk) else event
            total = progress.frames_total
            if isinstance(event, FramesChunk):
                if writer is None:
                    first_frame_s = time.monotonic() - started
                    fps = fps or progress.fps or _probe_fps(args.video) or Fraction(25)
                    _, height, width, _ = event.frames.shape
                    audio = None if args.no_audio else args.video
                    # Output frame 0 is driven by driving frame 1 (the reference drops frame 0): the
                    # audio starts one frame in.
                    writer = VideoWriter(
                        args.out, width, height, fps, audio_source=audio, audio_offset=1 / fps
                    )
                writer.write(event.frames)
                written = event.frame_stop
            line.update(progress, written, first_frame_s, time.monotonic() - started)
    except KeyboardInterrupt:
        generation.cancel()
        _close(writer)
        line.message(
            f"cancelled request {generation.request_id} on the server; "
            f"{written} frames were written to {args.out}"
        )
        return 130
    except GenerationCancelled:
        _close(writer)
        return 130
    except BaseException:
        _close(writer)
        raise
    if writer is None:
        return _fail(f"request {generation.request_id}: the server sent no frames", 1)
    writer.close()
    if written != total:
        return _fail(f"request {generation.request_id}: {written} of {total} frames arrived", 1)
    audio_note = "with the driving audio" if writer.has_audio else "no audio"
    line.message(
        f"wrote {args.out}: {written} frames, {writer.width}x{writer.height} at {writer.fps} fps, "
        f"{audio_note}; "
        f"first frame after {first_frame_s:.1f} s, done in {time.monotonic() - started:.1f} s"
    )
    return 0


def _close(writer) -> None:
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()

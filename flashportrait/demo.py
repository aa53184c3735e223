"""`flashportrait demo --out OUT.mp4`: the whole product on this machine, in a few minutes on a CPU.

1. Media: the packaged portrait (`assets/demo/portrait.jpg`, the Mona Lisa's face, see its README)
   and a synthetic driving video made from it: the head sways and breathes in scale over
   `--frames` frames at 25 fps, with a quiet synthetic tone as its audio track (so audio muxing is
   exercised). `--image` / `--video` use your files instead.
2. Weights: the tiny demo weights in the release's file layout (`flashportrait.export.demo_weights`),
   written once to `<cache>/demo_weights/` (or `--weights DIR`).
3. `flashportrait animate` on a local Triton server started for the run (the embedded default), or on
   `--url`: face tracking with the real face models, features, text, streamed sampling, MP4 written
   at the driving video's exact rate with its audio.

The demo weights are random: the output is a playable video of moving colour fields at the
portrait's size, not an animated portrait. It shows that every part runs for real.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from fractions import Fraction
from importlib import resources
from pathlib import Path

import numpy as np

DEMO_FPS = Fraction(25)
AUDIO_RATE = 24000
_READY = "READY"


def demo_portrait_bytes() -> bytes:
    """The packaged demo portrait (JPEG bytes, 256x320)."""
    return (resources.files("flashportrait") / "assets" / "demo" / "portrait.jpg").read_bytes()


def sway_frames(portrait_rgb: np.ndarray, frames: int) -> list[np.ndarray]:
    """[H, W, 3] uint8 RGB -> `frames` frames in which the picture rotates by up to 4 degrees, scales by
    up to 4% and shifts by a few pixels (one cycle), edges reflected so no border appears."""
    import cv2

    height, width, _ = portrait_rgb.shape
    out = []
    for index in range(frames):
        phase = 2 * math.pi * index / max(frames, 1)
        matrix = cv2.getRotationMatrix2D(
            (width / 2, height * 0.45), 4.0 * math.sin(phase), 1.0 + 0.04 * math.sin(2 * phase)
        )
        matrix[0, 2] += 6.0 * math.sin(phase)
        matrix[1, 2] += 3.0 * math.cos(phase)
        out.append(cv2.warpAffine(portrait_rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT))
    return out


def tone(seconds: float, rate: int = AUDIO_RATE) -> np.ndarray:
    """[1, S] float32 mono: a soft 220 Hz tone with a slow swell (amplitude <= 0.2)."""
    t = np.arange(round(seconds * rate), dtype=np.float64) / rate
    envelope = 0.1 + 0.1 * np.sin(2 * math.pi * 0.5 * t) ** 2
    return (envelope * np.sin(2 * math.pi * 220.0 * t)).astype(np.float32)[None]


def write_driving_video(
    path: Path, frames: list[np.ndarray], fps: Fraction = DEMO_FPS, audio: bool = True
) -> None:
    """Frames [H, W, 3] uint8 RGB -> an H.264 MP4 at exactly `fps`, with `tone` as AAC audio."""
    import av

    height, width, _ = frames[0].shape
    with av.open(str(path), mode="w") as container:
        # Every stream is added before the first packet is muxed (that writes the header).
        video = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "fast"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = 1 / fps
        sound = container.add_stream("aac", rate=AUDIO_RATE, layout="mono") if audio else None
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = index
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        if sound is not None:
            samples = tone(len(frames) / float(fps))
            size = sound.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], size):
                block = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples[:, start : start + size]), format="fltp", layout="mono"
                )
                block.sample_rate, block.pts = AUDIO_RATE, start
                container.mux(sound.encode(block))
            container.mux(sound.encode(None))


def make_demo_media(folder: Path, frames: int) -> tuple[Path, Path]:
    """Write the demo portrait and its driving video into `folder`: (image path, video path)."""
    import cv2

    image_path = folder / "portrait.jpg"
    image_path.write_bytes(demo_portrait_bytes())
    portrait = cv2.imdecode(np.frombuffer(image_path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    video_path = folder / "driving.mp4"
    write_driving_video(video_path, sway_frames(np.ascontiguousarray(portrait), frames))
    return image_path, video_path


def demo_weights(folder: Path | None = None) -> Path:
    """The demo weights folder, written on first use (`<cache>/demo_weights/seed0` by default)."""
    from flashportrait.export.demo_weights import write_demo_weights
    from flashportrait.serving.triton_env import user_cache_dir

    folder = folder or user_cache_dir() / "demo_weights" / "seed0"
    if (folder / _READY).is_file():
        return folder
    staging = folder.parent / f".{folder.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    write_demo_weights(staging, seed=0)
    (staging / _READY).write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="the MP4 file to write")
    parser.add_argument("--image", type=Path, help="your portrait instead of the demo's")
    parser.add_argument("--video", type=Path, help="your driving video instead of the synthetic one")
    parser.add_argument("--weights", type=Path, help="weights folder (default: demo weights in the cache)")
    parser.add_argument("--url", help="gRPC HOST:PORT of a running server (default: start a local one)")
    parser.add_argument("--frames", type=int, default=49, help="frames of the synthetic driving video")
    parser.add_argument("--max-size", type=int, default=256, help="longer side of the output (default 256)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from flashportrait.client import cli as animate_cli

    if args.frames < 5:
        print("flashportrait demo: error: --frames must be at least 5", file=sys.stderr)
        return 2
    say = (lambda _text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="flashportrait-demo-") as scratch:
        image, video = args.image, args.video
        if image is None or video is None:
            made_image, made_video = make_demo_media(Path(scratch), args.frames)
            image, video = image or made_image, video or made_video
            say(f"demo media: portrait {image.name}, driving video of {args.frames} frames at {DEMO_FPS} fps")
        weights = args.weights
        if weights is None and not args.url:
            weights = demo_weights()
            say(f"demo weights: {weights}")
        parser = argparse.ArgumentParser(prog="flashportrait animate")
        animate_cli.add_arguments(parser)
        argv = ["--image", str(image), "--video", str(video), "--out", str(args.out)]
        argv += ["--max-size", str(args.max_size), "--seed", str(args.seed)]
        # Windows of 4 latent frames overlapping by 2: several windows even for a short clip, so the
        # first frames stream back while later windows are still being denoised.
        argv += ["--context-size", "4", "--context-overlap", "2"]
        if args.url:
            argv += ["--url", args.url]
        if weights is not None:
            argv += ["--weights", str(weights)]
        if args.quiet:
            argv.append("--quiet")
        status = animate_cli.run(parser.parse_args(argv))
    if status == 0:
        say(f"done: play {args.out} (random demo weights: colour fields, not a portrait)")
    return status

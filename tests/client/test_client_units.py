"""The client library and command lines without a server: response parsing, the progress line,
command-line parameters and errors, and the demo's synthetic media (through the real face detector)."""

from __future__ import annotations

import argparse
import io
from fractions import Fraction
from importlib import resources
from pathlib import Path

import av
import numpy as np
import pytest
from flashportrait.client import cli as animate_cli
from flashportrait.client.client import FramesChunk, Progress, parse_response
from flashportrait.client.progress import ProgressLine, format_progress

from flashportrait.demo import DEMO_FPS, make_demo_media, sway_frames
from flashportrait.face import FaceFrontEnd, FaceFrontEndConfig


def response(frame_start: int, frames: int, units_done: int = 5, window: int = 1, step: int = 0) -> dict:
    def scalar(value: int) -> np.ndarray:
        return np.array([value], dtype=np.int64)

    return {
        "FRAME_START": scalar(frame_start),
        "FRAMES": np.zeros((frames, 32, 48, 3), np.uint8),
        "FRAMES_TOTAL": scalar(40),
        "UNITS_DONE": scalar(units_done),
        "UNITS_TOTAL": scalar(20),
        "WINDOW": scalar(window),
        "STEP": scalar(step),
        "NUM_STEPS": scalar(4),
        "FPS": np.array([30000, 1001], dtype=np.int64),
    }


def test_responses_parse_into_frames_chunks_and_progress() -> None:
    chunk = parse_response(response(8, 4))
    assert isinstance(chunk, FramesChunk)
    assert (chunk.frame_start, chunk.frame_stop, chunk.frames.shape) == (8, 12, (4, 32, 48, 3))
    assert chunk.progress.frames_sent == 12 and chunk.progress.fps == Fraction(30000, 1001)
    progress = parse_response(response(8, 0))
    assert isinstance(progress, Progress)
    assert (progress.num_windows, progress.frames_sent, progress.frames_total) == (5, 8, 40)
    unknown_rate = response(0, 0)
    unknown_rate["FPS"] = np.array([0, 1], dtype=np.int64)
    assert parse_response(unknown_rate).fps is None


def test_progress_line_shows_window_step_frames_and_first_frame() -> None:
    progress = parse_response(response(8, 0, units_done=9, window=1, step=2))
    line = format_progress(progress, 8, 3.24, 8.06)
    assert (
        line
        == "window 2/5 step 3/4 [#########-----------]  45% | 8/40 frames written | first frame 3.2 s | 8.1 s"
    )
    start = parse_response(response(0, 0, units_done=0, window=-1, step=-1))
    assert format_progress(start, 0, None, None).startswith("conditioning [--------------------]   0% | 0/40")
    stream = io.StringIO()
    bar = ProgressLine(stream)
    for elapsed in (1.0, 2.0):  # only the elapsed time changed: one line
        bar.update(progress, 8, 3.24, elapsed)
    bar.update(parse_response(response(8, 0, units_done=10, window=2)), 8, 3.24, 3.0)
    bar.message("done")
    assert stream.getvalue().splitlines()[0].endswith("| 1.0 s") and len(stream.getvalue().splitlines()) == 3
    silent = io.StringIO()
    ProgressLine(silent, enabled=False).update(progress, 8, None, 1.0)
    assert silent.getvalue() == ""


def parse_animate(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    animate_cli.add_arguments(parser)
    return parser.parse_args(["--image", "i.png", "--video", "v.mp4", "--out", "o.mp4", *argv])


def test_only_the_generation_parameters_given_are_sent() -> None:
    assert animate_cli.generation_parameters(parse_animate()) == {}
    args = parse_animate(
        "--quality", "--steps", "12", "--seed", "3", "--emo-cfg-scale", "2.5", "--max-size", "96"
    )
    assert animate_cli.generation_parameters(args) == {
        "mode": "quality",
        "steps": 12,
        "seed": 3,
        "emo_cfg_scale": 2.5,
        "max_size": 96,
    }
    extra = parse_animate("--param", "alp=true", "--param", "progress = false")
    assert animate_cli.generation_parameters(extra) == {"alp": "true", "progress": "false"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        animate_cli.generation_parameters(parse_animate("--param", "alp"))


def test_animate_without_a_server_or_weights_says_what_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("FLASHPORTRAIT_WEIGHTS", raising=False)
    image, video = tmp_path / "i.png", tmp_path / "v.mp4"
    image.write_bytes(b"x")
    video.write_bytes(b"x")
    args = parse_animate()
    args.image, args.video = image, video
    assert animate_cli.run(args) == 2
    assert "pass --url HOST:PORT for a running server, or --weights DIR" in capsys.readouterr().err
    args.image = tmp_path / "missing.png"
    assert animate_cli.run(args) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_demo_media_has_a_face_in_every_frame_and_exact_rate_with_audio(tmp_path: Path) -> None:
    image_path, video_path = make_demo_media(tmp_path, 25)
    with av.open(str(video_path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.average_rate == DEMO_FPS and audio.sample_rate == 24000
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video)]
    assert len(frames) == 25
    assets = resources.files("flashportrait") / "assets" / "face"
    front = FaceFrontEnd(
        FaceFrontEndConfig(str(assets / "face_det.onnx"), str(assets / "face_landmark.onnx"))
    )
    # The default demo clip's motion (49 frames, one sway cycle) at every 4th frame, plus the written clip.
    portrait = np.ascontiguousarray(front_image(image_path))
    cycle = [frame[..., ::-1] for frame in sway_frames(portrait, 49)[::4]]
    aligned = front.align_frames([*frames, *[np.ascontiguousarray(f) for f in cycle]])
    assert aligned.mask.all(), np.flatnonzero(~aligned.mask)
    assert np.abs(frames[0].astype(int) - frames[6].astype(int)).mean() > 2  # the head moves


def front_image(path: Path) -> np.ndarray:
    """The portrait as [H, W, 3] uint8 RGB."""
    from PIL import Image

    with Image.open(path) as opened:
        return np.array(opened.convert("RGB"))

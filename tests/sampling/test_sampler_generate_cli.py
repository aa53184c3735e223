"""`flashportrait generate` end to end on the CPU: demo weights in the release layout, real driving clips
cut short, the face pipeline, the text encoder, the streaming sampler and the MP4 writer."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import pytest

from flashportrait.cli import main
from flashportrait.face.video import VideoReader
from flashportrait.sampling.windows import find_replacement

# Small and fast: 64 px portrait (8x8 latents), windows of 7 latent frames overlapping by 3.
FAST = ["--max-size", "64", "--context-size", "7", "--context-overlap", "3", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from flashportrait.export.demo_weights import write_demo_weights

    return write_demo_weights(tmp_path_factory.mktemp("weights")).root


@pytest.fixture(scope="module")
def portrait(shared_dir) -> Path:
    return shared_dir / "data" / "reference" / "liveportrait_s5.jpg"


def _read(path: Path) -> tuple[int, Fraction, Fraction | None]:
    """(frames, fps, audio duration or None)."""
    with VideoReader(path) as video:
        count = sum(1 for _ in video)
        audio = video.info.audio
        return count, video.info.fps, None if audio is None else audio.duration


def _cut(source: Path, target: Path, frames: int, rate: Fraction) -> None:
    """The first `frames` frames of `source` re-encoded at `rate`, without audio."""
    with VideoReader(source) as video, av.open(str(target), "w") as out:
        stream = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = video.info.width, video.info.height, "yuv420p"
        for index, frame in enumerate(video):
            if index == frames:
                break
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode(None))


def test_real_clip_with_audio(weights, portrait, shared_dir, tmp_path):
    driving = shared_dir / "data" / "driving" / "liveportrait_d12.mp4"  # 25 fps, AAC stereo
    out = tmp_path / "result.mp4"
    code = main(["generate", "--image", str(portrait), "--video", str(driving), "--out", str(out),
                 "--weights", str(weights), "--max-frames", "11", *FAST])  # fmt: skip
    assert code == 0
    frames, fps, audio = _read(out)
    assert frames == find_replacement(11) - 1 == 8
    assert fps == 25
    assert audio == Fraction(frames, 25)  # the driving audio, trimmed to the output
    with av.open(str(out)) as container:
        picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert picture.shape == (64, 64, 3) and picture.std() > 1  # not a blank frame


def test_exact_rational_frame_rate_without_audio(weights, portrait, shared_dir, tmp_path):
    driving = tmp_path / "ntsc.mp4"
    _cut(shared_dir / "data" / "driving" / "liveportrait_d0.mp4", driving, 14, Fraction(30000, 1001))
    out = tmp_path / "result.mp4"
    code = main(["generate", "--image", str(portrait), "--video", str(driving), "--out", str(out),
                 "--weights", str(weights), "--quality", "--steps", "2", *FAST])  # fmt: skip
    assert code == 0
    frames, fps, audio = _read(out)
    assert frames == find_replacement(14) - 1 == 12
    assert fps == Fraction(30000, 1001) and audio is None


def test_user_errors_are_messages_not_tracebacks(weights, portrait, shared_dir, tmp_path, capsys):
    driving = shared_dir / "data" / "driving" / "liveportrait_d0.mp4"
    base = ["generate", "--image", str(portrait), "--video", str(driving), "--out", str(tmp_path / "x.mp4")]
    assert main([*base, "--weights", str(tmp_path / "nowhere"), *FAST]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main([*base, "--weights", str(weights), "--steps", "500", *FAST]) == 2
    assert "steps must be between 1 and 100" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "missing.png"), *base[3:], "--weights", str(weights), *FAST]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()

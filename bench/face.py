"""Time per frame of the driving-video front end (decode, detect, 222 landmarks x3 refinements, warp),
and optionally of the exported motion encoder and the memory of a long clip.

    python bench/face.py --clips ../shared/data/driving/liveportrait_d{0,13}.mp4
    python bench/face.py --clips artifacts/face_bench/*.mp4 --provider cuda --encoder --long-seconds 60

`--provider cuda` uses ONNX Runtime's CUDA execution provider when `onnxruntime-gpu` is installed and
says so (falling back to the CPU otherwise). The face models default to the package's copies
(`flashportrait/assets/face/`). Clips are needed (a face must be in them): on the device machine,
copy them under an ignored folder and carry it, e.g. `artifacts/face_bench/`.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "flashportrait" / "assets" / "face"


def _ensure_export_package() -> None:
    """`flashportrait.export` is the top-level `export/` folder (setup.py maps it); make it importable
    when the repository is used from a checkout without being installed."""
    import importlib.util

    try:
        importlib.import_module("flashportrait.export")
    except ModuleNotFoundError:
        folder = REPO / "export"
        spec = importlib.util.spec_from_file_location(
            "flashportrait.export", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["flashportrait.export"] = module
        spec.loader.exec_module(module)


class Stopwatch:
    """Seconds spent inside wrapped callables, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def _peak_rss_reset() -> None:
    # Linux: reset the high-water mark so the next reading covers only what follows
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def _timed(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def bench_front_end(front_end, clip: Path, frames: int) -> dict:
    from itertools import islice

    from flashportrait.face.video import VideoReader

    result: dict = {"clip": clip.name}
    with VideoReader(clip) as video, _timed(result, "decode_s"):
        decoded = list(islice(video, frames)) if frames else list(video)
        info = video.info
    result.update(frames=len(decoded), size=f"{info.width}x{info.height}", fps=str(info.fps))
    watch = Stopwatch()
    detector, landmarks = front_end.detector, front_end.landmarks
    original_detect, original_net = detector.detect, landmarks.net
    detector.detect = watch.wrap("detect", original_detect)
    landmarks.net = watch.wrap("landmark_net", original_net)
    try:
        front_end.align_frames(decoded[:2])  # warm-up (CUDA kernels, arenas)
        watch.seconds.clear()
        with _timed(result, "align_s"):
            aligned = front_end.align_frames(decoded, info)
    finally:
        detector.detect, landmarks.net = original_detect, original_net
    n = len(decoded)
    result["faces"] = int(aligned.mask.sum())
    result["ms_decode"] = 1000 * result["decode_s"] / n
    result["ms_detect"] = 1000 * watch.seconds.get("detect", 0.0) / n
    result["ms_landmarks"] = 1000 * watch.seconds.get("landmark_net", 0.0) / n
    result["ms_rest"] = 1000 * result["align_s"] / n - result["ms_detect"] - result["ms_landmarks"]
    result["ms_total"] = 1000 * (result["decode_s"] + result["align_s"]) / n
    return result


def bench_long_clip(front_end, clip: Path, seconds: int, encoder) -> dict:
    """Loop `clip` into a `seconds`-long video at its own rate, then time and measure extract_features."""
    import av

    from flashportrait.face.video import VideoReader

    with VideoReader(clip) as video:
        source = list(video)
        rate = video.info.fps
    count = int(seconds * rate)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.mp4"
        height, width = source[0].shape[:2]
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(count):
                for packet in stream.encode(
                    av.VideoFrame.from_ndarray(source[i % len(source)], format="bgr24")
                ):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        del source
        _peak_rss_reset()
        before = _peak_rss_mib()
        start = time.perf_counter()
        features = front_end.extract_features(path, encoder)
        elapsed = time.perf_counter() - start
        peak = _peak_rss_mib()
    return {
        "frames": features.frame_count,
        "faces": int(features.mask.sum()),
        "ms_per_frame": 1000 * elapsed / features.frame_count,
        "peak_rss_mib": peak,
        "rss_before_mib": before,
        "decoded_video_mib": count * height * width * 3 / 2**20,
    }


def bench_encoder(device: str, batches: list[int], repeats: int) -> list[dict]:
    import torch
    from flashportrait.export.motion_encoder import (
        FeatureExtractor,
        TensorRTUnavailable,
        _random_encoder,
        build_tensorrt_engine,
        export_onnx,
    )

    encoder = _random_encoder()
    rows = []
    crops = {b: np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8) for b in batches}
    module = FeatureExtractor(encoder).to(device).eval()
    for b in batches:
        x = torch.from_numpy(crops[b]).to(device)
        with torch.no_grad():
            module(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                module(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        rows.append(
            {
                "runtime": f"torch fp32 {device}",
                "batch": b,
                "ms_per_frame": 1000 * (time.perf_counter() - start) / repeats / b,
            }
        )
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(encoder, Path(folder) / "model.onnx")
        import onnxruntime as ort

        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device.startswith("cuda")
            else ["CPUExecutionProvider"]
        )
        providers = [p for p in providers if p in ort.get_available_providers()]
        for b in batches:
            session = ort.InferenceSession(str(path), providers=providers)
            session.run(None, {"CROPS": crops[b]})
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, {"CROPS": crops[b]})
            rows.append(
                {
                    "runtime": f"onnxruntime {session.get_providers()[0]}",
                    "batch": b,
                    "ms_per_frame": 1000 * (time.perf_counter() - start) / repeats / b,
                }
            )
        if device.startswith("cuda"):
            try:
                from flashportrait.export.motion_encoder import TensorRTFeatureExtractor

                plan = build_tensorrt_engine(
                    path,
                    Path(folder) / "model.plan",
                    min_batch=1,
                    opt_batch=max(batches),
                    max_batch=max(batches),
                )
                run = TensorRTFeatureExtractor(plan, device)
                for b in batches:
                    x = torch.from_numpy(crops[b]).to(device)
                    run(x)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(repeats):
                        run(x)
                    torch.cuda.synchronize()
                    rows.append(
                        {
                            "runtime": "tensorrt fp16",
                            "batch": b,
                            "ms_per_frame": 1000 * (time.perf_counter() - start) / repeats / b,
                        }
                    )
                reference = module(torch.from_numpy(crops[max(batches)]).to(device)).float()
                fp16 = run(torch.from_numpy(crops[max(batches)]).to(device))
                rel = float((fp16 - reference).norm() / reference.norm().clamp_min(1e-12))
                rows.append(
                    {
                        "runtime": f"tensorrt fp16 vs torch fp32: normwise rel err {rel:.3g}",
                        "batch": max(batches),
                        "ms_per_frame": float("nan"),
                    }
                )
            except TensorRTUnavailable as exc:
                rows.append(
                    {"runtime": f"tensorrt: {exc}".split(";")[0], "batch": 0, "ms_per_frame": float("nan")}
                )
            except Exception as exc:  # one shot on the device: report it and keep the other rows
                message = f"tensorrt failed: {type(exc).__name__}: {exc}"[:200]
                rows.append({"runtime": message, "batch": 0, "ms_per_frame": float("nan")})
    return rows


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", nargs="+", type=Path, required=True, help="driving videos with a face")
    parser.add_argument("--frames", type=int, default=0, help="first N frames of each clip (0: all)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (CPU)")
    parser.add_argument("--chunk", type=int, default=16, help="frames per detection/alignment batch")
    parser.add_argument(
        "--weights", type=Path, default=ASSETS, help="folder with face_det.onnx, face_landmark.onnx"
    )
    parser.add_argument("--encoder", action="store_true", help="also time the exported motion encoder")
    parser.add_argument("--encoder-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--long-seconds", type=int, default=0, help="also a looped clip this long: time and peak RSS"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(
        "command: python "
        + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *(argv or sys.argv[1:])])
    )
    try:
        import onnxruntime as ort

        from flashportrait.face.pipeline import FaceFrontEnd, FaceFrontEndConfig
    except ImportError as exc:
        print(f"error: the face front end needs onnxruntime, av, opencv and onnx: {exc}", file=sys.stderr)
        return 2
    providers = (
        ("CUDAExecutionProvider", "CPUExecutionProvider")
        if args.provider == "cuda"
        else ("CPUExecutionProvider",)
    )
    if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"note: onnxruntime {ort.__version__} has no CUDA execution provider here; running on the CPU")
    config = FaceFrontEndConfig(
        detector_model=str(args.weights / "face_det.onnx"),
        landmark_model=str(args.weights / "face_landmark.onnx"),
        providers=providers,
        intra_op_threads=args.threads,
        chunk_frames=args.chunk,
    )
    front_end = FaceFrontEnd(config)
    used = front_end.detector.session.get_providers()[0]
    print(f"onnxruntime {ort.__version__}, provider {used}, chunk {args.chunk}, threads {args.threads}")
    if args.long_seconds:  # first, so the peak RSS is not inflated by the clips decoded below

        def mean_encoder(crops):
            return np.repeat(crops.reshape(len(crops), -1).mean(1, keepdims=True), 554, 1)

        r = bench_long_clip(front_end, args.clips[0], args.long_seconds, mean_encoder)
        print(
            f"long clip {args.long_seconds} s from {args.clips[0].name}: {r['frames']} frames, "
            f"{r['faces']} with a face, {r['ms_per_frame']:.2f} ms/frame, "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"(before {r['rss_before_mib']:.0f} MiB; the decoded video is {r['decoded_video_mib']:.0f} MiB)"
        )
    header = ("clip", "size", "frames", "faces", "decode", "detect", "lmk x3", "rest", "total ms/frame")
    print(
        f"{header[0]:24} "
        + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (10, 6, 5, 7, 7, 7, 7, 15), strict=True))
    )
    for clip in args.clips:
        r = bench_front_end(front_end, clip, args.frames)
        print(
            f"{r['clip']:24} {r['size']:>10} {r['frames']:>6} {r['faces']:>5} {r['ms_decode']:7.2f} "
            f"{r['ms_detect']:7.2f} {r['ms_landmarks']:7.2f} {r['ms_rest']:7.2f} {r['ms_total']:15.2f}"
        )
    if args.encoder:
        import torch

        _ensure_export_package()
        device = "cuda" if args.provider == "cuda" and torch.cuda.is_available() else "cpu"
        print(f"motion encoder (random weights, full size), torch {torch.__version__} on {device}:")
        for row in bench_encoder(device, args.encoder_batches, args.repeats):
            print(f"  {row['runtime']:60} batch {row['batch']:>3} {row['ms_per_frame']:8.3f} ms/frame")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

"""End-to-end served benchmark: streaming requests to the `sampler` of a real Triton server (issue 7).

Starts `tritonserver` with a runtime repository holding only `sampler` (one instance: KIND_GPU on GPU 0,
or the CPU variant with `--device cpu`), every model built with random weights on the device
(`FLASHPORTRAIT_RANDOM_WEIGHTS=release`, or `tiny`: settings.py), waits until it is ready, and streams
requests over gRPC straight to `sampler` (`flashportrait.client`): random features [N, 554], random
prompt embeddings [20, text_dim], a random reference image of exactly the requested size (PNG), the
request's `mode` (fast by default). Measured on the client: time to first frame (first response with
frames), total time, frames received (must be find_replacement(N) - 1, each of the requested size),
output frames per second (frames / total) and after the first frame; from the server log: its own time
to first frame and the request's peak GPU memory (`torch.cuda.max_memory_allocated/reserved`, on the
sampler's end line); from `nvidia-smi` polled every 0.5 s: the GPU's peak memory used during the request.
Requests ask for progress responses (one per window-step, no frames), which gives the mean seconds per
window-step even for a request cut short; the first response with frames is the time to first frame.

Order: a small warm-up request (first kernel calls); a `--frames` request at the first size; the
`--long-frames` request at `--long-size`, cancelled by the client as soon as its first frame arrives
(its time to first frame and peak memory; the whole request would take hours); a small probe request
sent right after that cancel (one instance: its first response shows the instance is free again);
then `--frames` at the other sizes. Sizes are HEIGHTxWIDTH. A request is cancelled at
`--request-limit-s` ("over time", with what it had by then; the other sizes share what is left of the
budget instead), and nothing starts past the `--budget-s` deadline ("skipped"), so the run always ends.

    python3 bench/serve_e2e.py                                        # H200: 512x512, 3,000, 720x720, 480x832
    python3 bench/serve_e2e.py --sizes 512x512 --out /tmp/e2e         # + JSON results and the server log
    python3 bench/serve_e2e.py --tiny --device cpu                    # CPU smoke test: tiny models, 32 px

H200 estimates (bf16, 2 guidance passes batched, ~12 s per window-step at 512x512): 297 frames = 12
window-steps ~2.5 min at 512x512, ~2x tokens at 720x720 (~3x per step), ~1.5x at 480x832; the 3,000-frame
first frame needs 16 window-steps (~3.3 min). Trim `--sizes` to fit one run in the time you have.
Needs this repository, torch, numpy, pillow, tritonclient[grpc] and nvidia-pytriton (the tritonserver);
exit status 0 when no request failed (an over-time or skipped request is reported, not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _packaging_fallback() -> None:
    """tritonclient.grpc imports `packaging` (a grpc version check), which a bare torch environment may
    lack; setuptools and pip carry a copy as a top-level package in their `_vendor/` folders."""
    if importlib.util.find_spec("packaging") is not None:
        return
    for owner in ("setuptools", "pip"):
        spec = importlib.util.find_spec(owner)
        if spec is None or spec.origin is None:
            continue
        vendor = Path(spec.origin).parent / "_vendor"
        if (vendor / "packaging" / "version.py").is_file():
            sys.path.append(str(vendor))
            return


_packaging_fallback()

import numpy as np  # noqa: E402
from flashportrait.client.client import (  # noqa: E402
    FlashPortraitClient,
    FramesChunk,
    GenerationCancelled,
    RequestFailed,
)
from PIL import Image  # noqa: E402

from flashportrait.sampling.random_models import SamplerSizes  # noqa: E402
from flashportrait.sampling.windows import find_replacement, scaled_image_size  # noqa: E402
from flashportrait.serving.server import ServerOptions, ServerStartError, TritonServer  # noqa: E402
from flashportrait.serving.settings import (  # noqa: E402
    DEVICE_ENV,
    MODE_ENV,
    PRECISION_ENV,
    RANDOM_WEIGHTS_ENV,
)
from flashportrait.serving.triton_env import locate_triton, server_environment  # noqa: E402

SAMPLER_SOURCE = REPO / "model_repository" / "sampler"
INSTANCE_GROUP = re.compile(r"instance_group\s*\[[^\]]*\]")
MEMORY_NOTE = r"peak GPU memory ([\d.]+) GiB allocated, ([\d.]+) GiB reserved"
# Kept free at the end of the budget for cancelling, stopping the server and the table.
RESERVE_S = 25.0
MIN_REQUEST_S = 15.0
# The smallest request (5 driving frames -> 4 output frames, one window) at a small size, for the
# warm-up (first kernel calls: Triton JIT, cuDNN plans) and the probe after the cancel.
SMALL_FRAMES = 5


@dataclasses.dataclass
class Measurement:
    """One request as the client saw it (times in seconds from sending it), plus the server's notes."""

    name: str
    request_id: str
    height: int
    width: int
    driving_frames: int
    expected_frames: int
    status: str = "not run"
    frames_received: int = 0
    frames_total: int = 0
    shapes_ok: bool = True
    first_response_s: float | None = None
    ttff_s: float | None = None
    first_chunk_frames: int = 0
    total_s: float | None = None
    units_at_first_frame: int | None = None
    units_done: int = 0
    units_total: int | None = None
    step_s: float | None = None  # mean seconds per window-step after the conditioning (decodes included)
    server_ttff_s: float | None = None
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    smi_peak_gib: float | None = None
    note: str = ""
    sent_at: float = 0.0  # time.monotonic() when sent
    stopped_at: float | None = None  # time.monotonic() when the client cancelled it

    @property
    def output_fps(self) -> float | None:
        """Frames received per second since sending (None for a request stopped at its first frame)."""
        if self.status.startswith("stopped") or not (self.total_s and self.frames_received):
            return None
        return self.frames_received / self.total_s

    @property
    def fps_after_first(self) -> float | None:
        """Frames per second after the first chunk (the streaming rate once frames flow)."""
        later = self.frames_received - self.first_chunk_frames
        if self.ttff_s is None or self.total_s is None or later <= 0 or self.total_s <= self.ttff_s:
            return None
        return later / (self.total_s - self.ttff_s)

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed") or not self.shapes_ok


class GpuMemoryMonitor:
    """`nvidia-smi` memory.used of one GPU every `interval_s` in a thread; disabled without nvidia-smi."""

    def __init__(self, gpu: str, interval_s: float = 0.5) -> None:
        self.gpu = gpu
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic s, GiB)
        self.binary = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ask(self, fields: str) -> str | None:
        if self.binary is None:
            return None
        query = [self.binary, f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", self.gpu]
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
            return out.strip().splitlines()[0]
        except (subprocess.SubprocessError, OSError, IndexError):
            return None

    def query(self) -> float | None:
        """memory.used now, GiB."""
        try:
            return float(self._ask("memory.used") or "") / 1024
        except ValueError:
            return None

    def describe(self) -> str:
        return self._ask("name,memory.total,driver_version") or "no nvidia-smi"

    def start(self) -> None:
        if self.binary is None or self.query() is None:
            self.binary = None
            return
        self._thread = threading.Thread(target=self._run, name="nvidia-smi", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self.query()
            if value is not None:
                self.samples.append((time.monotonic(), value))

    def peak(self, start: float, stop: float) -> float | None:
        values = [gib for when, gib in list(self.samples) if start <= when <= stop]
        return max(values) if values else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def parse_size(text: str) -> tuple[int, int]:
    """ "HEIGHTxWIDTH" -> (height, width)."""
    height, _, width = text.strip().lower().partition("x")
    return int(height), int(width)


def sampler_config(device: str, kind: str) -> str:
    """The sampler's config text with exactly one instance: KIND_GPU on GPU 0, or KIND_CPU."""
    source = SAMPLER_SOURCE / ("configs/cpu.pbtxt" if device == "cpu" else "config.pbtxt")
    text = source.read_text()
    group = "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0 ] } ]"
    if kind == "cpu":
        group = "instance_group [ { kind: KIND_CPU count: 1 } ]"
    text, count = INSTANCE_GROUP.subn(group, text)
    if count != 1:
        raise RuntimeError(f"{source} has {count} instance_group entries, expected one")
    return text


def build_repository(root: Path, device: str, kind: str) -> Path:
    """`root/sampler/{config.pbtxt, 1/model.py}`: only the sampler, its adapter linked from the checkout."""
    model = root / "sampler"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(sampler_config(device, kind))
    (model / "1" / "model.py").symlink_to(SAMPLER_SOURCE / "1" / "model.py")
    return root


def libpython_dir() -> Path | None:
    """The folder of this interpreter's `libpython3.X.so.1.0`, which the Python stub links against.

    `triton_env` looks only at sysconfig's LIBDIR, which relocated builds (python-build-standalone, as
    uv installs it) report as their build-time path; the base prefix's `lib/` is where the file is.
    """
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    executable = Path(os.path.realpath(sys.executable))
    for folder in (
        sysconfig.get_config_var("LIBDIR"),
        Path(sys.base_prefix) / "lib",
        executable.parents[1] / "lib",
    ):
        if folder and (Path(folder) / name).is_file():
            return Path(folder)
    return None


def site_folders() -> list[str]:
    """The folders this interpreter imports torch and numpy from."""
    folders = []
    for name in ("torch", "numpy"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            folders.append(str(Path(spec.origin).resolve().parents[1]))
    return folders


def server_env(args: argparse.Namespace, kind: str) -> dict[str, str]:
    """What the server (and so the sampler's Python stub) gets on top of our environment."""
    libs = server_environment(locate_triton()).get("LD_LIBRARY_PATH", "")
    found = libpython_dir()
    if found is not None and str(found) not in libs.split(os.pathsep):
        libs = os.pathsep.join(p for p in (libs, str(found)) if p)
    # The stub imports flashportrait from this checkout (the GPU machine has no installed package), and
    # torch from where this interpreter has it, in case the stub does not recognise our venv.
    paths = [str(REPO), os.environ.get("PYTHONPATH", ""), *site_folders()]
    env = {
        "LD_LIBRARY_PATH": libs,
        RANDOM_WEIGHTS_ENV: "tiny" if args.tiny else "release",
        MODE_ENV: args.mode,
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p)),
    }
    if args.precision:
        env[PRECISION_ENV] = args.precision
    if args.device != "cpu" and kind == "cpu":
        env[DEVICE_ENV] = "cuda:0"  # a CPU-kind instance that still runs on GPU 0
    return env


def stub_report(env: dict[str, str]) -> str:
    """Which Python the stub will run and whether its shared libraries resolve (a diagnostic line)."""
    install = locate_triton()
    full = {**server_environment(install), **env}
    stub = install.backend_dir / "python" / "triton_python_backend_stub"
    python = shutil.which("python3", path=full["PATH"])
    line = f"tritonserver {install.binary} ({install.source}), stub {stub} for Python "
    line += f"{sys.version_info.major}.{sys.version_info.minor}, python3 on the server PATH: {python}"
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=full).stdout
        missing = [row.split()[0] for row in out.splitlines() if "not found" in row]
        line += f"; MISSING LIBRARIES: {missing}" if missing else "; stub libraries resolve"
    return line


@contextlib.contextmanager
def bench_server(args: argparse.Namespace, workdir: Path, deadline: float) -> Iterator[TritonServer]:
    """A ready server (see the module docstring); with `--instance-kind auto` on a GPU a failed start is
    retried once with a CPU-kind instance on cuda:0 (the same work, without Triton's GPU instance)."""
    kinds = {"gpu": ["gpu"], "cpu": ["cpu"], "auto": ["gpu", "cpu"]}[args.instance_kind]
    if args.device == "cpu":
        kinds = ["cpu"]
    for attempt, kind in enumerate(kinds):
        repo = build_repository(workdir / f"repository-{attempt}", args.device, kind)
        env = server_env(args, kind)
        try:
            print(f"# {stub_report(env)}", flush=True)
        except (OSError, RuntimeError, subprocess.SubprocessError) as problem:
            print(f"# no stub report: {problem}", flush=True)
        timeout = min(args.ready_timeout_s, max(deadline - RESERVE_S - time.monotonic(), 30.0))
        log_path = workdir / f"tritonserver-{attempt}.log"
        server = TritonServer(
            ServerOptions(model_repository=repo, ready_timeout_s=timeout, log_path=log_path, env=env)
        )
        started = time.monotonic()
        try:
            server.start()
        except ServerStartError as error:
            server.stop()
            # A start that ran out of time would only run out of time again.
            if attempt == len(kinds) - 1 or "was not ready after" in str(error):
                raise
            print(f"# start with a {kind.upper()}-kind instance failed, retrying:\n{error}", flush=True)
            continue
        try:
            print(
                f"# server ready after {time.monotonic() - started:.1f} s ({kind.upper()}-kind instance), "
                f"log {log_path}",
                flush=True,
            )
            yield server
        finally:
            server.stop()
        return


def log_match(server: TritonServer, pattern: str, timeout_s: float) -> re.Match[str] | None:
    """The first match of `pattern` in the server log, waiting up to `timeout_s` for it."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while True:
        found = regex.search(server.log_text())
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def png(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Bench:
    """Sends the requests to a ready server and records `Measurement`s."""

    def __init__(self, server: TritonServer, args: argparse.Namespace, deadline: float) -> None:
        self.server = server
        self.args = args
        self.deadline = deadline
        self.client = FlashPortraitClient(server.grpc_url)
        sizes = SamplerSizes.tiny() if args.tiny else SamplerSizes.release()
        self.text_dim = sizes.dit.text_dim
        self.monitor = GpuMemoryMonitor(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0")
        self.count = 0

    def available_s(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def measure(
        self,
        name: str,
        height: int,
        width: int,
        frames: int,
        *,
        stop_at_first_frame: bool = False,
        server_notes: bool = True,
        limit_s: float | None = None,
    ) -> Measurement:
        """Send one request and follow its stream (see the module docstring), cancelling it after
        `limit_s` (default `--request-limit-s`); `server_notes`: then read the sampler's end line (else
        call `server_notes` later)."""
        self.count += 1
        expected = find_replacement(frames) - 1
        out_w, out_h = scaled_image_size(width, height, max(height, width))
        result = Measurement(
            name, f"e2e{self.count}-{height}x{width}-{frames}", out_h, out_w, frames, expected
        )
        limit = min(limit_s or self.args.request_limit_s, self.available_s())
        if limit < min(MIN_REQUEST_S, self.args.request_limit_s):
            result.status = "skipped (time budget)"
            return result
        rng = np.random.default_rng(self.count)
        features = rng.standard_normal((frames, 554), dtype=np.float32)
        embeds = rng.standard_normal((self.args.prompt_tokens, self.text_dim), dtype=np.float32)
        image = png(height, width, self.count)
        parameters = {"mode": self.args.mode, "max_size": max(height, width), "seed": 7, "progress": True}
        over_time = threading.Event()
        started = result.sent_at = time.monotonic()
        try:
            generation = self.client.sample(
                image, features, embeds, parameters=parameters, request_id=result.request_id
            )
        except RequestFailed as error:
            result.status = f"failed: {error}"
            return result

        def cut() -> None:
            over_time.set()
            result.stopped_at = time.monotonic()
            generation.cancel()

        timer = threading.Timer(limit, cut)
        timer.start()
        try:
            for event in generation:
                now = time.monotonic() - started
                if result.first_response_s is None:
                    result.first_response_s = now
                progress = event.progress if isinstance(event, FramesChunk) else event
                result.units_total = progress.units_total
                result.frames_total = progress.frames_total
                if not isinstance(event, FramesChunk):
                    # Progress after each window-step; the first response is the conditioning's.
                    if event.units_done > 0:
                        result.units_done = event.units_done
                        result.step_s = (now - result.first_response_s) / event.units_done
                    continue
                _, chunk_h, chunk_w, _ = event.frames.shape
                result.shapes_ok = result.shapes_ok and (chunk_h, chunk_w) == (out_h, out_w)
                result.frames_received = event.frame_stop
                if result.ttff_s is None:
                    result.ttff_s = now
                    result.first_chunk_frames = int(event.frames.shape[0])
                    # The sampler sends a chunk before the progress of the window-step that made it
                    # final, so that step is not counted yet in the chunk's UNITS_DONE.
                    result.units_at_first_frame = min(progress.units_done + 1, progress.units_total)
                    if stop_at_first_frame:
                        result.stopped_at = time.monotonic()
                        generation.cancel()
                        result.status = "stopped at first frame"
                        break
            else:
                result.status = "ok"
        except GenerationCancelled:
            result.status = f"over time ({limit:.1f} s)" if over_time.is_set() else "cancelled"
        except RequestFailed as error:
            result.status = f"failed: {error}"
        finally:
            timer.cancel()
            result.total_s = time.monotonic() - started
        if result.status == "ok" and (result.frames_received != expected or result.frames_total != expected):
            result.status = f"failed: {result.frames_received} frames, expected {expected}"
        if server_notes:
            self.server_notes(result)
        return result

    def server_notes(self, result: Measurement, until: float | None = None) -> None:
        """Peak memory (and the server's time to first frame) from the sampler's end line; after a cancel
        this also waits until the sampler has stopped, so the next request starts on a free instance."""
        rid = re.escape(result.request_id)
        if result.status.startswith(("failed", "skipped")):
            found = None
        elif result.status == "ok":
            found = log_match(self.server, rf"request {rid}: done, .*", 30.0)
        else:
            wait = max(min(self.args.request_limit_s, self.available_s() + RESERVE_S / 2), 10.0)
            found = log_match(self.server, rf"request {rid}: stopped after .*", wait)
            if found is None:
                result.note = "the sampler had not logged its stop"
        if found is not None:
            memory = re.search(MEMORY_NOTE, found.group(0))
            if memory is not None:
                result.peak_allocated_gib = float(memory.group(1))
                result.peak_reserved_gib = float(memory.group(2))
            first = re.search(r"first frame after ([\d.]+) s", found.group(0))
            if first is not None:
                result.server_ttff_s = float(first.group(1))
        result.smi_peak_gib = self.monitor.peak(result.sent_at, until or time.monotonic())

    def probe_after_cancel(self, cancelled: Measurement, size: int) -> Measurement:
        """A small request sent right after `cancelled` was cancelled (one instance: it can only start
        once the sampler has stopped); its first response shows the instance is free again."""
        probe = self.measure("probe after the cancel", size, size, SMALL_FRAMES)
        if probe.first_response_s is not None and cancelled.stopped_at is not None:
            delay = probe.sent_at + probe.first_response_s - cancelled.stopped_at
            probe.note = f"first response {delay:.1f} s after the cancel"
        return probe


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[Measurement]) -> str:
    columns = {
        "request": lambda r: f"{r.name} ({r.height}x{r.width})",
        "frames recv / expected": lambda r: f"{r.frames_received} / {r.expected_frames}",
        "TTFF s (client)": lambda r: fmt(r.ttff_s, 2),
        "TTFF s (server)": lambda r: fmt(r.server_ttff_s, 2),
        "total s": lambda r: fmt(r.total_s, 2),
        "output fps": lambda r: fmt(r.output_fps),
        "fps after 1st frame": lambda r: fmt(r.fps_after_first),
        "window-steps at 1st frame": lambda r: (
            "-" if r.units_at_first_frame is None else f"{r.units_at_first_frame} / {r.units_total}"
        ),
        "window-steps done": lambda r: f"{r.units_done} / {r.units_total or '-'}",
        "s / window-step": lambda r: fmt(r.step_s, 2),
        "peak alloc GiB": lambda r: fmt(r.peak_allocated_gib),
        "peak reserved GiB": lambda r: fmt(r.peak_reserved_gib),
        "nvidia-smi peak GiB": lambda r: fmt(r.smi_peak_gib),
        "status": lambda r: (
            r.status + ("" if r.shapes_ok else ", WRONG FRAME SIZE") + (f"; {r.note}" if r.note else "")
        ),
    }
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in results]
    return "\n".join(rows)


def run(bench: Bench, args: argparse.Namespace, results: list[Measurement]) -> None:
    """The requests in the order of the module docstring, appended to `results` as they finish."""
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    long_size = parse_size(args.long_size) if args.long_size else sizes[0]

    def done(result: Measurement) -> None:
        # Each row as it finishes, so a run killed from outside still shows what it measured.
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)

    print("\n".join(table([]).splitlines()[:2]), flush=True)

    small = 32 if args.tiny else 64
    if args.warmup:
        done(bench.measure("warm-up", small, small, SMALL_FRAMES))
    for index, (height, width) in enumerate(sizes):
        # The first size gets the whole request limit; later ones share what is left of the budget, so
        # each at least shows its conditioning and window-step times.
        share = None if index == 0 else bench.available_s() / (len(sizes) - index)
        done(bench.measure(f"{args.frames} frames", height, width, args.frames, limit_s=share))
        if index == 0 and args.long_frames:
            name = f"{args.long_frames} frames, to 1st frame"
            long = bench.measure(
                name, *long_size, args.long_frames, stop_at_first_frame=True, server_notes=False
            )
            probe = None
            if long.status == "stopped at first frame":
                probe = bench.probe_after_cancel(long, small)
            bench.server_notes(long, until=probe.sent_at if probe is not None else None)
            done(long)
            if probe is not None:
                done(probe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", help="HEIGHTxWIDTH list (default 512x512,720x720,480x832; tiny 32x32,48x32)"
    )
    parser.add_argument("--frames", type=int, default=297, help="driving frames per request")
    parser.add_argument(
        "--long-frames", type=int, default=3000, help="long request, stopped at its 1st frame (0: none)"
    )
    parser.add_argument("--long-size", help="HEIGHTxWIDTH of the long request (default: the first size)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--instance-kind", choices=["auto", "gpu", "cpu"], default="auto")
    parser.add_argument("--mode", choices=["fast", "quality"], default="fast")
    parser.add_argument("--precision", choices=["bf16", "fp8"], help="default: the server's (bf16)")
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the small first request"
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run, server start included")
    parser.add_argument(
        "--request-limit-s", type=float, default=300.0, help="a request is cancelled after this"
    )
    parser.add_argument("--ready-timeout-s", type=float, default=420.0)
    parser.add_argument("--out", type=Path, help="folder for results.json and the server log")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ("32x32,48x32" if args.tiny else "512x512,720x720,480x832")
    start = time.monotonic()
    deadline = start + args.budget_s
    command = shlex.join(["python3", "bench/serve_e2e.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# command: {command}", flush=True)
    print(
        f"# random {'tiny' if args.tiny else 'release'} weights, {args.mode} mode, device {args.device}, "
        f"Python {sys.version.split()[0]}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="serve-e2e-"))
    results: list[Measurement] = []
    error: str | None = None
    random_logged = False
    try:
        with bench_server(args, workdir, deadline) as server:
            random_logged = log_match(server, r"RANDOM WEIGHTS", 5.0) is not None
            bench = Bench(server, args, deadline)
            monitor = bench.monitor
            monitor.start()
            shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else None
            print(
                f"# GPU {monitor.gpu}: {monitor.describe()} (name, MiB, driver); nvidia-smi after loading: "
                f"{fmt(monitor.query())} GiB used; /dev/shm {fmt(shm)} GiB",
                flush=True,
            )
            try:
                run(bench, args, results)
            finally:
                monitor.stop()
                bench.client.close()
    except Exception as failure:
        # Whatever went wrong, the table below still shows what was measured before it.
        error = f"{type(failure).__name__}: {failure}"
        if not isinstance(failure, ServerStartError):
            traceback.print_exc()
        print(f"# ERROR {error}", flush=True)
    finally:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("tritonserver-*.log"):
                shutil.copy(log, args.out / log.name)
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results))
    print(
        f"\ncommand: {command}\nwall time {time.monotonic() - start:.0f} s; sizes are HEIGHTxWIDTH; "
        f"server log says random weights: {'yes' if random_logged else 'NO'}",
        flush=True,
    )
    if args.out is not None:
        payload = {
            "command": command,
            "error": error,
            "random_weights_logged": random_logged,
            "results": [
                {**dataclasses.asdict(r), "output_fps": r.output_fps, "fps_after_first": r.fps_after_first}
                for r in results
            ],
        }
        (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    failed = error is not None or not random_logged or any(r.failed for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

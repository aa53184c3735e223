"""Run `perf_analyzer` (from the `tritonclient==2.51.0` x86_64 wheel) and read its profile export.

The binary (`<venv>/bin/perf_analyzer`, Perf Analyzer 2.51.0) needs two libraries that the wheel does
not ship: `libb64.so.0d` (Debian package `libb64-0d`) and `libcudart.so.12` (even for CPU-only use).
`perf_library_dirs` finds them, per library, in this order:

1. the folders in `$FLASHPORTRAIT_PERF_LIBS` (separated by `:`);
2. `<venv>/perf_libs/`, searched recursively: where the README's optional set-up step unpacks the
   Debian package without root (`apt-get download libb64-0d && dpkg-deb -x libb64-0d_*.deb
   .venv/perf_libs`);
3. `site-packages/nvidia/cuda_runtime/lib/` from `pip install nvidia-cuda-runtime-cu12`;
4. the system's loader cache (`ldconfig -p`), e.g. after `apt-get install libb64-0d`;
5. the copies inside the `nvidia-pytriton` wheel (`nvidia_pytriton.libs/libb64-<hash>.so.0d` and
   `libcudart-<hash>.so.12.6.77`, the libraries its tritonserver links against), linked under the names
   perf_analyzer asks for in a cache folder. So on a machine with the project installed nothing else is
   needed; the earlier sources win when present.

Streaming (`--streaming` over gRPC) is what a decoupled model needs; perf_analyzer then records every
response's arrival time in the profile export (`--profile-export-file`):
`{"experiments": [{"experiment": {"mode", "value"}, "requests": [{"timestamp": ns,
"response_timestamps": [ns, ...], "request_inputs", "response_outputs"}], "window_boundaries"}], ...}`.
It asks for the empty final response, so a request of N data responses has N + 1 timestamps; the last
entry of `response_outputs` is then not real data (2.51 fills it with uninitialised values). Time to
first response is `response_timestamps[0] - timestamp`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flashportrait.serving.triton_env import user_cache_dir

PERF_LIBRARIES = ("libb64.so.0d", "libcudart.so.12")
# Name patterns of the same libraries inside the nvidia-pytriton wheel (auditwheel renames them).
_WHEEL_PATTERNS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not run or failed; the message holds its command and output."""


def perf_analyzer_binary() -> Path:
    """`perf_analyzer` beside this interpreter (the tritonclient wheel's script dir), else on PATH."""
    candidate = Path(sys.prefix) / "bin" / "perf_analyzer"
    if candidate.is_file():
        return candidate
    found = shutil.which("perf_analyzer")
    if found is None:
        raise PerfAnalyzerError(
            "perf_analyzer not found: pip install 'tritonclient[grpc]==2.51.0' (x86_64 wheel)"
        )
    return Path(found)


def _site_packages() -> list[Path]:
    return [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]


def _system_has(name: str) -> bool:
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return False
    return any(line.strip().startswith(f"{name} ") for line in listing.splitlines())


def _find_library(name: str, cache_root: Path) -> tuple[Path | None, str]:
    """(folder to add to LD_LIBRARY_PATH or None for the system's, where it came from)."""
    for folder in filter(None, os.environ.get("FLASHPORTRAIT_PERF_LIBS", "").split(os.pathsep)):
        if (Path(folder) / name).exists():
            return Path(folder), "FLASHPORTRAIT_PERF_LIBS"
    unpacked = Path(sys.prefix) / "perf_libs"
    if unpacked.is_dir():
        for path in sorted(unpacked.rglob(name)):
            return path.parent, "venv perf_libs (Debian package)"
    if name == "libcudart.so.12":
        for site in _site_packages():
            lib = site / "nvidia" / "cuda_runtime" / "lib"
            if (lib / name).exists():
                return lib, "nvidia-cuda-runtime-cu12"
    if _system_has(name):
        return None, "system"
    for site in _site_packages():
        matches = sorted((site / "nvidia_pytriton.libs").glob(_WHEEL_PATTERNS[name]))
        if matches:
            links = cache_root / "perf_libs"
            links.mkdir(parents=True, exist_ok=True)
            link = links / name
            if not (link.is_symlink() and link.resolve() == matches[0].resolve()):
                staging = links / f".{name}.{os.getpid()}"
                staging.unlink(missing_ok=True)
                staging.symlink_to(matches[0])
                staging.replace(link)
            return links, "nvidia-pytriton wheel"
    raise PerfAnalyzerError(
        f"{name} not found for perf_analyzer: pip install nvidia-cuda-runtime-cu12 (libcudart.so.12), "
        "and `apt-get download libb64-0d && dpkg-deb -x libb64-0d_*.deb .venv/perf_libs` (libb64.so.0d)"
    )


def perf_library_dirs(cache_root: Path | None = None) -> tuple[tuple[Path, ...], dict[str, str]]:
    """Folders to put on LD_LIBRARY_PATH for perf_analyzer, and where each library was found."""
    folders: list[Path] = []
    sources: dict[str, str] = {}
    for name in PERF_LIBRARIES:
        folder, source = _find_library(name, cache_root or user_cache_dir())
        sources[name] = source if folder is None else f"{source}: {folder}"
        if folder is not None and folder not in folders:
            folders.append(folder)
    return tuple(folders), sources


@dataclasses.dataclass(frozen=True)
class PerfOptions:
    """One perf_analyzer run.

    model: the model to load-test. url: the server's gRPC `host:port`.
    input_data: perf_analyzer's JSON input file (`{"data": [{"INPUT": [...], ...}]}`); None uses random data.
    concurrency: requests in flight. request_count: total requests, then stop (0: perf_analyzer's own
        stability windows, which take much longer). streaming: gRPC streaming, required for decoupled models.
    """

    model: str
    url: str
    input_data: Path | None = None
    concurrency: int = 1
    request_count: int = 0
    streaming: bool = True
    extra_args: tuple[str, ...] = ()
    timeout_s: float = 600.0


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """One request of the export. Times in nanoseconds since the epoch, as perf_analyzer writes them."""

    start_ns: int
    response_ns: tuple[int, ...]

    @property
    def time_to_first_response_s(self) -> float:
        return (self.response_ns[0] - self.start_ns) / 1e9

    @property
    def time_to_last_response_s(self) -> float:
        return (self.response_ns[-1] - self.start_ns) / 1e9


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One concurrency (or request-rate) level of a run and its requests (those with responses)."""

    mode: str
    value: float
    requests: tuple[RequestTiming, ...]

    def time_to_first_response_s(self) -> np.ndarray:
        """[R] float64 seconds, one per request."""
        return np.array([r.time_to_first_response_s for r in self.requests], dtype=np.float64)

    def summary(self) -> dict[str, float]:
        ttfr = self.time_to_first_response_s()
        last = np.array([r.time_to_last_response_s for r in self.requests], dtype=np.float64)
        if ttfr.size == 0:
            return {"requests": 0.0}
        return {
            "requests": float(ttfr.size),
            "ttfr_mean_s": float(ttfr.mean()),
            "ttfr_p50_s": float(np.percentile(ttfr, 50)),
            "ttfr_p90_s": float(np.percentile(ttfr, 90)),
            "ttfr_max_s": float(ttfr.max()),
            "last_response_mean_s": float(last.mean()),
        }


def parse_profile_export(export: Mapping[str, Any]) -> list[Experiment]:
    """The experiments of a `--profile-export-file` JSON (see the module docstring for the format)."""
    experiments = []
    for entry in export["experiments"]:
        requests = tuple(
            RequestTiming(int(r["timestamp"]), tuple(int(t) for t in r["response_timestamps"]))
            for r in entry["requests"]
            if r.get("response_timestamps")
        )
        info = entry["experiment"]
        experiments.append(Experiment(str(info["mode"]), float(info["value"]), requests))
    return experiments


@dataclasses.dataclass(frozen=True)
class PerfRun:
    command: tuple[str, ...]
    output: str
    export: dict[str, Any]
    library_sources: dict[str, str]

    def experiments(self) -> list[Experiment]:
        return parse_profile_export(self.export)


def perf_command(options: PerfOptions, export_path: Path) -> list[str]:
    cmd = [
        str(perf_analyzer_binary()),
        "-m",
        options.model,
        "-u",
        options.url,
        "-i",
        "grpc",
        f"--concurrency-range={options.concurrency}",
        f"--profile-export-file={export_path}",
    ]
    if options.streaming:
        cmd.append("--streaming")
    if options.input_data is not None:
        cmd.append(f"--input-data={options.input_data}")
    if options.request_count:
        cmd.append(f"--request-count={options.request_count}")
    return [*cmd, *options.extra_args]


def run_perf_analyzer(options: PerfOptions, export_path: Path | None = None) -> PerfRun:
    """Run perf_analyzer against a live server; raises `PerfAnalyzerError` with its output on failure."""
    folders, sources = perf_library_dirs()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [*map(str, folders), *filter(None, [env.get("LD_LIBRARY_PATH")])]
    )
    with tempfile.TemporaryDirectory(prefix="perf-") as scratch:
        target = export_path or Path(scratch) / "profile_export.json"
        cmd = perf_command(options, target)
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=options.timeout_s, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise PerfAnalyzerError(
                f"perf_analyzer timed out after {options.timeout_s} s: {' '.join(cmd)}"
            ) from error
        output = done.stdout + done.stderr
        if done.returncode != 0 or not target.is_file():
            raise PerfAnalyzerError(
                f"perf_analyzer failed with code {done.returncode}: {' '.join(cmd)}\n"
                f"libraries: {sources}\n{output}"
            )
        # Outputs are exported as raw bytes inside JSON strings (UINT8 frames, the empty final
        # response's uninitialised values), which need not be UTF-8; timings are unaffected.
        export = json.loads(target.read_bytes().decode("utf-8", errors="replace"))
    return PerfRun(tuple(cmd), output, export, sources)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flashportrait.serving.perf --model M --url HOST:PORT [...] [-- perf_analyzer args]`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=False)
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--input-data", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--request-count", type=int, default=0)
    parser.add_argument("--export", type=Path, default=None, help="keep the profile export here")
    parser.add_argument("--libs", action="store_true", help="only show where the libraries come from")
    parser.add_argument("extra", nargs="*", help="passed to perf_analyzer as they are (after --)")
    args = parser.parse_args(argv)
    if args.libs or not args.model:
        _, sources = perf_library_dirs()
        for name, source in sources.items():
            print(f"{name}: {source}")
        return 0 if args.libs else 2
    options = PerfOptions(
        model=args.model,
        url=args.url,
        input_data=args.input_data,
        concurrency=args.concurrency,
        request_count=args.request_count,
        extra_args=tuple(args.extra),
    )
    run = run_perf_analyzer(options, args.export)
    print(" ".join(run.command))
    for experiment in run.experiments():
        stats = " ".join(f"{key}={value:.4f}" for key, value in experiment.summary().items())
        print(f"{experiment.mode}={experiment.value:g}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

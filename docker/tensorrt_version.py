"""Check and record the TensorRT version of the serving image.

Two TensorRT builds live in the image: the `libnvinfer` that Triton's TensorRT backend loads (it
comes with the NGC base image) and the `tensorrt` Python package that
`python -m flashportrait.export` uses to build engines. A serialized engine only loads in the
TensorRT release that built it, so both must be the same release. The image build runs this script
once: it fails the build when they differ (or differ from the release the Dockerfile pins), and
writes the release to a small JSON record that the engine loader and operators can read.

    python3 tensorrt_version.py --expect 10.5.0 --write /opt/flashportrait/tensorrt-version.json

The script has no third-party imports: it reads the library's file name and the package metadata,
so it runs without a GPU and without importing TensorRT.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

# Where Debian packages and NVIDIA's tarballs put libnvinfer, searched after the ldconfig cache.
DEFAULT_LIBRARY_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/usr/local/tensorrt/lib"),
)
# The pip distribution names of the Python API, most specific first.
PYTHON_DISTRIBUTIONS = ("tensorrt-cu12", "tensorrt-cu13", "tensorrt")
_LIBRARY_FILE = re.compile(r"^libnvinfer\.so\.(\d+\.\d+\.\d+)$")


class TensorRTVersionError(RuntimeError):
    """The image's TensorRT parts disagree, or one of them is missing."""


def release(version: str) -> str:
    """`10.5.0.18` or `10.5.0.post1` -> `10.5.0`: engines are compatible within one release."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise TensorRTVersionError(f"not a TensorRT version: {version!r}")
    return ".".join(match.groups())


def _ldconfig_dirs() -> list[Path]:
    """Folders of every libnvinfer.so.N that the dynamic linker knows about."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    dirs = []
    for line in listing.splitlines():
        if line.strip().startswith("libnvinfer.so.") and "=>" in line:
            dirs.append(Path(line.split("=>", 1)[1].strip()).parent)
    return dirs


def library_version(search_dirs: Sequence[Path] | None = None) -> tuple[str, Path]:
    """The release of the libnvinfer the server loads, from its versioned file name.

    Returns (release, path). Raises if none is found or if two different releases are installed,
    since then which one Triton loads depends on the search order.
    """
    dirs = list(search_dirs) if search_dirs is not None else [*_ldconfig_dirs(), *DEFAULT_LIBRARY_DIRS]
    found: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for candidate in sorted(folder.glob("libnvinfer.so.*")):
            match = _LIBRARY_FILE.match(candidate.resolve().name)
            if match is not None:
                found.setdefault(release(match.group(1)), candidate.resolve())
    if not found:
        raise TensorRTVersionError(f"no libnvinfer.so.<major>.<minor>.<patch> in {[str(d) for d in dirs]}")
    if len(found) > 1:
        listed = ", ".join(f"{v} ({p})" for v, p in sorted(found.items()))
        raise TensorRTVersionError(f"several TensorRT libraries are installed: {listed}")
    ((version, path),) = found.items()
    return version, path


def python_version(distributions: Sequence[str] = PYTHON_DISTRIBUTIONS) -> tuple[str, str]:
    """The release of the installed `tensorrt` Python package: (release, distribution name)."""
    for name in distributions:
        try:
            return release(metadata.version(name)), name
        except metadata.PackageNotFoundError:
            continue
    raise TensorRTVersionError(
        f"none of the TensorRT Python distributions {list(distributions)} is installed"
    )


def check(expected: str, library: str, python: str) -> list[str]:
    """Every disagreement between the pinned, the library's and the Python package's releases."""
    problems = []
    if release(expected) != library:
        problems.append(
            f"the base image ships TensorRT {library}, but the Dockerfile pins TENSORRT_VERSION={expected}: "
            "set the build argument to the base image's release"
        )
    if python != library:
        problems.append(
            f"the tensorrt Python package is {python} but the server's libnvinfer is {library}: "
            "engines built by flashportrait.export would not load in Triton"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", required=True, help="the TensorRT release the Dockerfile pins")
    parser.add_argument("--write", type=Path, help="where to write the JSON record")
    parser.add_argument("--library-dir", type=Path, action="append", help="search here, not ldconfig")
    args = parser.parse_args(argv)
    try:
        library, library_path = library_version(args.library_dir)
        python, distribution = python_version()
    except TensorRTVersionError as error:
        print(f"tensorrt_version: {error}", file=sys.stderr)
        return 1
    problems = check(args.expect, library, python)
    for problem in problems:
        print(f"tensorrt_version: {problem}", file=sys.stderr)
    if problems:
        return 1
    record = {
        "tensorrt": library,
        "libnvinfer": str(library_path),
        "python_distribution": f"{distribution}=={metadata.version(distribution)}",
    }
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Find a runnable `tritonserver` and the environment it needs.

Two sources, in this order:

1. an explicit binary (`binary=` or `$FLASHPORTRAIT_TRITONSERVER`), or a system install
   (`/opt/tritonserver/bin/tritonserver` as in the NGC image, or `tritonserver` on `PATH`); its backends
   are the `backends/` folder beside `bin/` unless `$FLASHPORTRAIT_TRITON_BACKENDS` says otherwise;
2. the `nvidia-pytriton` wheel (0.7.0 ships Triton Inference Server 2.51.0, the version the design
   targets). The wheel lays out
   `pytriton/tritonserver/{bin/tritonserver, backends/python, caches/local, python_backend_stubs/<X.Y>}`
   and the shared libraries it was linked against in `site-packages/nvidia_pytriton.libs` (auditwheel
   names such as `libtritonserver-717102f0.so`).

The wheel's `backends/python` holds `libtriton_python.so` but no stub: the Python backend launches
`triton_python_backend_stub` from its own folder, and the stub must match the interpreter that runs the
models. We copy `backends/` and `caches/` (1.6 MB) into a writable cache folder and add the stub for
this interpreter there, instead of writing into site-packages. The binaries' RPATHs
(`$ORIGIN/../../../../nvidia_pytriton.libs`) only resolve from their original place, so the copies need
`LD_LIBRARY_PATH` to include `nvidia_pytriton.libs`. (The other way, which also works: copy the stub
into `site-packages/pytriton/tritonserver/backends/python/` in place; then the RPATHs resolve and no
`LD_LIBRARY_PATH` is needed, but it writes into the installed package.)

The stub embeds libpython; with `<venv>/bin` first on `PATH` the embedded interpreter finds
`<venv>/bin/python3`, reads `<venv>/pyvenv.cfg`, and gets the venv's site-packages (with the `.pth`
file of the editable install), so model files can `import flashportrait` without `PYTHONPATH`. Without
it the stub runs the base interpreter and fails with `No module named 'numpy'`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path


class TritonNotFoundError(RuntimeError):
    """No usable `tritonserver`; the message says where we looked and how to fix it."""


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """A runnable Triton Inference Server.

    binary: the `tritonserver` executable.
    backend_dir: passed as `--backend-directory` (holds `python/` with a matching stub).
    cache_dir: passed as `--cache-directory` when not None.
    lib_dirs: prepended to `LD_LIBRARY_PATH` of the server process.
    source: "wheel" or "system", for messages.
    """

    binary: Path
    backend_dir: Path
    cache_dir: Path | None
    lib_dirs: tuple[Path, ...]
    source: str


def user_cache_dir() -> Path:
    """`$FLASHPORTRAIT_CACHE`, else `$XDG_CACHE_HOME/flashportrait`, else `~/.cache/flashportrait`; when
    that cannot be created (a read-only home in CI), `<tmp>/flashportrait-<uid>`."""
    if os.environ.get("FLASHPORTRAIT_CACHE"):
        return Path(os.environ["FLASHPORTRAIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    preferred = Path(base) / "flashportrait"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.gettempdir()) / f"flashportrait-{os.getuid()}"
    if not os.access(preferred, os.W_OK):
        return Path(tempfile.gettempdir()) / f"flashportrait-{os.getuid()}"
    return preferred


def python_lib_dirs() -> tuple[Path, ...]:
    """The folder holding this interpreter's `libpython3.X.so`, which the stub links against.

    pyenv and other non-system builds keep it outside the loader's default path.
    """
    ldlibrary = sysconfig.get_config_var("LDLIBRARY")
    if not ldlibrary:
        return ()
    # LIBDIR is where the build was configured; relocated builds (e.g. a copied or venv-wrapped
    # Python) keep the library under the installation's base prefix instead.
    for libdir in (sysconfig.get_config_var("LIBDIR"), str(Path(sys.base_prefix) / "lib")):
        if libdir and (Path(libdir) / ldlibrary).exists():
            return (Path(libdir),)
    return ()


def _wheel_root() -> Path | None:
    """`site-packages/pytriton/tritonserver` of the installed wheel, found without importing pytriton
    (its import pulls in much more than we need)."""
    for entry in sys.path:
        candidate = Path(entry or ".") / "pytriton" / "tritonserver"
        if (candidate / "bin" / "tritonserver").is_file():
            return candidate
    return None


def _system_binary(binary: Path | str | None) -> Path | None:
    explicit = binary or os.environ.get("FLASHPORTRAIT_TRITONSERVER")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise TritonNotFoundError(f"tritonserver binary {path} does not exist")
        return path
    ngc = Path("/opt/tritonserver/bin/tritonserver")
    if ngc.is_file():
        return ngc
    found = shutil.which("tritonserver")
    return Path(found) if found else None


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def prepare_wheel_backends(wheel_root: Path, cache_root: Path) -> Path:
    """Copy the wheel's `backends/` and `caches/` into `cache_root` with this interpreter's Python stub.

    Returns the prepared folder (holding `backends/` and `caches/`). Idempotent and safe to race: the
    copy is built under a unique temporary name and renamed into place; a folder is used only once its
    `READY` marker exists. The folder name includes a fingerprint of the wheel's files, so upgrading the
    wheel prepares a fresh copy.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (wheel_root / "python_backend_stubs").iterdir())
        raise TritonNotFoundError(
            f"nvidia-pytriton has no Python backend stub for Python {version} (it has {available})"
        )
    backend_lib = wheel_root / "backends" / "python" / "libtriton_python.so"
    target = cache_root / f"tritonserver-py{version}-{_fingerprint([stub, backend_lib])}"
    if (target / "READY").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = cache_root / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(
            wheel_root / "backends", staging / "backends", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copytree(wheel_root / "caches", staging / "caches")
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        (staging / "READY").write_text(f"{wheel_root}\n")
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its copy is equivalent.
            if not (target / "READY").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def locate_triton(binary: Path | str | None = None, cache_root: Path | None = None) -> TritonInstall:
    """The Triton install to run (see the module docstring for the order)."""
    system = _system_binary(binary)
    if system is not None:
        backends = Path(os.environ.get("FLASHPORTRAIT_TRITON_BACKENDS") or system.parent.parent / "backends")
        caches = system.parent.parent / "caches"
        return TritonInstall(
            binary=system,
            backend_dir=backends,
            cache_dir=caches if caches.is_dir() else None,
            lib_dirs=python_lib_dirs(),
            source="system",
        )
    wheel_root = _wheel_root()
    if wheel_root is None:
        raise TritonNotFoundError(
            "no tritonserver found: install the nvidia-pytriton wheel (pip install nvidia-pytriton), "
            "put tritonserver on PATH, or set FLASHPORTRAIT_TRITONSERVER to its path"
        )
    prepared = prepare_wheel_backends(wheel_root, cache_root or user_cache_dir())
    return TritonInstall(
        binary=wheel_root / "bin" / "tritonserver",
        backend_dir=prepared / "backends",
        cache_dir=prepared / "caches",
        lib_dirs=(wheel_root.parent.parent / "nvidia_pytriton.libs", *python_lib_dirs()),
        source="wheel",
    )


def server_environment(install: TritonInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the server process: libraries on `LD_LIBRARY_PATH`, this interpreter's `bin/`
    first on `PATH` (so the Python stub runs inside this venv), and the repository importable.
    """
    env = dict(os.environ if base is None else base)
    libs = [str(p) for p in install.lib_dirs]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # sys.prefix is the venv; `Path(sys.executable).parent` may be a symlink target outside it.
    venv_bin = Path(sys.prefix) / "bin"
    env["PATH"] = os.pathsep.join([str(venv_bin), env.get("PATH", "")])
    return env

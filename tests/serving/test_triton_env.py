"""Locating the wheel's tritonserver and preparing its Python backend, without starting it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flashportrait.serving.triton_env import TritonInstall, locate_triton, server_environment


def test_wheel_backends_are_prepared_once_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLASHPORTRAIT_TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.prefix) / "bin"))  # no system tritonserver on PATH
    first = locate_triton(cache_root=tmp_path)
    if first.source != "wheel":
        pytest.skip("a system tritonserver (/opt/tritonserver) takes precedence over the wheel here")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = first.backend_dir / "python" / "triton_python_backend_stub"
    wheel_stub = first.binary.parents[1] / "python_backend_stubs" / version / "triton_python_backend_stub"
    assert stub.read_bytes() == wheel_stub.read_bytes()
    assert (first.backend_dir / "python" / "libtriton_python.so").is_file()
    assert first.lib_dirs[0].name == "nvidia_pytriton.libs"
    second = locate_triton(cache_root=tmp_path)
    assert second == first
    # One prepared folder, no staging leftovers.
    assert [p.name for p in tmp_path.iterdir()] == [first.backend_dir.parent.name]


def test_server_environment_puts_libraries_and_this_venv_first(tmp_path: Path) -> None:
    install = TritonInstall(
        binary=tmp_path / "tritonserver",
        backend_dir=tmp_path,
        cache_dir=None,
        lib_dirs=(tmp_path / "libs",),
        source="wheel",
    )
    env = server_environment(install, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x"})
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path / 'libs'}:/opt/x"
    # The Python stub finds <venv>/bin/python3 on PATH and with it the venv's site-packages.
    assert env["PATH"].split(":") == [str(Path(sys.prefix) / "bin"), "/usr/bin"]

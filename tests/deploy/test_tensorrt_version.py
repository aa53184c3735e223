"""docker/tensorrt_version.py: the image build's check that Triton's libnvinfer, the tensorrt Python
package and the Dockerfile's pin are one TensorRT release."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.tools import REPO


@pytest.fixture(scope="module")
def trt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tensorrt_version", REPO / "docker/tensorrt_version.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_library(folder: Path, version: str) -> None:
    """The Debian layout: libnvinfer.so.10 -> libnvinfer.so.10.5.0."""
    folder.mkdir(parents=True, exist_ok=True)
    real = folder / f"libnvinfer.so.{version}"
    real.write_bytes(b"")
    (folder / f"libnvinfer.so.{version.split('.')[0]}").symlink_to(real.name)


def test_release_drops_build_and_post_suffixes(trt: ModuleType) -> None:
    assert trt.release("10.5.0.18") == "10.5.0"
    assert trt.release("10.6.0.post2") == "10.6.0"
    with pytest.raises(trt.TensorRTVersionError):
        trt.release("ten")


def test_library_version_reads_the_versioned_file(trt: ModuleType, tmp_path: Path) -> None:
    _fake_library(tmp_path / "lib", "10.5.0")
    version, path = trt.library_version([tmp_path / "lib", tmp_path / "missing"])
    assert (version, path.name) == ("10.5.0", "libnvinfer.so.10.5.0")


def test_two_installed_releases_are_refused(trt: ModuleType, tmp_path: Path) -> None:
    _fake_library(tmp_path / "a", "10.5.0")
    _fake_library(tmp_path / "b", "10.6.0")
    with pytest.raises(trt.TensorRTVersionError, match="several TensorRT libraries"):
        trt.library_version([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(trt.TensorRTVersionError, match="no libnvinfer"):
        trt.library_version([tmp_path / "empty"])


def test_check_names_each_disagreement(trt: ModuleType) -> None:
    assert trt.check("10.5.0", "10.5.0", "10.5.0") == []
    (pin,) = trt.check("10.6.0", "10.5.0", "10.5.0")
    assert "ships TensorRT 10.5.0, but the Dockerfile pins TENSORRT_VERSION=10.6.0" in pin
    (python,) = trt.check("10.5.0", "10.5.0", "10.7.0")
    assert "tensorrt Python package is 10.7.0 but the server's libnvinfer is 10.5.0" in python


def test_main_writes_the_record_or_fails(
    trt: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_library(tmp_path / "lib", "10.5.0")
    monkeypatch.setattr(trt.metadata, "version", lambda name: {"tensorrt-cu12": "10.5.0"}[name])
    record = tmp_path / "out" / "tensorrt-version.json"
    argv = ["--expect", "10.5.0", "--library-dir", str(tmp_path / "lib"), "--write", str(record)]
    assert trt.main(argv) == 0
    written = json.loads(record.read_text())
    assert written["tensorrt"] == "10.5.0"
    assert written["python_distribution"] == "tensorrt-cu12==10.5.0"
    assert trt.main(["--expect", "10.6.0", "--library-dir", str(tmp_path / "lib")]) == 1
    assert "pins TENSORRT_VERSION=10.6.0" in capsys.readouterr().err

"""TensorRT engines: the version record and the refusal to load another release's engine (tested
with record files alone: TensorRT is not installed here), clear errors without TensorRT, and the
decoder backend choice. The engine build itself runs only where TensorRT and a GPU are present."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil

import pytest
import torch
from flashportrait.export import engines
from flashportrait.export.engines import (
    BuildOptions,
    EngineVersionError,
    TensorRTTinyVaeDecoder,
    add_to_manifest,
    check_engine,
    export_decoder,
    load_decoder,
    runtime_tensorrt_version,
)
from flashportrait.export.tensorrt import (
    ShapeProfile,
    TensorRTUnavailable,
    build_engine,
    make_record,
    read_record,
    record_path,
    release,
    write_record,
)
from flashportrait.export.tiny_vae_onnx import LATENTS, OnnxTinyVaeDecoder

from flashportrait.components.prepared import PreparedPaths, read_manifest
from flashportrait.components.prepared_check import verify_prepared
from flashportrait.config import ConfigError
from flashportrait.models.decoding import decode_all
from flashportrait.models.tiny_vae import TinyVaeDecoder

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="checks the behaviour without TensorRT")


def fake_engine(folder, built_by: str = "10.5.0.18", **extra):
    """A file in the engine's place with a record as `build_engine` writes it."""
    engine = folder / "model.plan"
    engine.write_bytes(b"serialized engine")
    profiles = {LATENTS: ShapeProfile((1, 16, 1, 8, 8), (1, 16, 4, 64, 64), (2, 16, 4, 128, 128))}
    write_record(engine, {**make_record(built_by, engine, None, profiles, fp16=True), **extra})
    return engine


def test_record_beside_the_engine(tmp_path):
    engine = fake_engine(tmp_path, compute_capability="9.0", device="NVIDIA H200")
    assert record_path(engine).name == "model.tensorrt-version.json"
    record = read_record(engine)
    assert record["tensorrt"] == "10.5.0" and record["tensorrt_version"] == "10.5.0.18"
    assert record["precision"] == "fp16" and record["profiles"][LATENTS]["max"] == [2, 16, 4, 128, 128]
    assert len(record["engine_sha256"]) == 64


@pytest.mark.parametrize(("runtime", "ok"), [("10.5.0", True), ("10.5.0.25", True), ("10.5.1", False),
                                             ("10.3.0.26", False), ("8.6.1", False)])  # fmt: skip
def test_an_engine_of_another_release_is_refused_naming_both(tmp_path, runtime, ok):
    engine = fake_engine(tmp_path)
    if ok:
        assert check_engine(engine, runtime, compute_capability="9.0")["tensorrt"] == "10.5.0"
        return
    with pytest.raises(EngineVersionError) as error:
        check_engine(engine, runtime, compute_capability="9.0")
    message = str(error.value)
    assert "built by TensorRT 10.5.0.18" in message and f"this runtime is TensorRT {runtime}" in message
    assert "python -m flashportrait.export.engines" in message


def test_missing_or_broken_records_and_other_gpus_are_refused(tmp_path):
    engine = fake_engine(tmp_path, compute_capability="9.0", device="NVIDIA H200")
    with pytest.raises(
        EngineVersionError, match=r"compute capability 9\.0 \(NVIDIA H200\), this GPU is 8\.0"
    ):
        check_engine(engine, "10.5.0", compute_capability="8.0")
    record_path(engine).write_text("{not json")
    with pytest.raises(EngineVersionError, match="not a TensorRT version record"):
        check_engine(engine, "10.5.0")
    record_path(engine).write_text(json.dumps({"tensorrt": "ten"}))
    with pytest.raises(EngineVersionError, match="not a TensorRT version record"):
        check_engine(engine, "10.5.0")
    record_path(engine).unlink()
    with pytest.raises(EngineVersionError, match="has no TensorRT version record"):
        check_engine(engine, "10.5.0")


def test_release_parsing_and_profiles():
    assert release("10.5.0.18") == release("10.5.0.post1") == release(" 10.5.0") == "10.5.0"
    with pytest.raises(ValueError, match="not a TensorRT version"):
        release("ten")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeProfile((1, 4), (2, 4), (1, 4))
    with pytest.raises(ValueError, match="ranks"):
        ShapeProfile((1, 4), (2, 4), (3,))


@no_tensorrt
def test_runtime_version_comes_from_the_environment_or_the_image_record(tmp_path, monkeypatch):
    image = tmp_path / "tensorrt-version.json"
    image.write_text(json.dumps({"tensorrt": "10.5.0", "python_distribution": "tensorrt-cu12==10.5.0"}))
    assert runtime_tensorrt_version(image_record=image, environ={}) == ("10.5.0", str(image))
    env = {"FLASHPORTRAIT_TENSORRT_VERSION": "10.6.0"}
    assert runtime_tensorrt_version(image_record=image, environ=env)[0] == "10.6.0"
    with pytest.raises(TensorRTUnavailable, match="no TensorRT here"):
        runtime_tensorrt_version(image_record=tmp_path / "absent.json", environ={})
    # the default check reads this environment: an engine of 10.5.0 under a 10.6.0 image is refused
    engine = fake_engine(tmp_path)
    monkeypatch.setenv("FLASHPORTRAIT_TENSORRT_VERSION", "10.6.0")
    with pytest.raises(EngineVersionError, match=r"this runtime is TensorRT 10\.6\.0 \(from \$FLASHPORTRAIT"):
        check_engine(engine)
    with pytest.raises(EngineVersionError, match=r"built by TensorRT 10\.5\.0\.18"):
        TensorRTTinyVaeDecoder(engine, device="cpu")  # refused before TensorRT is needed


@no_tensorrt
def test_building_or_loading_without_tensorrt_says_so(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {})
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        engines.load_engine(fake_engine(tmp_path))


@pytest.fixture
def prepared_copy(prepared, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    return PreparedPaths(copy)


def test_decoder_backend_choice(prepared_copy, release, caplog):
    paths = prepared_copy
    assert type(load_decoder(paths.root, "torch", device="cpu")) is TinyVaeDecoder
    assert type(load_decoder(paths.root, "onnx", device="cpu")) is TinyVaeDecoder  # no graph yet
    assert type(load_decoder(release.root, "tensorrt", device="cpu")) is TinyVaeDecoder  # release layout
    written: list = []
    export_decoder(paths, BuildOptions(), print, written)
    add_to_manifest(paths, written)
    assert "onnx/tiny_vae_decoder.onnx" in read_manifest(paths.root)["files"]
    assert verify_prepared(paths.root, hashes=True) == []
    onnx_decoder = load_decoder(paths.root, "onnx", device="cpu")
    assert isinstance(onnx_decoder, OnnxTinyVaeDecoder)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch_decoder = load_decoder(paths.root, "torch", device="cpu", dtype=torch.float32)
    torch.testing.assert_close(decode_all(onnx_decoder, latents, chunk=2), decode_all(torch_decoder, latents),
                               rtol=0, atol=1e-5)  # fmt: skip
    # an engine is used only with TensorRT and a CUDA device; otherwise PyTorch, and the log says why
    paths.tiny_vae_engine.parent.mkdir()
    shutil.copyfile(fake_engine(paths.root), paths.tiny_vae_engine)
    shutil.copyfile(record_path(paths.root / "model.plan"), record_path(paths.tiny_vae_engine))
    with caplog.at_level(logging.WARNING, logger="flashportrait.export.engines"):
        assert type(load_decoder(paths.root, "tensorrt", device="cpu")) is TinyVaeDecoder
    assert "needs a CUDA device" in caplog.text
    with pytest.raises(ConfigError, match="backend must be one of"):
        load_decoder(paths.root, "tvm")


@no_tensorrt
def test_engine_builds_fail_clearly_and_keep_what_was_finished(prepared_copy):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        engines.export_all(prepared_copy.root, BuildOptions(tensorrt=True), out=lambda line: None)
    assert not prepared_copy.tiny_vae_onnx.exists()  # refused before exporting anything
    written: list = []
    with pytest.raises(TensorRTUnavailable):
        engines.export_decoder(prepared_copy, BuildOptions(tensorrt=True), lambda line: None, written)
    assert written == [prepared_copy.tiny_vae_onnx] and not prepared_copy.tiny_vae_engine.exists()
    assert engines.main(["--weights", str(prepared_copy.root), "--tensorrt"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()), reason="needs TensorRT and a GPU")
def test_tensorrt_decoder_matches_pytorch(prepared_copy):
    paths = prepared_copy
    options = BuildOptions(tensorrt=True, decoder_profiles={"height": (4, 8, 16), "width": (4, 8, 16)})
    written: list = []
    export_decoder(paths, options, print, written)
    add_to_manifest(paths, written)
    record = check_engine(paths.tiny_vae_engine)
    import tensorrt

    assert record["tensorrt_version"] == tensorrt.__version__
    engine_decoder = load_decoder(paths.root, "tensorrt", device="cuda")
    assert isinstance(engine_decoder, TensorRTTinyVaeDecoder)
    reference = load_decoder(paths.root, "torch", device="cuda", dtype=torch.float32)
    latents = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
    ours, theirs = decode_all(engine_decoder, latents, chunk=3), decode_all(reference, latents, chunk=3)
    # fp16 engine: frames in [-1, 1] within a few fp16 steps of the float32 decoder
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 2e-2

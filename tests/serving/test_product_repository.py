"""The product's model repository without a server: configs parse and agree with each other, model
settings and their environment fallbacks, the runtime repository's assembly, uploaded images, and
the shipped perf_analyzer input data."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format
from PIL import Image

from flashportrait.config import ConfigError
from flashportrait.serving.media import decode_image
from flashportrait.serving.repository import (
    PREPARED_ONNX,
    RepositoryError,
    assemble_repository,
    model_folders,
)
from flashportrait.serving.settings import (
    FaceAlignSettings,
    FeatureExtractorSettings,
    SamplerSettings,
    TextEncoderSettings,
    config_parameters,
    model_settings,
    resolve_deployment,
)
from flashportrait.serving.streaming import RequestError

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = (
    "face_align",
    "feature_extractor",
    "flashportrait",
    "flashportrait_features",
    "sampler",
    "text_encoder",
)
SETTINGS = {
    "face_align": FaceAlignSettings,
    "text_encoder": TextEncoderSettings,
    "sampler": SamplerSettings,
}


def load_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def io_signature(config: mc.ModelConfig) -> dict:
    def tensors(items):
        return {
            t.name: (mc.DataType.Name(t.data_type), tuple(t.dims), getattr(t, "optional", False))
            for t in items
        }

    return {"in": tensors(config.input), "out": tensors(config.output), "batch": config.max_batch_size}


def test_every_model_has_a_config_and_the_cpu_variants_keep_the_contract() -> None:
    assert [m.name for m in model_folders(REPOSITORY)] == sorted(MODELS)
    for model in MODELS:
        default = load_config(REPOSITORY / model / "config.pbtxt")
        variant = REPOSITORY / model / "configs" / "cpu.pbtxt"
        if variant.exists():
            cpu = load_config(variant)
            assert io_signature(cpu) == io_signature(default), model
            assert cpu.model_transaction_policy.decoupled == default.model_transaction_policy.decoupled
            assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in cpu.instance_group), model
        elif default.platform != "ensemble":
            pytest.fail(f"{model} has no configs/cpu.pbtxt")
        if model in SETTINGS:
            for config in filter(None, [default, load_config(variant) if variant.exists() else None]):
                parameters = {k: v.string_value for k, v in config.parameters.items()}
                model_settings(SETTINGS[model], {"model_name": model, "model_config": {"parameters": {
                    k: {"string_value": v} for k, v in parameters.items()}}})  # fmt: skip
    sampler = load_config(REPOSITORY / "sampler" / "config.pbtxt")
    assert sampler.model_transaction_policy.decoupled
    onnx = load_config(REPOSITORY / "feature_extractor" / "config.pbtxt")
    assert onnx.platform == "onnxruntime_onnx" and onnx.HasField("dynamic_batching")


def test_face_align_max_frames_is_the_feature_extractor_batch_limit() -> None:
    for name in ("config.pbtxt", "configs/cpu.pbtxt"):
        align = load_config(REPOSITORY / "face_align" / name)
        extractor = load_config(REPOSITORY / "feature_extractor" / name)
        assert int(align.parameters["max_frames"].string_value) == extractor.max_batch_size


@pytest.mark.parametrize("ensemble", ["flashportrait", "flashportrait_features"])
def test_ensemble_steps_connect_tensors_of_matching_types(ensemble: str) -> None:
    config = load_config(REPOSITORY / ensemble / "config.pbtxt")
    available = {t.name: mc.DataType.Name(t.data_type) for t in config.input}
    for step in config.ensemble_scheduling.step:
        member = load_config(REPOSITORY / step.model_name / "config.pbtxt")
        inputs = {t.name: (mc.DataType.Name(t.data_type), t.optional) for t in member.input}
        for key, value in step.input_map.items():
            assert value in available, f"{step.model_name}.{key} reads {value} before it exists"
            assert available[value] == inputs[key][0], f"{step.model_name}.{key}"
        missing = {k for k, (_, optional) in inputs.items() if not optional} - set(step.input_map)
        assert not missing, f"{step.model_name} misses {missing}"
        outputs = {t.name: mc.DataType.Name(t.data_type) for t in member.output}
        for key, value in step.output_map.items():
            available[value] = outputs[key]
    for output in config.output:
        assert available[output.name] == mc.DataType.Name(output.data_type), output.name
    if ensemble == "flashportrait":
        sampler = load_config(REPOSITORY / "sampler" / "config.pbtxt")
        assert io_signature(config)["out"] == io_signature(sampler)["out"]


def test_settings_fall_back_to_the_environment(tmp_path: Path) -> None:
    parameters = {"weights": "", "mode": "", "threads": "2"}
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    args = {"model_name": "sampler", "model_config": json.dumps(config)}
    settings = model_settings(SamplerSettings, args)
    assert settings.threads == 2 and settings.weights == ""
    env = {
        "FLASHPORTRAIT_WEIGHTS": str(tmp_path),
        "FLASHPORTRAIT_MODE": "quality",
        "FLASHPORTRAIT_PRECISION": "fp8",
    }
    cpu = resolve_deployment(settings, {"model_instance_kind": "CPU"}, env)
    assert (cpu.weights, cpu.mode, cpu.device, cpu.dtype, cpu.precision) == (
        tmp_path, "quality", "cpu", "float32", "fp8")  # fmt: skip
    gpu = resolve_deployment(settings, {"model_instance_kind": "GPU", "model_instance_device_id": "3"}, env)
    assert (gpu.device, gpu.dtype) == ("cuda:3", "bfloat16")
    # A parameter wins over the environment.
    explicit = resolve_deployment(SamplerSettings(weights=str(tmp_path), mode="fast"), {}, env)
    assert explicit.mode == "fast"


@pytest.mark.parametrize(
    ("parameters", "env", "message"),
    [
        ({"weights": ""}, {}, "no weights folder"),
        ({"weights": "/nonexistent/weights"}, {}, "does not exist"),
        ({"mode": "turbo"}, {"FLASHPORTRAIT_WEIGHTS": "."}, "mode must be one of"),
        ({"device": "tpu"}, {"FLASHPORTRAIT_WEIGHTS": "."}, "device must be"),
        ({"precision": "int4"}, {"FLASHPORTRAIT_WEIGHTS": "."}, "precision must be one of"),
    ],
)
def test_bad_settings_are_clear_errors(parameters: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_deployment(SamplerSettings(**parameters), {}, env)


def test_an_unknown_model_parameter_fails_the_load() -> None:
    args = {"model_name": "face_align", "model_config": {"parameters": {"max_frame": {"string_value": "9"}}}}
    with pytest.raises(ConfigError, match="max_frame"):
        model_settings(FaceAlignSettings, args)
    assert config_parameters({"parameters": {"a": {"string_value": "1"}}}) == {"a": "1"}
    assert model_settings(FeatureExtractorSettings, {"model_config": {}}).chunk_frames == 16


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploaded_images_decode_to_rgb_and_bad_ones_are_request_errors() -> None:
    image = decode_image(_png(20, 10), max_pixels=1000)
    assert image.shape == (10, 20, 3) and image.dtype == np.uint8 and image[0, 0].tolist() == [200, 120, 40]
    cases = [
        (b"", "the image is empty"),
        (b"not an image at all", "cannot read the uploaded image (19 bytes)"),
        (_png(50, 30)[:60], "the image (60 bytes) is damaged: image file is truncated"),
        (_png(50, 30), "the image is 50x30 pixels (0.0 MP); this server accepts at most 0.0 MP"),
    ]
    for data, message in cases:
        limit = 1000 if "pixels" in message else 1 << 24
        with pytest.raises(RequestError) as error:
            decode_image(data, max_pixels=limit)
        assert str(error.value).startswith(message), str(error.value)


def _weights_with_prepared_onnx(root: Path) -> Path:
    onnx = root / PREPARED_ONNX
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"onnx")
    return root


def test_assembly_links_every_model_and_adds_the_onnx_file(tmp_path: Path) -> None:
    weights = _weights_with_prepared_onnx(tmp_path / "weights")
    built = assemble_repository(weights, REPOSITORY, cache_root=tmp_path / "cache")
    assert sorted(p.name for p in built.iterdir() if p.is_dir()) == sorted(MODELS)
    assert (built / "sampler").resolve() == (REPOSITORY / "sampler").resolve()
    extractor = built / "feature_extractor"
    assert not extractor.is_symlink()  # rebuilt, so the checkout is never written into
    assert (extractor / "1" / "model.onnx").read_bytes() == b"onnx"
    assert (extractor / "1" / "model.py").resolve() == (REPOSITORY / "feature_extractor/1/model.py").resolve()
    assert (extractor / "configs" / "cpu.pbtxt").is_file() and (extractor / "config.pbtxt").is_file()
    assert not (REPOSITORY / "feature_extractor" / "1" / "model.onnx").exists()
    # Built once, then reused; an explicit --out is rebuilt in place.
    assert assemble_repository(weights, REPOSITORY, cache_root=tmp_path / "cache") == built
    out = assemble_repository(weights, REPOSITORY, cache_root=tmp_path / "cache", out=tmp_path / "out")
    assert (out / "feature_extractor" / "1" / "model.onnx").read_bytes() == b"onnx"


def test_assembly_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        assemble_repository(tmp_path / "nowhere", REPOSITORY, cache_root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match=r"pd_fpg\.pth is missing"):
        assemble_repository(tmp_path / "empty", REPOSITORY, cache_root=tmp_path)


def _element(entry: dict) -> bytes:
    raw = base64.b64decode(entry["b64"])
    (length,) = struct.unpack("<I", raw[:4])
    assert length == len(raw) - 4
    return raw[4:]


def test_shipped_perf_inputs_hold_real_media_and_consistent_tensors() -> None:
    import av

    ensemble = json.loads((REPOSITORY / "perf" / "flashportrait.json").read_text())["data"][0]
    sampler = json.loads((REPOSITORY / "perf" / "sampler.json").read_text())["data"][0]
    assert decode_image(_element(ensemble["IMAGE"]), 1 << 24).shape == (320, 256, 3)
    assert _element(sampler["IMAGE"]) == _element(ensemble["IMAGE"])
    with av.open(io.BytesIO(_element(ensemble["VIDEO"]))) as video:
        frames = sum(1 for _ in video.decode(video=0))
    features = sampler["FEATURES"]
    assert features["shape"] == [frames, 554] and len(features["content"]) == frames * 554
    rows, dim = sampler["PROMPT_EMBEDS"]["shape"]
    assert len(sampler["PROMPT_EMBEDS"]["content"]) == rows * dim and dim == 32  # the demo weights' text_dim
    assert ensemble["PROMPT"] == ["A woman smiles and nods."] and sampler["FPS"] == [25, 1]


def test_models_refuse_numpy_2_in_the_stub_environment():
    """Triton 2.51's Python backend stub corrupts BYTES inputs under NumPy 2 (reproduced with a
    Python 3.12 environment holding numpy 2.5.2): loading must fail with an actionable message."""
    from flashportrait.serving.settings import check_stub_numpy

    check_stub_numpy("1.26.4")
    with pytest.raises(RuntimeError, match=r"numpy 2\.5\.2 .*install 'numpy<2'"):
        check_stub_numpy("2.5.2")

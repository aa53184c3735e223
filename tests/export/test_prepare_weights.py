"""`prepare_weights` on the demo weights: the folder's layout and manifest, its key sets against the
release manifests, identical models and outputs to the release folder, verification and errors."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flashportrait.export.prepare_weights import PrepareOptions, StreamingReader, prepare_weights
from flashportrait.export.safetensors_writer import file_sha256

from flashportrait.components import (
    ALL_PARTS,
    DeploymentConfig,
    MissingWeightsError,
    load_components,
)
from flashportrait.components.prepared import (
    PreparedPaths,
    is_prepared,
    load_prepared,
    read_manifest,
    read_safetensors,
)
from flashportrait.components.prepared_check import verify_prepared
from flashportrait.config import ConfigError, to_mapping
from flashportrait.models.decoding import decode_all
from flashportrait.models.dit_loading import flashportrait_only_keys, open_dit_checkpoint
from flashportrait.models.emo_split import split_emotion_tokens
from flashportrait.models.fp8_linear import convert_linears_to_fp8
from flashportrait.models.transformer import build_meta
from flashportrait.weights import SafetensorsFile, TensorInfo, module_tensor_shapes

F32, BF16 = torch.float32, torch.bfloat16
MODULES = ("dit", "vae", "tiny_vae", "clip", "portrait_encoder", "motion_encoder")
_REPEATED = re.compile(r"(blocks|transformer|layers)\.\d+\.")
# prepared component -> (golden manifest, prefix the reference loader adds to the file's keys)
GOLDEN = {
    "dit_quality": ("transformer_i2v_14b", ""),
    "dit_fast": ("transformer_i2v_14b", ""),
    "dit_quality_fp8": ("transformer_i2v_14b", ""),
    "dit_fast_fp8": ("transformer_i2v_14b", ""),
    "wan_vae": ("wan_vae", "model."),
    "tiny_vae": ("tiny_vae", ""),
    "text_encoder": ("t5_umt5_xxl_encoder", ""),
    "clip": ("clip_xlm_roberta_vit_h14", "model."),
    "portrait_encoder": ("portrait_encoder", ""),
    "motion_encoder": ("fan_encoder", ""),
}


def fold(keys) -> dict[str, int]:
    """Key name (block index folded) -> rank."""
    return {_REPEATED.sub(r"\1.#.", k): len(s) for k, s in keys.items()}


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, name: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), name
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, f"{name}.{key}"
        assert torch.equal(u8(sa[key]), u8(sb[key])), f"{name}.{key}"


@torch.no_grad()
def pipeline_outputs(c) -> dict[str, torch.Tensor]:
    """Every model's output on fixed random inputs, chained as the sampler chains them."""
    gen = torch.Generator().manual_seed(0)
    dtype = c.dit.patch_embedding.weight.dtype
    image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    crops = F.interpolate(torch.rand(1, 3, 8, 8, generator=gen) * 2 - 1, size=(224, 224), mode="bilinear")
    out = {"features": c.motion_encoder(crops).concatenated()}
    out["tokens"] = c.portrait_encoder(torch.cat([out["features"], torch.randn(4, 554, generator=gen)])[None])
    emo, _ = split_emotion_tokens(out["tokens"], 5)
    out["clip"] = c.clip.encode(image)
    (out["text"],) = c.text_encoder.encode("A woman is smiling and talking to the camera.")
    video = torch.cat([image[:, :, None], torch.zeros(1, 3, 4, 32, 32)], dim=2).to(dtype)
    out["latents"] = c.vae.encode(video)
    y = torch.cat([torch.ones(1, 4, 2, 4, 4), out["latents"].float()], dim=1)
    x = torch.randn(1, 16, 2, 4, 4, generator=gen)
    out["flow"] = c.dit(x, torch.tensor([900.0]), [out["text"]], out["clip"], y, emo.to(dtype))
    out["frames"] = decode_all(c.decoder, x, chunk=1)
    return out


# ---- layout, manifest, key sets ----


def test_folder_layout_and_manifest(prepared, release):
    manifest = read_manifest(prepared)
    assert is_prepared(prepared) and not is_prepared(release.root)
    assert manifest["config"] == to_mapping(DeploymentConfig.tiny())
    assert (manifest["modes"], manifest["dtype"], manifest["fp8"]) == (["fast", "quality"], "bfloat16", True)
    components = {"dit_fast", "dit_quality", "dit_fast_fp8", "dit_quality_fp8", "wan_vae", "tiny_vae",
                  "text_encoder", "clip", "portrait_encoder", "motion_encoder"}  # fmt: skip
    assert set(manifest["components"]) == components
    on_disk = {p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file()}
    assert on_disk - set(manifest["files"]) == {"manifest.json"}
    assert set(manifest["files"]) >= {f"{c}.safetensors" for c in components} | {
        "face/face_det.onnx", "face/face_landmark.onnx", "flashportrait_config.json",
        "tokenizer/tokenizer.json",
    }  # fmt: skip
    for name, record in manifest["files"].items():
        path = prepared / name
        assert record["size"] == path.stat().st_size and record["sha256"] == file_sha256(path), name
        if name.endswith(".safetensors"):
            source = SafetensorsFile(path)
            bytes_by_dtype: dict[str, int] = {}
            for key in source:
                info = source.info(key)
                dtype = {F32: "F32", BF16: "BF16", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3"}[
                    info.dtype
                ]
                nbytes = math.prod(info.shape) * info.dtype.itemsize
                bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + nbytes
            assert {k: v["bytes"] for k, v in record["dtypes"].items()} == bytes_by_dtype, name
            assert record["tensors"] == len(source)
    # the face models and the tokenizer are byte copies
    assert file_sha256(prepared / "face/face_det.onnx") == file_sha256(release.face_detector)
    assert (prepared / "tokenizer/tokenizer.json").read_bytes() == (
        release.tokenizer / "tokenizer.json"
    ).read_bytes()
    assert DeploymentConfig.from_json_file(prepared / "flashportrait_config.json") == DeploymentConfig.tiny()
    assert verify_prepared(prepared, hashes=True) == []


def test_dtypes_follow_the_serving_precision(prepared):
    """bf16 everywhere but the float32 encoders; fp8 DiT: e4m3 block linears with float32 scales."""
    for component, allowed in (("dit_fast", {BF16}), ("wan_vae", {BF16}), ("portrait_encoder", {F32}),
                               ("motion_encoder", {F32, torch.int64})):  # fmt: skip
        source = SafetensorsFile(prepared / f"{component}.safetensors")
        assert {source.info(k).dtype for k in source} == allowed, component
    fp8 = SafetensorsFile(prepared / "dit_fast_fp8.safetensors")
    assert fp8.info("blocks.0.ffn.0.weight").dtype == torch.float8_e4m3fn
    assert fp8.info("blocks.0.ffn.0.weight_scale") == TensorInfo((128,), F32)
    assert fp8.info("blocks.0.ffn.0.bias").dtype == BF16
    assert fp8.info("head.head.weight").dtype == BF16  # outside the blocks: not converted
    assert json.loads(fp8.metadata["flashportrait.dit_config"])["dim"] == 64


def test_key_sets_are_the_release_manifests(prepared, shared_dir):
    """Names (block indices folded) and ranks against the real checkpoints' manifests; the full-size
    motion encoder exactly, shapes included."""
    folder = shared_dir / "golden" / "manifests"
    for component, (golden, prefix) in GOLDEN.items():
        manifest = json.loads((folder / f"{golden}.json").read_text())
        release = {k.removeprefix(prefix): tuple(v) for k, v in manifest["keys"].items()}
        source = SafetensorsFile(prepared / f"{component}.safetensors")
        got = {k: tuple(source.info(k).shape) for k in source if not k.endswith(".weight_scale")}
        unknown = set(fold(got)) - set(fold(release))
        assert not unknown, f"{component}: {sorted(unknown)[:5]}"
        assert all(fold(release)[k] == r for k, r in fold(got).items()), component
        if component.startswith("dit_"):
            assert set(fold(got)) == set(fold(release)), component
        if component == "motion_encoder":
            assert got == release
    # what the image tower and the tiny decoder never read is left out
    assert not any(k.startswith("textual.") for k in SafetensorsFile(prepared / "clip.safetensors"))
    assert not any(k.startswith("encoder.") for k in SafetensorsFile(prepared / "tiny_vae.safetensors"))


# ---- identical models and outputs ----


def test_float32_folder_gives_the_release_outputs_bit_for_bit(prepared_f32, release):
    ours = load_components(prepared_f32, mode="fast", dtype=F32)  # through the load_components hook
    theirs = load_components(release.root, mode="fast", dtype=F32)
    assert isinstance(ours.paths, PreparedPaths)
    for name in MODULES:
        assert_same_state(getattr(ours, name), getattr(theirs, name), name)
    assert_same_state(ours.text_encoder.encoder, theirs.text_encoder.encoder, "text_encoder")
    a, b = pipeline_outputs(ours), pipeline_outputs(theirs)
    for name in b:
        assert a[name].dtype == F32 and torch.equal(a[name], b[name]), name
    assert sorted(ours.lora.merged) == sorted(theirs.lora.merged) and not ours.lora.skipped
    # quality mode: the unmerged DiT and the Wan VAE as the decoder
    ours = load_components(prepared_f32, mode="quality", dtype=F32, parts={"dit", "vae"})
    theirs = load_components(release.root, mode="quality", dtype=F32, parts={"dit", "vae"})
    assert ours.lora is None and ours.decoder is ours.vae
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 20, 2, 4, 4, generator=gen)
    text, clip, emo = torch.randn(1, 7, 32), torch.randn(1, 257, 64), torch.randn(1, 2, 97, 64)
    with torch.no_grad():
        for c in (ours, theirs):
            c.outputs = (c.dit(x, torch.tensor([500.0]), text, clip, y, emo), decode_all(c.vae, x, chunk=1))
    assert all(torch.equal(p, q) for p, q in zip(ours.outputs, theirs.outputs, strict=True))


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_bf16_folder_equals_the_release_loaded_in_bf16(prepared, release, mode):
    ours = load_prepared(prepared, mode=mode, dtype=BF16, parts=ALL_PARTS - {"text_encoder"})
    theirs = load_components(release.root, mode=mode, dtype=BF16, parts=ALL_PARTS - {"text_encoder"})
    for name in MODULES:
        if getattr(theirs, name) is not None:
            assert_same_state(getattr(ours, name), getattr(theirs, name), name)
    # the fp8 file: what convert_linears_to_fp8 makes of the loaded (merged) bf16 DiT
    fp8 = load_prepared(prepared, mode=mode, dtype=BF16, parts={"dit"}, precision="fp8").dit
    converted = convert_linears_to_fp8(theirs.dit)
    assert converted and all(name.startswith("blocks.") for name in converted)
    assert_same_state(fp8, theirs.dit, "dit fp8")


def test_lora_merged_in_float32_and_fast_only_folder(release, tmp_path):
    out = tmp_path / "fast_only"
    prepare_weights(release, out, PrepareOptions(modes=("fast",), lora_compute_dtype=F32))
    manifest = read_manifest(out)
    assert manifest["lora"]["compute_dtype"] == "torch.float32" and manifest["modes"] == ["fast"]
    ours = load_prepared(out, mode="fast", dtype=BF16, parts={"dit"})
    theirs = load_components(release.root, mode="fast", dtype=BF16, parts={"dit"}, lora_compute_dtype=F32)
    reference = load_components(release.root, mode="fast", dtype=BF16, parts={"dit"})
    assert_same_state(ours.dit, theirs.dit, "dit")
    assert not torch.equal(ours.dit.blocks[0].ffn[0].weight, reference.dit.blocks[0].ffn[0].weight)
    with pytest.raises(MissingWeightsError, match=r"dit_quality\.safetensors"):
        load_prepared(out, mode="quality", parts={"dit"})
    with pytest.raises(ConfigError, match=r"strength 1\.0, not 0\.5"):
        load_prepared(out, mode="fast", parts={"dit"}, lora_strength=0.5)
    with pytest.raises(ConfigError, match=r"compute dtype torch\.float32, not torch\.bfloat16"):
        load_prepared(out, mode="fast", parts={"dit"}, lora_compute_dtype=BF16)
    # overwriting a prepared folder is allowed, a foreign non-empty folder is not
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="neither empty nor a prepared"):
        prepare_weights(release, tmp_path / "other", PrepareOptions(modes=("quality",)))


# ---- verification, streaming, errors ----


def test_verification_names_every_problem(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    data = bytearray((copy / "dit_fast.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "dit_fast.safetensors").write_bytes(bytes(data))
    (copy / "tokenizer" / "tokenizer.json").unlink()
    shutil.copyfile(copy / "text_encoder.safetensors", copy / "clip.safetensors")
    problems = "\n".join(verify_prepared(copy, hashes=True))
    assert "dit_fast.safetensors: sha256 differs" in problems
    assert "tokenizer/tokenizer.json: missing" in problems
    assert "clip.safetensors: " in problems and "missing tensor(s)" in problems
    assert "clip: token_embedding.weight matches no key of the release checkpoint" in problems
    assert "dit_fast.safetensors: sha256" not in "\n".join(verify_prepared(copy, hashes=False))


def test_reader_reopens_its_input_and_reads_the_same_tensors(release):
    config = DeploymentConfig.tiny().dit
    expected = module_tensor_shapes(build_meta(config))

    def opener():
        return open_dit_checkpoint(
            expected, flashportrait_only_keys(config), release.dit_base(), release.transformer
        )

    reader = StreamingReader(opener, budget=64 * 1024)
    direct = opener()
    for key in expected:
        assert torch.equal(reader[key], direct[key]), key
    assert reader.reopened >= 3


def test_missing_release_files_fail_before_anything_is_written(release, tmp_path):
    partial = tmp_path / "release"
    shutil.copytree(release.root, partial)
    (partial / "FlashPortrait" / "fast_vae.pth").unlink()
    with pytest.raises(MissingWeightsError, match=r"fast_vae\.pth"):
        prepare_weights(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    prepare_weights(partial, tmp_path / "out", PrepareOptions(modes=("quality",), verify=True))
    assert "tiny_vae" not in read_manifest(tmp_path / "out")["components"]


def test_cli_verify(prepared, capsys):
    from flashportrait.export.prepare_weights import main

    assert main(["--verify", str(prepared)]) == 0
    assert "verified" in capsys.readouterr().out
    assert Path(prepared).is_dir()


# ---- the direct reader ----


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")])],
)  # fmt: skip
def test_direct_reader_reads_every_tensor_bit_for_bit(prepared, device):
    for component in ("dit_fast", "dit_fast_fp8", "motion_encoder"):
        path = PreparedPaths(prepared).tensors(component)
        # small chunks and several workers: many chunks, each tensor spread over several of them
        tensors, metadata = read_safetensors(path, device, chunk_bytes=4096, workers=3)
        expected = SafetensorsFile(path)
        assert set(tensors) == set(expected) and metadata == expected.metadata
        for key in expected:
            assert tensors[key].device.type == device and tensors[key].dtype == expected[key].dtype, key
            assert torch.equal(u8(tensors[key]).cpu(), u8(expected[key])), key
    direct = load_prepared(prepared, parts={"dit"}, dtype=BF16, device=device, dit_reader="direct").dit
    mapped = load_prepared(prepared, parts={"dit"}, dtype=BF16, device=device).dit
    assert_same_state(direct, mapped, "dit")

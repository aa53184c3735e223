"""The demo weights folder has the release's file names, formats, key layouts and prefixes.

Key names are checked against the manifests of the real checkpoints (`golden/manifests/`): the tiny
models have fewer repeated blocks, so block indices are folded (`blocks.#.`) before comparing, and
shapes must have the release's rank (and the release's exact shape for the full-size motion encoder).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from flashportrait.export.demo_weights import LORA_RANK, main, transformer_keys, write_demo_weights

from flashportrait.components import DeploymentConfig
from flashportrait.weights import open_checkpoint

RELEASE_FILES = {
    "flashportrait_config.json",
    "Wan2.1-I2V-14B-720P/config.json",
    "Wan2.1-I2V-14B-720P/diffusion_pytorch_model-00001-of-00002.safetensors",
    "Wan2.1-I2V-14B-720P/diffusion_pytorch_model-00002-of-00002.safetensors",
    "Wan2.1-I2V-14B-720P/diffusion_pytorch_model.safetensors.index.json",
    "Wan2.1-I2V-14B-720P/Wan2.1_VAE.pth",
    "Wan2.1-I2V-14B-720P/models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1-I2V-14B-720P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "Wan2.1-I2V-14B-720P/google/umt5-xxl/tokenizer.json",
    "Wan2.1-I2V-14B-720P/google/umt5-xxl/tokenizer_config.json",
    "Wan2.1-I2V-14B-720P/google/umt5-xxl/special_tokens_map.json",
    "FlashPortrait/transformer.pt",
    "FlashPortrait/portrait_encoder.pt",
    "FlashPortrait/pd_fpg.pth",
    "FlashPortrait/face_det.onnx",
    "FlashPortrait/face_landmark.onnx",
    "FlashPortrait/fast_lora_rank64.safetensors",
    "FlashPortrait/fast_vae.pth",
}
FACE_SHA256 = {
    "face_det.onnx": "7ea8de1da304c1459a11f637798bb1140805365aeb3cf6637ca6d61909720aec",
    "face_landmark.onnx": "463aaa48dd24b9d3b966c76accf9a27f7c590a73a3827d5002a975e46bd54995",
}
_REPEATED = re.compile(r"(blocks|transformer|layers)\.\d+\.")


def fold(keys) -> set[str]:
    """Key names with the index of repeated blocks folded, so 2 tiny blocks match 40 real ones."""
    return {_REPEATED.sub(r"\1.#.", k) for k in keys}


def ranks(shapes) -> dict[str, int]:
    return {_REPEATED.sub(r"\1.#.", k): len(s) for k, s in shapes.items()}


def manifest_shapes(manifest: dict, *, strip: str = "", drop=()) -> dict[str, tuple[int, ...]]:
    drop = set(drop)
    return {k.removeprefix(strip): tuple(v) for k, v in manifest["keys"].items() if k not in drop}


def assert_layout(source, expected: dict[str, tuple[int, ...]]) -> None:
    got = {k: tuple(source.info(k).shape) for k in source}
    missing, unexpected = sorted(fold(expected) - fold(got)), sorted(fold(got) - fold(expected))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert ranks(got) == ranks(expected)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_holds_exactly_the_release_files(demo_paths):
    root = demo_paths.root
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files == RELEASE_FILES
    config = DeploymentConfig.from_json_file(demo_paths.config)
    assert config == DeploymentConfig.tiny()


def test_wan_dit_shards_are_the_manifest_minus_flashportrait_keys(demo_paths, manifests):
    manifest = manifests["transformer_i2v_14b"]
    source = open_checkpoint(demo_paths.wan_dit)  # through the index: it must list every shard key
    assert_layout(source, manifest_shapes(manifest, drop=manifest["flashportrait_only_keys"]))
    assert not any("emo_" in k for k in source)
    assert {source.info(k).dtype for k in source} == {torch.float32}
    index = json.loads(demo_paths.wan_dit.read_text())
    assert len(set(index["weight_map"].values())) == 2 and index["metadata"]["total_size"] > 0
    config = json.loads(demo_paths.wan_config.read_text())
    # the real config.json's keys are all there (plus the tiny widths that differ from the defaults)
    assert {"dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "text_len"} <= set(
        config
    )
    assert config["dim"] == 64 and config["text_dim"] == 32


def test_transformer_pt_has_the_state_dict_wrapper_and_emo_keys(demo_paths, manifests):
    manifest = manifests["transformer_i2v_14b"]
    raw = torch.load(demo_paths.transformer, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict"}
    keys = set(raw["state_dict"])
    assert fold(keys) <= fold(manifest["keys"])
    assert fold(manifest["flashportrait_only_keys"]) <= fold(keys)
    assert keys == set(transformer_keys(DeploymentConfig.tiny()))
    emo = raw["state_dict"]["blocks.0.cross_attn.emo_k_proj.weight"]
    assert emo.shape == (64, 64) and emo.dtype == torch.bfloat16 and emo.abs().max() > 0


def test_portrait_encoder_has_the_three_prefixes(demo_paths, manifests):
    source = open_checkpoint(demo_paths.portrait_encoder)
    assert_layout(source, manifest_shapes(manifests["portrait_encoder"]))
    prefixes = {k.split(".")[0] for k in source}
    assert prefixes == {"proj_model", "mouth_proj_model", "emo_proj_model"}


def test_motion_encoder_is_full_size_fp16(demo_paths, manifests):
    manifest = manifests["fan_encoder"]
    source = open_checkpoint(demo_paths.motion_encoder)
    assert {k: tuple(source.info(k).shape) for k in source} == manifest_shapes(manifest)
    for key in source:
        want = torch.int64 if key in manifest["non_float_keys"] else torch.float16
        assert source.info(key).dtype == want, key


def test_fast_lora_uses_the_release_key_format(demo_paths, manifests):
    manifest = manifests["transformer_i2v_14b"]
    source = open_checkpoint(demo_paths.fast_lora)
    targets, suffixes = set(), set()
    for key in source:
        assert key.startswith("diffusion_model."), key
        name = key.removeprefix("diffusion_model.")
        for suffix, param in (
            (".lora_down.weight", ".weight"),
            (".lora_up.weight", ".weight"),
            (".diff_b", ".bias"),
            (".diff_m", ".modulation"),
            (".diff", ".weight"),
        ):
            if name.endswith(suffix):
                targets.add(name.removesuffix(suffix) + param)
                suffixes.add(suffix)
                break
        else:
            raise AssertionError(f"unexpected LoRA key {key}")
    assert suffixes == {".lora_down.weight", ".lora_up.weight", ".diff_b", ".diff_m", ".diff"}
    assert fold(targets) <= fold(manifest_shapes(manifest, drop=manifest["flashportrait_only_keys"]))
    down = source["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    up = source["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    assert down.shape == (LORA_RANK, 64) and up.shape == (64, LORA_RANK)
    assert 0 < (up.float() @ down.float()).std() < 0.05  # small next to weights of std 1/8


def test_fast_vae_holds_encoder_and_decoder(demo_paths, manifests):
    source = open_checkpoint(demo_paths.fast_vae)
    expected = manifest_shapes(manifests["tiny_vae"])
    assert set(source) == set(expected)
    assert ranks({k: source.info(k).shape for k in source}) == ranks(expected)
    assert {source.info(k).dtype for k in source} == {torch.float16}


def test_wan_vae_has_no_model_prefix(demo_paths, manifests):
    source = open_checkpoint(demo_paths.wan_vae)
    assert not any(k.startswith("model.") for k in source)
    assert_layout(source, manifest_shapes(manifests["wan_vae"], strip="model."))


def test_t5_and_clip_layouts(demo_paths, manifests):
    t5 = open_checkpoint(demo_paths.t5)
    assert_layout(t5, manifest_shapes(manifests["t5_umt5_xxl_encoder"]))
    assert {t5.info(k).dtype for k in t5} == {torch.bfloat16}
    clip = open_checkpoint(demo_paths.clip)
    assert not any(k.startswith("model.") for k in clip)
    assert_layout(clip, manifest_shapes(manifests["clip_xlm_roberta_vit_h14"], strip="model."))
    assert any(k.startswith("textual.") for k in clip) and "log_scale" in clip


def test_face_models_are_the_release_onnx_files(demo_paths):
    assert sha256(demo_paths.face_detector) == FACE_SHA256["face_det.onnx"]
    assert sha256(demo_paths.face_landmarks) == FACE_SHA256["face_landmark.onnx"]


def test_same_seed_same_bytes_other_seed_other_weights(demo_paths, tmp_path, capsys):
    # the command-line entry point, seed 0: byte-identical to the fixture's folder
    assert main(["--out", str(tmp_path / "again")]) == 0
    assert "demo weights written" in capsys.readouterr().out
    for name in sorted(RELEASE_FILES):
        assert sha256(tmp_path / "again" / name) == sha256(demo_paths.root / name), name
    other = write_demo_weights(tmp_path / "seed1", seed=1)
    for path, changed in ((other.wan_vae, True), (other.fast_lora, True), (other.wan_config, False)):
        rel = path.relative_to(other.root)
        assert (sha256(path) != sha256(demo_paths.root / rel)) == changed, rel
    a = open_checkpoint(demo_paths.transformer)["blocks.1.self_attn.q.weight"]
    b = open_checkpoint(other.transformer)["blocks.1.self_attn.q.weight"]
    assert not torch.equal(a, b)


def test_release_preset_matches_the_manifest_constructors(manifests):
    release = DeploymentConfig.release()
    ctor = manifests["transformer_i2v_14b"]["ctor"]
    assert release.dit.dim == ctor["dim"] and release.dit.num_layers == ctor["num_layers"]
    assert release.dit.text_dim == ctor["text_dim"]
    t5 = manifests["t5_umt5_xxl_encoder"]["ctor"]
    assert (release.text_encoder.vocab_size, release.text_encoder.num_layers) == (
        t5["vocab"],
        t5["num_layers"],
    )
    clip = manifests["clip_xlm_roberta_vit_h14"]["ctor"]
    assert (release.clip.hidden_dim, release.clip.num_layers) == (clip["vision_dim"], clip["vision_layers"])
    assert release.clip_text.vocab_size == clip["vocab_size"]
    assert (
        release.portrait_encoder.cross_attention_dim
        == manifests["portrait_encoder"]["ctor"]["adapter_proj_dim"]
    )

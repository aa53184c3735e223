"""Loading the DiT from files written in every release layout gives the golden outputs; a wrong,
missing or mis-shaped key fails with a message naming it."""

from __future__ import annotations

import json

import pytest
import torch

from flashportrait.golden import GoldenCase
from flashportrait.models.dit_loading import (
    DiTCheckpointError,
    flashportrait_only_keys,
    load_dit,
    prepared_metadata,
    random_dit,
)
from flashportrait.models.transformer import DiTConfig, WanDiT
from flashportrait.weights import CheckpointError, save_safetensors


@pytest.fixture(scope="module")
def case(golden_dir) -> GoldenCase:
    return GoldenCase.load(golden_dir / "transformer_i2v_tiny.json")


@pytest.fixture(scope="module")
def config(case) -> DiTConfig:
    return DiTConfig.from_reference(case.config["reference_ctor"])


@pytest.fixture(scope="module")
def params(case) -> dict[str, torch.Tensor]:
    source = case.params()
    return {k: source[k] for k in source}


def assert_golden(model: WanDiT, case: GoldenCase) -> None:
    """The loaded model reproduces the golden `ip1` output."""
    variant = next(v for v in case.call["variants"] if v["name"] == "ip1")
    with torch.no_grad():
        out = model(
            case.tensor("input/x"),
            case.tensor("input/t"),
            [case.tensor("input/context_0")],
            case.tensor("input/clip_fea"),
            case.tensor("input/y"),
            case.tensor("input/emo_proj"),
            ip_scale=variant["ip_scale"],
            seq_len=variant["seq_len"],
        )
    rtol, atol = case.rtol_atol("ip1")
    torch.testing.assert_close(out, case.tensor("output/ip1"), rtol=rtol, atol=atol)


def write_wan_release(folder, params, case, *, shards: int = 3, drop=(), extra=None) -> None:
    """The Wan2.1 layout: config.json, diffusion_pytorch_model-0000i-of-0000n.safetensors and the
    index, holding every key except FlashPortrait's expression projections."""
    folder.mkdir(parents=True, exist_ok=True)
    emo = set(flashportrait_only_keys(DiTConfig.from_reference(case.config["reference_ctor"])))
    tensors = {k: v for k, v in params.items() if k not in emo and k not in drop}
    tensors.update(extra or {})
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_safetensors({k: tensors[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", **case.config["reference_ctor"]}
    (folder / "config.json").write_text(json.dumps(config))


def write_transformer_pt(path, tensors, *, wrapped: bool) -> None:
    torch.save({"state_dict": tensors} if wrapped else tensors, path)


def emo_only(params, config) -> dict[str, torch.Tensor]:
    return {k: params[k] for k in flashportrait_only_keys(config)}


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "state_dict"])
def test_wan_shards_plus_transformer_pt_with_emo_keys_only(tmp_path, case, config, params, wrapped):
    write_wan_release(tmp_path / "wan", params, case)
    write_transformer_pt(tmp_path / "transformer.pt", emo_only(params, config), wrapped=wrapped)
    model = load_dit(tmp_path / "wan", tmp_path / "transformer.pt", dtype=torch.float32)
    assert_golden(model, case)


def test_transformer_pt_with_every_key_wins_over_the_shards(tmp_path, case, params):
    # Shards with wrong values everywhere; transformer.pt (the fine-tuned DiT) holds every key.
    write_wan_release(tmp_path / "wan", {k: torch.zeros_like(v) for k, v in params.items()}, case)
    write_transformer_pt(tmp_path / "transformer.pt", params, wrapped=True)
    model = load_dit(
        tmp_path / "wan" / "diffusion_pytorch_model.safetensors.index.json",
        tmp_path / "transformer.pt",
        dtype=torch.float32,
    )
    assert_golden(model, case)


def test_prepared_single_safetensors(tmp_path, case, config, params):
    path = tmp_path / "dit.safetensors"
    save_safetensors(params, path, metadata=prepared_metadata(config))
    assert_golden(load_dit(path, dtype=torch.float32), case)
    plain = tmp_path / "plain.safetensors"
    save_safetensors(params, plain)
    assert_golden(load_dit(plain, config=config, dtype=torch.float32), case)
    with pytest.raises(Exception, match="no DiT configuration"):
        load_dit(plain)


def test_load_in_bfloat16(tmp_path, case, config, params):
    path = tmp_path / "dit.safetensors"
    save_safetensors(params, path, metadata=prepared_metadata(config))
    model = load_dit(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.blocks[1].ffn[0].weight, params["blocks.1.ffn.0.weight"].bfloat16())


def test_wan_release_alone_lacks_the_expression_keys(tmp_path, case, params):
    write_wan_release(tmp_path / "wan", params, case)
    with pytest.raises(
        DiTCheckpointError, match=r"missing key.*blocks\.0\.cross_attn\.emo_k_proj\.weight"
    ) as info:
        load_dit(tmp_path / "wan")
    assert "transformer.pt" in str(info.value)


def test_missing_key_is_named(tmp_path, case, config, params):
    write_wan_release(tmp_path / "wan", params, case, drop=("blocks.1.ffn.0.bias",))
    write_transformer_pt(tmp_path / "transformer.pt", emo_only(params, config), wrapped=False)
    with pytest.raises(DiTCheckpointError, match=r"1 missing key\(s\): blocks\.1\.ffn\.0\.bias"):
        load_dit(tmp_path / "wan", tmp_path / "transformer.pt")


def test_unknown_key_is_named(tmp_path, case, config, params):
    write_wan_release(tmp_path / "wan", params, case)
    overlay = {**emo_only(params, config), "blocks.0.cross_attn.emo_q_proj.weight": torch.zeros(128, 2048)}
    write_transformer_pt(tmp_path / "transformer.pt", overlay, wrapped=True)
    with pytest.raises(
        DiTCheckpointError, match=r"unexpected key\(s\): blocks\.0\.cross_attn\.emo_q_proj\.weight"
    ):
        load_dit(tmp_path / "wan", tmp_path / "transformer.pt")


def test_wrong_shape_is_named(tmp_path, case, config, params):
    write_wan_release(tmp_path / "wan", params, case, extra={"head.head.weight": torch.zeros(64, 127)})
    write_transformer_pt(tmp_path / "transformer.pt", emo_only(params, config), wrapped=False)
    with pytest.raises(
        DiTCheckpointError, match=r"head\.head\.weight \(checkpoint \[64, 127\], model \[64, 128\]\)"
    ):
        load_dit(tmp_path / "wan", tmp_path / "transformer.pt")


def test_overlay_without_expression_keys_is_refused(tmp_path, case, config, params):
    write_wan_release(tmp_path / "wan", params, case)
    write_transformer_pt(
        tmp_path / "transformer.pt", {"head.head.bias": params["head.head.bias"]}, wrapped=False
    )
    with pytest.raises(DiTCheckpointError, match="emo_k_proj/emo_v_proj") as info:
        load_dit(tmp_path / "wan", tmp_path / "transformer.pt")
    assert "blocks.1.cross_attn.emo_v_proj.weight" in str(info.value)


def test_corrupt_overlay_names_the_file(tmp_path, case, params):
    write_wan_release(tmp_path / "wan", params, case)
    (tmp_path / "transformer.pt").write_bytes(b"PK\x03\x04 this is not a real zip archive")
    with pytest.raises(CheckpointError, match=r"transformer\.pt"):
        load_dit(tmp_path / "wan", tmp_path / "transformer.pt")


def test_random_dit_is_reproducible_and_finite(config):
    a = random_dit(config, seed=7)
    b = random_dit(config, seed=7)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.blocks[0].ffn[0].weight, random_dit(config, seed=8).blocks[0].ffn[0].weight)

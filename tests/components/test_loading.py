"""`load_components` on the demo weights: every part in both modes holds exactly what was written,
parts load alone, and missing files and wrong configs are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flashportrait.components import (
    ALL_PARTS,
    FACE_ALIGN_PARTS,
    FEATURE_EXTRACTOR_PARTS,
    SAMPLER_PARTS,
    TEXT_ENCODER_PARTS,
    DeploymentConfig,
    MissingWeightsError,
    WeightPaths,
    check_wan_config,
    load_components,
    wan_config_json,
)
from flashportrait.config import ConfigError
from flashportrait.models.decoding import decode_all
from flashportrait.models.emo_split import split_emotion_tokens
from flashportrait.sampling.schedulers import StepDistillScheduler
from flashportrait.sampling.stepmajor import denoise_step_major
from flashportrait.weights import MergedSource, open_checkpoint, strip_prefix

F32 = torch.float32


@pytest.fixture(scope="module")
def quality(demo_paths):
    return load_components(demo_paths.root, mode="quality", dtype=F32)


@pytest.fixture(scope="module")
def fast(demo_paths):
    return load_components(demo_paths.root, mode="fast", dtype=F32)


def assert_holds(module: torch.nn.Module, source, *, prefix: str = "", dtype=F32) -> None:
    """Every tensor of `module` equals the file's (converted to `dtype`, exact)."""
    state = module.state_dict()
    assert state, "empty module"
    for name, value in state.items():
        want = source[prefix + name]
        if value.is_floating_point():
            assert value.dtype == dtype, name
            want = want.to(dtype)
        assert torch.equal(value.cpu(), want), name


def wan_plus_flashportrait(paths):
    return MergedSource([open_checkpoint(paths.wan_dit), open_checkpoint(paths.transformer)], override=True)


def test_quality_mode_loads_every_part_as_written(quality, demo_paths):
    c, p = quality, demo_paths
    assert c.config == DeploymentConfig.tiny() and c.mode == "quality"
    assert_holds(c.dit, wan_plus_flashportrait(p))
    # embeddings and head come from the Wan shards, blocks from transformer.pt (which wins)
    assert torch.equal(c.dit.head.head.weight, open_checkpoint(p.wan_dit)["head.head.weight"])
    fp_q = open_checkpoint(p.transformer)["blocks.0.self_attn.q.weight"].float()
    assert torch.equal(c.dit.blocks[0].self_attn.q.weight, fp_q)
    assert c.lora is None and c.tiny_vae is None and c.decoder is c.vae
    assert_holds(c.vae, open_checkpoint(p.wan_vae))
    assert_holds(c.text_encoder.encoder, open_checkpoint(p.t5))
    assert_holds(c.clip, strip_prefix(open_checkpoint(p.clip), "visual."))
    assert_holds(c.portrait_encoder, open_checkpoint(p.portrait_encoder))
    assert_holds(c.motion_encoder, open_checkpoint(p.motion_encoder))
    assert c.face.detector == p.face_detector and c.face.landmarks == p.face_landmarks


def test_fast_mode_merges_the_lora_and_uses_the_tiny_decoder(fast, quality, demo_paths):
    lora = open_checkpoint(demo_paths.fast_lora)
    assert fast.lora is not None and not fast.lora.skipped
    merged = dict(fast.lora.merged)
    base = dict(quality.dit.named_parameters())
    for name, param in fast.dit.named_parameters():
        target = name.rpartition(".")[0]
        pre = f"diffusion_model.{target}"
        if f"{pre}.lora_down.weight" in lora and name.endswith(".weight"):
            delta = lora[f"{pre}.lora_up.weight"].float() @ lora[f"{pre}.lora_down.weight"].float()
        elif name.endswith(".bias") and f"{pre}.diff_b" in lora:
            delta = lora[f"{pre}.diff_b"].float()
        elif name.endswith(".modulation") and f"{pre}.diff_m" in lora:
            delta = lora[f"{pre}.diff_m"].float()
        elif name.endswith(".weight") and f"{pre}.diff" in lora:
            delta = lora[f"{pre}.diff"].float()
        else:
            # the expression projections (not in Wan) and the 5-D patch embedding get no LoRA term
            assert "emo_" in name or name == "patch_embedding.weight", f"{name} has no LoRA term"
            assert torch.equal(param, base[name])
            continue
        assert name in merged
        torch.testing.assert_close(param, base[name] + delta, rtol=0, atol=1e-6)
        assert not torch.equal(param, base[name]), name
    assert len(merged) == len(base) - 2 * len(fast.dit.blocks) - 1
    assert fast.decoder is fast.tiny_vae
    assert_holds(fast.tiny_vae, open_checkpoint(demo_paths.fast_vae))  # the decoder.* tensors


def test_lora_strength_scales_the_merge(quality, demo_paths):
    half = load_components(demo_paths.root, mode="fast", dtype=F32, parts={"dit"}, lora_strength=0.5)
    lora = open_checkpoint(demo_paths.fast_lora)
    pre = "diffusion_model.blocks.1.ffn.0"
    delta = lora[f"{pre}.lora_up.weight"].float() @ lora[f"{pre}.lora_down.weight"].float()
    torch.testing.assert_close(
        half.dit.blocks[1].ffn[0].weight, quality.dit.blocks[1].ffn[0].weight + 0.5 * delta, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("parts", "loaded"),
    [
        (TEXT_ENCODER_PARTS, {"text_encoder"}),
        (FEATURE_EXTRACTOR_PARTS, {"motion_encoder"}),
        (FACE_ALIGN_PARTS, {"face"}),
        (SAMPLER_PARTS, {"dit", "vae", "tiny_vae", "clip", "portrait_encoder"}),
    ],
)
def test_each_triton_model_loads_only_its_parts(demo_paths, tmp_path, parts, loaded):
    # every file outside the parts points nowhere: it must not even be looked at
    needed = {
        "text_encoder": {"t5", "tokenizer"},
        "motion_encoder": {"motion_encoder"},
        "face": {"face_detector", "face_landmarks"},
        "dit": {"wan_config", "wan_dit", "transformer", "fast_lora"},
        "vae": {"wan_vae"},
        "tiny_vae": {"fast_vae"},
        "clip": {"clip"},
        "portrait_encoder": {"portrait_encoder"},
    }
    keep = set().union(*(needed[p] for p in parts)) | {"config"}
    fields = {f for n in needed.values() for f in n}
    paths = WeightPaths.under(demo_paths.root, **{f: tmp_path / "absent" for f in fields - keep})
    c = load_components(paths, mode="fast", dtype=F32, parts=parts)
    for part in ALL_PARTS:
        assert (getattr(c, part) is not None) == (part in loaded), part


def test_missing_fast_mode_files_are_one_clear_error(demo_paths, tmp_path):
    paths = WeightPaths.under(
        demo_paths.root, fast_lora=tmp_path / "no_lora.safetensors", fast_vae=tmp_path / "no_vae.pth"
    )
    with pytest.raises(MissingWeightsError) as info:
        load_components(paths, mode="fast", dtype=F32, parts=SAMPLER_PARTS)
    message = str(info.value)
    assert "no_lora.safetensors" in message and "step-distillation LoRA" in message
    assert "no_vae.pth" in message and "tiny VAE" in message
    assert "fast mode" in message and "mode='quality'" in message
    assert [field for field, _ in info.value.missing] == ["fast_lora", "fast_vae"]
    # quality mode needs neither
    c = load_components(paths, mode="quality", dtype=F32, parts=SAMPLER_PARTS)
    assert c.tiny_vae is None and c.lora is None


def test_missing_release_files_name_the_file_and_the_part(demo_paths, tmp_path):
    paths = WeightPaths.under(demo_paths.root, transformer="FlashPortrait/elsewhere.pt", tokenizer=tmp_path)
    with pytest.raises(
        MissingWeightsError, match=r"elsewhere\.pt: FlashPortrait's DiT weights .* needed by dit"
    ):
        load_components(paths, mode="quality", dtype=F32)
    with pytest.raises(MissingWeightsError, match="umT5 tokenizer folder"):
        load_components(paths, mode="quality", dtype=F32, parts=TEXT_ENCODER_PARTS)


def test_wan_config_json_must_agree(demo_paths, tmp_path):
    data = json.loads(demo_paths.wan_config.read_text())
    data["num_layers"] = 3
    wrong = tmp_path / "config.json"
    wrong.write_text(json.dumps(data))
    paths = WeightPaths.under(demo_paths.root, wan_config=wrong)
    with pytest.raises(ConfigError, match=r"num_layers: config.json 3, deployment 2"):
        load_components(paths, mode="quality", dtype=F32, parts={"dit"})
    # the real release's preset against the demo folder: refused before any weight is read
    with pytest.raises(ConfigError, match=r"dim: config.json 64, deployment 5120"):
        load_components(demo_paths.root, config=DeploymentConfig.release(), parts={"dit"})
    # the real config.json's keys agree with the release preset
    real = tmp_path / "real.json"
    real.write_text(json.dumps(wan_config_json(DeploymentConfig.release().dit)))
    check_wan_config(real, DeploymentConfig.release().dit)
    data["mystery"] = 1
    wrong.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="mystery"):
        check_wan_config(wrong, DeploymentConfig.tiny().dit)


def test_deployment_config_json_and_interfaces(demo_paths, tmp_path):
    for preset in (DeploymentConfig.release(), DeploymentConfig.tiny()):
        assert DeploymentConfig.from_mapping(json.loads(preset.to_json())) == preset
    data = json.loads(demo_paths.config.read_text())
    data["dit"]["emo_dim"] = 32
    bad = tmp_path / "flashportrait_config.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"dit.emo_dim = 32 but portrait_encoder.cross_attention_dim = 64"):
        load_components(WeightPaths.under(demo_paths.root, config=bad), parts={"face"})
    data["dit"]["emo_dim"] = 64
    data["surprise"] = True
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="surprise"):
        DeploymentConfig.from_json_file(bad)
    with pytest.raises(ConfigError, match="unknown weight path override"):
        WeightPaths.under(demo_paths.root, lora="x")
    with pytest.raises(ConfigError, match="mode"):
        load_components(demo_paths.root, mode="turbo")
    with pytest.raises(ConfigError, match="parts"):
        load_components(demo_paths.root, parts={"vocoder"})


def test_demo_models_give_finite_non_degenerate_outputs(fast):
    """The tiny pipeline's pieces, chained as the sampler chains them, on random inputs."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        crops = F.interpolate(torch.rand(2, 3, 8, 8) * 2 - 1, size=(224, 224), mode="bilinear")  # smooth
        features = fast.motion_encoder(crops).concatenated()
        # 5 video frames = 2 latent frames (the motion encoder is full size: 2 crops keep this fast)
        tokens = fast.portrait_encoder(torch.cat([features, torch.randn(3, 554)])[None])  # [1, 5 * 24, 64]
        emo, _ = split_emotion_tokens(tokens, 5)  # [1, 2, 97, 64]
        clip = fast.clip.encode(image)
        text = fast.text_encoder.encode("A woman is smiling and talking to the camera.")
        video = torch.cat([image[:, :, None], torch.zeros(1, 3, 4, 64, 64)], dim=2)
        latents = fast.vae.encode(video)  # [1, 16, 2, 8, 8]
        y = torch.cat([torch.ones(1, 4, 2, 8, 8), latents], dim=1)
        x = torch.randn(1, 16, 2, 8, 8)
        flow = fast.dit(x, torch.tensor([900.0]), text, clip, y, emo)
        no_emo = fast.dit(x, torch.tensor([900.0]), text, clip, y, emo, ip_scale=0.0)
        frames_tiny = decode_all(fast.tiny_vae, x)
        frames_wan = decode_all(fast.vae, x)
    for name, value, low, high in (
        ("features", features, 0.2, 5),
        ("feature change", features[0] - features[1], 0.2, 5),
        ("tokens", tokens, 0.3, 3),
        ("clip", clip, 0.3, 3),
        ("text", text[0], 0.3, 3),
        ("latents", latents, 0.05, 5),
        ("flow", flow, 0.3, 3),
        ("tiny frames", frames_tiny, 0.1, 1),
        ("wan frames", frames_wan, 0.1, 1),
    ):
        assert bool(torch.isfinite(value).all()), name
        assert low < value.float().std() < high, (name, value.float().std())
    assert (flow - no_emo).abs().mean() > 0.01  # the expression branch matters
    tokenized = fast.text_encoder.tokenizer("A man nods slowly, smiling; then he looks left!")
    n = int(tokenized.lengths[0])
    assert 2 not in tokenized.input_ids[0, :n].tolist()  # no <unk> in an ordinary English prompt
    assert tokenized.input_ids[0, n - 1] == 1 and n < 40


def test_a_four_step_two_window_generation_gives_unsaturated_frames(fast):
    """The fast path end to end on the demo weights (step-major loop, expression guidance 4, tiny
    decoder): latents stay near unit scale and frames are neither clamped nor constant."""
    torch.manual_seed(0)
    windows = [[0, 1, 2, 3], [2, 3, 4, 5]]  # 6 latent frames = 21 video frames
    with torch.no_grad():
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        tokens = fast.portrait_encoder(torch.randn(1, 21, 554))
        clip = fast.clip.encode(image)
        text = fast.text_encoder.encode("A man nods and smiles.")
        video = torch.cat([image[:, :, None], torch.zeros(1, 3, 12, 64, 64)], dim=2)
        y = torch.cat([torch.ones(1, 4, 4, 8, 8), fast.vae.encode(video)], dim=1)  # one y for every window
        scheduler = StepDistillScheduler()

        def denoise(w: int, step: int, x: torch.Tensor) -> torch.Tensor:
            first, last = windows[w][0] * 4, windows[w][-1] * 4 + 1
            emo, _ = split_emotion_tokens(tokens[:, first * 24 : last * 24], last - first)
            t = scheduler.timesteps[step].expand(2)
            both = fast.dit(x.expand(2, -1, -1, -1, -1), t, text * 2, clip.expand(2, -1, -1),
                            y.expand(2, -1, -1, -1, -1), emo.expand(2, -1, -1, -1),
                            ip_scale=torch.tensor([1.0, 0.0]))  # fmt: skip
            return both[1:] + 4.0 * (both[:1] - both[1:])

        latents = denoise_step_major(windows, denoise, scheduler, torch.randn(1, 16, 6, 8, 8))
        frames = decode_all(fast.decoder, latents)
    assert frames.shape == (1, 3, 21, 64, 64) and bool(torch.isfinite(frames).all())
    assert 0.5 < latents.std() < 2.0
    assert (frames.abs() > 0.999).float().mean() < 0.25
    assert bool((frames.std(dim=(0, 1, 3, 4)) > 0.1).all())


def test_an_empty_folder_lists_every_release_file(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        load_components(tmp_path, mode="fast")
    fields = [field for field, _ in info.value.missing]
    assert len(fields) == 13 and len(set(fields)) == 13
    for name in ("config.json", "diffusion_pytorch_model", "Wan2.1_VAE.pth", "umt5-xxl", "transformer.pt",
                 "pd_fpg.pth", "face_det.onnx", "fast_vae.pth"):  # fmt: skip
        assert name in str(info.value)
    with pytest.raises(MissingWeightsError) as info:
        load_components(tmp_path, mode="quality")
    assert len(info.value.missing) == 11  # no LoRA, no tiny VAE

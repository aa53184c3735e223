"""CLIP image tower: release-layout loading (text tower accepted, never read), real blocks vs float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashportrait.golden import GoldenCase
from flashportrait.golden.kinds.image_encoder import _configs
from flashportrait.models.clip import CLIPVisionConfig, CLIPVisionTower, load_clip_vision, unused_shapes
from flashportrait.weights import CheckpointMismatchError, InMemorySource, TensorSource


@pytest.fixture(scope="module")
def golden(golden_dir):
    return GoldenCase.load(golden_dir / "clip_visual_tiny.json")


def _release_state_dict(golden) -> dict[str, torch.Tensor]:
    """The golden weights in the release file's own layout: `visual.*`, `textual.*`, `log_scale`."""
    params = golden.params()
    return {k.removeprefix("model."): params[k].clone() for k in params}


def _check_tokens(model, golden):
    tokens = model.encode([golden.tensor("input/image")])
    rtol, atol = golden.rtol_atol("tokens")
    torch.testing.assert_close(tokens, golden.tensor("output/tokens"), rtol=rtol, atol=atol)


@pytest.mark.parametrize("prefixed", [False, True], ids=["release", "model-prefixed"])
def test_release_pth_gives_golden_tokens(tmp_path, golden, prefixed):
    sd = _release_state_dict(golden)
    assert any(k.startswith("textual.") for k in sd) and "log_scale" in sd
    if prefixed:  # a state dict saved from the reference's CLIPModel
        sd = {f"model.{k}": v for k, v in sd.items()}
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(sd, path)
    vision, text = _configs(golden)
    model, report = load_clip_vision(path, vision, text, dtype=torch.float32)
    assert report.ok
    assert report.loaded == len(dict(model.state_dict()))
    assert "visual.head" in report.ignored and "textual.norm.weight" in report.ignored
    assert f"visual.transformer.{vision.num_layers - 1}.attn.proj.weight" in report.ignored
    _check_tokens(model, golden)


class _ReadLog(TensorSource):
    """A source that records which tensors were read."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.inner = InMemorySource(tensors)
        self.description = "read-log"
        self.read: list[str] = []

    def __getitem__(self, key):
        self.read.append(key)
        return self.inner[key]

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def __contains__(self, key):
        return key in self.inner

    def info(self, key):
        return self.inner.info(key)


def test_unused_tensors_are_never_read(golden):
    vision, text = _configs(golden)
    source = _ReadLog(_release_state_dict(golden))
    load_clip_vision(source, vision, text, dtype=torch.float32)
    unused = unused_shapes(vision, text)
    assert source.read and not [k for k in source.read if k in unused]
    assert {k for k in source if k not in unused} == set(source.read)


def test_visual_only_file_loads(golden):
    vision, text = _configs(golden)
    unused = unused_shapes(vision, text)
    sd = {k: v for k, v in _release_state_dict(golden).items() if k not in unused}
    model, report = load_clip_vision(InMemorySource(sd), vision, text, dtype=torch.float32)
    assert report.ok and not report.ignored
    _check_tokens(model, golden)


@pytest.mark.parametrize(
    ("damage", "key"),
    [
        ("missing", "visual.transformer.0.attn.to_qkv.bias"),
        ("shape", "textual.blocks.0.ffn.0.weight"),
        ("shape", "visual.head"),
        ("unexpected", "visual.proj"),
    ],
)
def test_wrong_file_names_the_keys(golden, damage, key):
    vision, text = _configs(golden)
    sd = _release_state_dict(golden)
    if damage == "missing":
        del sd[key]
    elif damage == "shape":
        sd[key] = torch.zeros(3, 3)
    else:
        sd[key] = torch.zeros(3)
    with pytest.raises(
        CheckpointMismatchError, match=f"{damage if damage != 'shape' else 'shape mismatch'}"
    ) as info:
        load_clip_vision(InMemorySource(sd), vision, text, dtype=torch.float32)
    assert key in str(info.value)


# ---- real transformer blocks against an independent float64 computation ----


def _reference(
    params: dict[str, torch.Tensor], image: torch.Tensor, cfg: CLIPVisionConfig, dtype: torch.dtype
) -> torch.Tensor:
    """ViT forward written out by hand in `dtype`: image [3, H, W] in [-1, 1] -> [1, L, dim]."""
    p = {k: v.to(dtype) for k, v in params.items()}
    s, ps, dim, heads = cfg.image_size, cfg.patch_size, cfg.hidden_dim, cfg.num_heads
    x = F.interpolate(image.to(dtype)[None], size=(s, s), mode="bicubic", align_corners=False)[0]
    mean = torch.tensor(cfg.pixel_mean, dtype=dtype)[:, None, None]
    std = torch.tensor(cfg.pixel_std, dtype=dtype)[:, None, None]
    x = ((x + 1) / 2 - mean) / std
    g = s // ps
    # patches in row-major grid order, each flattened as (channel, row, col) like the conv kernel
    patches = x.reshape(3, g, ps, g, ps).permute(1, 3, 0, 2, 4).reshape(g * g, 3 * ps * ps)
    tokens = patches @ p["patch_embedding.weight"].reshape(dim, -1).T
    h = torch.cat([p["cls_embedding"][0], tokens]) + p["pos_embedding"][0]

    def ln(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.norm_eps) * p[f"{name}.weight"] + p[f"{name}.bias"]

    h = ln(h, "pre_norm")
    hd = dim // heads
    for i in range(cfg.layers_applied):
        b = f"transformer.{i}."
        y = ln(h, b + "norm1")
        qkv = y @ p[b + "attn.to_qkv.weight"].T + p[b + "attn.to_qkv.bias"]
        q, k, v = qkv.reshape(len(h), 3, heads, hd).unbind(1)
        out = torch.empty_like(y)
        for head in range(heads):
            logits = q[:, head] @ k[:, head].T / math.sqrt(hd)
            w = torch.exp(logits - logits.max(-1, keepdim=True).values)
            out[:, head * hd : (head + 1) * hd] = (w / w.sum(-1, keepdim=True)) @ v[:, head]
        h = h + out @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        y = ln(h, b + "norm2") @ p[b + "mlp.0.weight"].T + p[b + "mlp.0.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        h = h + y @ p[b + "mlp.2.weight"].T + p[b + "mlp.2.bias"]
    return h[None]


def test_real_blocks_match_float64_recomputation():
    cfg = CLIPVisionConfig(
        image_size=42,
        patch_size=14,
        hidden_dim=48,
        mlp_ratio=4,
        num_heads=4,
        num_layers=4,
        layers_applied=3,
        embed_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPVisionTower(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # non-trivial norms and embeddings, weights large enough that every block matters
            param.copy_(
                torch.randn_like(param) * (0.5 if param.dim() < 2 else 0.15)
                + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
            )
    images = [torch.rand(3, 37, 53) * 2 - 1, torch.rand(3, 60, 31) * 2 - 1]
    ours = model.encode(images)
    assert ours.shape == (2, cfg.num_tokens, cfg.hidden_dim) and ours.dtype == torch.float32
    params = dict(model.state_dict())
    for b, image in enumerate(images):
        exact = _reference(params, image, cfg, torch.float64)
        # tolerance: the hand-written computation's own float32 rounding error (a few 1e-6 of the
        # largest activation here); a wrong operation (tanh GELU, a missing scale) is 100x larger
        own_error = (_reference(params, image, cfg, torch.float32).double() - exact).abs().max().item()
        error = (ours[b : b + 1].double() - exact).abs().max().item()
        assert error <= 4 * own_error + 1e-6, (error, own_error)
        assert own_error < 1e-5 * exact.abs().max().item()
    # each block changes the result (the test would notice a skipped or repeated block)
    with torch.no_grad():
        x = model.embed(model.preprocess(images))
        for block in model.transformer:
            y = block(x)
            assert (y - x).abs().max() > 0.1
            x = y


def test_bf16_tower_is_close_to_float32(golden):
    vision, text = _configs(golden)
    model, _ = load_clip_vision(golden.params(), vision, text, dtype=torch.bfloat16)
    tokens = model.encode(golden.tensor("input/image")[None])
    assert tokens.dtype == torch.bfloat16
    ref = golden.tensor("output/tokens")
    assert (tokens.float() - ref).abs().max() < 0.05 * ref.abs().max()

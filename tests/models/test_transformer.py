"""The DiT beyond the golden case: config, RoPE, batching, expression grouping, dtypes."""

from __future__ import annotations

import json

import pytest
import torch

from flashportrait.config import ConfigError
from flashportrait.models import dit_blocks
from flashportrait.models.attention import attention
from flashportrait.models.dit_loading import random_dit
from flashportrait.models.rope import apply_rope, apply_rope_complex, rope_pair_split, rope_tables
from flashportrait.models.transformer import DiTConfig, WanDiT, build_meta, manifest_shapes


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(
        dim=32,
        ffn_dim=48,
        num_heads=2,
        num_layers=2,
        in_dim=36,
        out_dim=16,
        freq_dim=32,
        text_len=8,
        text_dim=16,
        clip_tokens=5,
        clip_dim=24,
        emo_dim=20,
    )
    fields.update(overrides)
    return DiTConfig(**fields)


def tiny_inputs(
    config: DiTConfig, batch: int, frames: int = 3, height: int = 4, width: int = 6, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, frames, height, width, generator=g),
        y=torch.randn(batch, config.in_dim - 16, frames, height, width, generator=g),
        t=torch.rand(batch, generator=g) * 1000,
        clip_fea=torch.randn(batch, config.clip_tokens, config.clip_dim, generator=g),
        emo_proj=torch.randn(batch, frames, 7, config.emo_dim, generator=g),
    )


@pytest.fixture(scope="module")
def model() -> WanDiT:
    return random_dit(tiny_config(), seed=3)


# ---------------------------------------------------------------- config


def test_14b_config_matches_the_manifest(golden_dir):
    manifest = json.loads((golden_dir / "manifests" / "transformer_i2v_14b.json").read_text())
    assert DiTConfig.from_reference(manifest["ctor"]) == DiTConfig.wan_i2v_14b()
    shapes = manifest_shapes(manifest)
    assert shapes == {k: tuple(v) for k, v in manifest["keys"].items()}


def test_config_from_release_config_json(tmp_path):
    # The Wan2.1-I2V-14B-720P config.json: diffusers bookkeeping plus the sizes; the rest are defaults.
    release = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": 5120,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "freq_dim": 256,
        "in_dim": 36,
        "model_type": "i2v",
        "num_heads": 40,
        "num_layers": 40,
        "out_dim": 16,
        "text_len": 512,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(release))
    assert DiTConfig.from_json_file(path) == DiTConfig.wan_i2v_14b()
    assert (
        DiTConfig.from_reference({**release, "in_channels": 36, "hidden_size": 5120})
        == DiTConfig.wan_i2v_14b()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dimm": 3}, "dimm"),
        ({"model_type": "t2v"}, "t2v"),
        ({"window_size": [4, 4]}, "window_size"),
        ({"hidden_size": 64}, "hidden_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"patch_size": [2, 2]}, "patch_size"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(change, message):
    ctor = {
        "dim": 96,
        "ffn_dim": 8,
        "num_heads": 2,
        "num_layers": 1,
        "in_dim": 36,
        "out_dim": 16,
        "freq_dim": 8,
        "text_len": 4,
    }
    with pytest.raises(ConfigError, match=message):
        DiTConfig.from_reference({**ctor, **change})


def test_state_dict_holds_parameters_only():
    meta = build_meta(tiny_config())
    assert set(meta.state_dict()) == {name for name, _ in meta.named_parameters()}
    assert len(list(meta.buffers())) == 0


# ---------------------------------------------------------------- RoPE


def test_rope_split_matches_the_reference():
    assert rope_pair_split(128) == (22, 21, 21)  # 14B: head dim 128
    assert rope_pair_split(32) == (6, 5, 5)  # golden tiny case


@pytest.mark.parametrize("head_dim", [32, 128])
def test_real_rope_equals_the_complex_formulation(head_dim):
    grid = (3, 4, 5)
    seq_len = 3 * 4 * 5 + 7  # padded tokens must stay unrotated
    x = torch.randn(2, seq_len, 3, head_dim, generator=torch.Generator().manual_seed(1))
    expected = apply_rope_complex(x, grid)
    cos, sin = rope_tables(grid, seq_len, head_dim)
    ours = apply_rope(x, cos, sin)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=2e-6)
    assert torch.equal(ours[:, 60:], x[:, 60:])
    # With float64 tables the two are the same arithmetic.
    cos64, sin64 = rope_tables(grid, seq_len, head_dim, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x.double(), cos64, sin64).float(), expected, rtol=0, atol=1e-6)


def test_rope_tables_are_cached_per_grid(model):
    cache = model.rope
    first = cache.get((2, 3, 4), 24, 16, torch.float32, torch.device("cpu"))
    assert cache.get((2, 3, 4), 24, 16, torch.float32, torch.device("cpu")) is first
    assert cache.get((2, 4, 3), 24, 16, torch.float32, torch.device("cpu")) is not first


# ---------------------------------------------------------------- forward


def test_output_shape_and_unpatchify_order(model):
    inputs = tiny_inputs(model.config, batch=1)
    context = [torch.randn(5, model.config.text_dim)]
    captured = {}

    def keep(_module, _inputs, output):
        captured["head"] = output

    handle = model.head.register_forward_hook(keep)
    with torch.no_grad():
        out = model(**inputs, context=context)
    handle.remove()
    assert out.shape == (1, 16, 3, 4, 6) and out.dtype == torch.float32
    # Reference unpatchify: per token (pt, ph, pw, c), einsum 'fhwpqrc->cfphqwr'.
    cells = captured["head"][0].reshape(3, 2, 3, 1, 2, 2, 16)
    torch.testing.assert_close(
        out[0], torch.einsum("fhwpqrc->cfphqwr", cells).reshape(16, 3, 4, 6), rtol=0, atol=0
    )


def test_batched_guidance_passes_equal_separate_calls(model):
    """Two guidance passes (different prompt and ip_scale) as one batch == two calls."""
    cfg = model.config
    one = tiny_inputs(cfg, batch=1, seed=5)
    prompts = [torch.randn(6, cfg.text_dim), torch.randn(3, cfg.text_dim)]
    scales = [1.0, 0.0]
    with torch.no_grad():
        separate = [model(**one, context=[p], ip_scale=s) for p, s in zip(prompts, scales, strict=True)]
        padded = torch.zeros(2, 6, cfg.text_dim)
        padded[0], padded[1, :3] = prompts[0], prompts[1]
        padded[1, 3:] = 7.0  # rows past the length are ignored
        batch = {k: torch.cat([v, v]) for k, v in one.items()}
        together = model(
            **batch, context=padded, context_lens=torch.tensor([6, 3]), ip_scale=torch.tensor(scales)
        )
    torch.testing.assert_close(together[0], separate[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], separate[1][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(separate[0], separate[1], atol=1e-3)


def test_different_samples_in_one_batch(model):
    cfg = model.config
    a, b = tiny_inputs(cfg, batch=1, seed=1), tiny_inputs(cfg, batch=1, seed=2)
    ctx = [torch.randn(4, cfg.text_dim), torch.randn(8, cfg.text_dim)]
    with torch.no_grad():
        both = model(
            **{k: torch.cat([a[k], b[k]]) for k in a}, context=ctx, ip_scale=torch.tensor([0.5, 2.0])
        )
        first = model(**a, context=ctx[:1], ip_scale=0.5)
        second = model(**b, context=ctx[1:], ip_scale=2.0)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_no_expression_tokens_equals_ip_scale_zero(model):
    inputs = tiny_inputs(model.config, batch=1)
    context = [torch.randn(5, model.config.text_dim)]
    with torch.no_grad():
        zero = model(**inputs, context=context, ip_scale=0.0)
        none = model(**{**inputs, "emo_proj": None}, context=context)
        full = model(**inputs, context=context, ip_scale=1.0)
    assert torch.equal(zero, none)
    assert not torch.allclose(zero, full, atol=1e-3)


def test_expression_attention_is_per_latent_frame():
    """The batched grouping equals a loop over frames: frame i's queries see only frame i's tokens."""
    cfg = tiny_config()
    layer = random_dit(cfg, seed=4).blocks[0].cross_attn
    b, f, per, h, d = 2, 3, 5, cfg.num_heads, cfg.head_dim
    q = torch.randn(b, f * per + 2, h, d)  # two trailing tokens outside every group (seq_len padding)
    emo = torch.randn(b, f, 7, cfg.emo_dim)
    with torch.no_grad():
        ours = layer._expression(q, emo)
        for i in range(f):
            k = layer.emo_k_proj(emo[:, i]).view(b, 7, h, d)
            v = layer.emo_v_proj(emo[:, i]).view(b, 7, h, d)
            want = attention(q[:, i * per : (i + 1) * per], k, v).flatten(2)
            torch.testing.assert_close(ours[:, i * per : (i + 1) * per], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[:, f * per :], torch.zeros(b, 2, h * d))


def test_expression_renormalisation_uses_unbiased_statistics():
    x = torch.randn(2, 6, 4) * 3 + 1
    emo = torch.randn(2, 6, 4) * 0.2 - 4
    scale = torch.tensor([1.0, 0.5])
    out = dit_blocks._mix_expression(x, emo, scale)
    for i in range(2):
        e = (emo[i] - emo[i].mean()) * (x[i].std(unbiased=True) / (emo[i].std(unbiased=True) + 1e-5)) + x[
            i
        ].mean()
        torch.testing.assert_close(out[i], x[i] + scale[i] * e)


def test_sequence_padding(model):
    inputs = tiny_inputs(model.config, batch=1)
    context = [torch.randn(5, model.config.text_dim)]
    with torch.no_grad():
        exact = model(**{**inputs, "emo_proj": None}, context=context)
        padded = model(**{**inputs, "emo_proj": None}, context=context, seq_len=3 * 2 * 3 + 5)
    # Without the expression branch, padded tokens are masked keys and cannot change real tokens.
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        model(**inputs, context=context, seq_len=10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"context": [torch.zeros(9, 16)]}, "text_len"),
        ({"context": [torch.zeros(3, 15)]}, "text_dim"),
        ({"emo_proj": torch.zeros(1, 2, 7, 20)}, "emo_proj"),
        ({"t": torch.zeros(2)}, "timestep"),
        ({"ip_scale": torch.ones(3)}, "ip_scale"),
    ],
)
def test_bad_inputs_are_clear_errors(model, change, message):
    inputs = {**tiny_inputs(model.config, batch=1), "context": [torch.zeros(3, 16)], **change}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_bfloat16_weights_keep_float32_islands():
    cfg = tiny_config()
    half = random_dit(cfg, seed=3, dtype=torch.bfloat16)
    full = random_dit(cfg, seed=3, dtype=torch.bfloat16).float()  # the same weights, float32 arithmetic
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    inputs = tiny_inputs(cfg, batch=2)
    context = torch.randn(2, 5, cfg.text_dim)
    seen = {}

    def record(name):
        def hook(_module, _inputs, output):
            seen.setdefault(name, output.dtype)

        return hook

    hooks = [
        half.time_embedding.register_forward_hook(record("e")),
        half.blocks[0].register_forward_hook(record("stream")),
        half.blocks[0].self_attn.q.register_forward_hook(record("q")),
    ]
    with torch.no_grad():
        ref = full(**inputs, context=context)
        out = half(**inputs, context=context)
    for hook in hooks:
        hook.remove()
    assert seen == {"e": torch.float32, "stream": torch.float32, "q": torch.bfloat16}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # Same weights, bf16 matmuls: bf16-level agreement (measured 0.5% relative here).
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, rel


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bfloat16_forward_matches_cpu_float32():
    from flashportrait.models.attention import available_backends, default_backend, set_default_backend

    cfg = tiny_config(dim=128, num_heads=2, ffn_dim=256)  # head dim 64: served by every kernel
    weights = random_dit(cfg, seed=3, dtype=torch.bfloat16)
    cpu = random_dit(cfg, seed=3, dtype=torch.bfloat16).float()
    gpu = weights.to("cuda")
    inputs = tiny_inputs(cfg, batch=2)
    context = torch.randn(2, 5, cfg.text_dim)
    with torch.no_grad():
        want = cpu(**inputs, context=context)
        before = default_backend()
        try:
            for name in [b for b in available_backends("cuda") if b not in ("exact",)]:
                set_default_backend(name)
                out = gpu(**{k: v.cuda() for k, v in inputs.items()}, context=context.cuda()).cpu()
                assert torch.isfinite(out).all(), name
                assert (out - want).norm() / want.norm() < 0.02, name
        finally:
            set_default_backend(before)

"""The DiT's fast path (fused kernels, fused q/k/v, shared guidance rows, fp8) against its reference path.

On the CPU the fast path runs with the kernels' PyTorch references (the automatic backend there), so
these tests check the wiring: same function, float32 rounding differences only. On a GPU they
check the Triton kernels in place, in bf16 and fp8, and that a forward never waits for the device.
"""

from __future__ import annotations

import pytest
import torch

from flashportrait.models import dit_blocks
from flashportrait.models.dit_blocks import FusedProjection
from flashportrait.models.dit_loading import RandomSource, random_dit
from flashportrait.models.fp8_linear import FP8Linear
from flashportrait.weights import load_into, module_tensor_shapes
from tests.models.test_transformer import tiny_config, tiny_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _run(model, fast: bool | None, **inputs) -> torch.Tensor:
    model.fast_path = fast
    try:
        with torch.inference_mode():
            return model(**inputs)
    finally:
        model.fast_path = None


def _guidance_inputs(cfg, device="cpu", shared=True, seed=7):
    """The fast default's two passes (same prompt, ip_scale 1 and 0): per-pass inputs expanded from
    one row as the sampler passes them (shared) or materialised copies."""
    one = {k: v.to(device) for k, v in tiny_inputs(cfg, batch=1, seed=seed).items()}
    one["t"] = one["t"][:1]
    make = (lambda v: v.expand(2, *v.shape[1:])) if shared else (lambda v: torch.cat([v, v]))
    inputs = {k: make(v) for k, v in one.items()}
    prompt = torch.randn(1, 5, cfg.text_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return dict(inputs, context=torch.cat([prompt, prompt]), ip_scale=torch.tensor([1.0, 0.0], device=device))


@pytest.fixture(scope="module")
def model():
    return random_dit(tiny_config(), seed=3)


def test_fast_path_is_off_on_the_cpu_by_default(model):
    assert model.fast_path is None and not model.uses_fast_path()


@pytest.mark.parametrize("seq_pad", [0, 5])
def test_fast_path_equals_reference_path(model, seq_pad):
    cfg = model.config
    inputs = tiny_inputs(cfg, batch=2, seed=1)
    extra = dict(context=torch.randn(2, 5, cfg.text_dim), ip_scale=torch.tensor([0.5, 2.0]))
    if seq_pad:
        extra["seq_len"] = 3 * 2 * 3 + seq_pad
    ref = _run(model, False, **inputs, **extra)
    fast = _run(model, True, **inputs, **extra)
    # float32 throughout: only the order of float32 operations differs.
    assert _rel(fast, ref) < 1e-5


def test_shared_guidance_rows_equal_separate_rows(model):
    """Expanded (stride-0) pass inputs: the stream is computed once until the passes differ; the
    result equals the same values passed as materialised rows."""
    cfg = model.config
    shared = _run(model, True, **_guidance_inputs(cfg, shared=True))
    separate = _run(model, False, **_guidance_inputs(cfg, shared=False))
    assert shared.shape == separate.shape == (2, 16, 3, 4, 6)
    assert _rel(shared, separate) < 1e-5
    assert _rel(shared[0], shared[1]) > 1e-2  # the expression branch still tells the passes apart
    # Identical passes (no expression tokens): the one computed row is returned for both.
    both = _run(model, True, **{**_guidance_inputs(cfg, shared=True), "emo_proj": None})
    assert torch.equal(both[0], both[1])


def test_shared_prompt_context_is_computed_once():
    cfg = tiny_config()
    model = random_dit(cfg, seed=5)
    inputs = _guidance_inputs(cfg, shared=True)
    prompt = inputs.pop("context")[:1]
    seen = []
    hook = model.blocks[0].cross_attn.k.register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].shape[0])
    )
    try:
        expanded = _run(model, True, **inputs, context=prompt.expand(2, -1, -1))
        row = prompt[0]
        listed = _run(model, True, **inputs, context=[row, row])
    finally:
        hook.remove()
    assert seen == [1, 1]
    ref = _run(
        model, False, **{k: v.contiguous() for k, v in inputs.items()}, context=torch.cat([prompt] * 2)
    )
    assert _rel(expanded, ref) < 1e-5 and _rel(listed, ref) < 1e-5


def test_fused_projection_keeps_state_dict_and_follows_reloads():
    cfg = tiny_config()
    model = random_dit(cfg, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = dict(tiny_inputs(cfg, batch=1), context=torch.randn(1, 5, cfg.text_dim))
    first = _run(model, True, **inputs)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    attn = model.blocks[0].self_attn
    fused = attn.qkv_projection()
    assert fused.tensors["weight"].data_ptr() == attn.q.weight.data_ptr()
    assert attn.k.weight.data_ptr() == attn.q.weight.data_ptr() + attn.q.weight.numel() * 4
    # New weights loaded after fusing (load_into replaces the tensors): the next call re-fuses.
    shapes = module_tensor_shapes(model)
    load_into(model, RandomSource(shapes, seed=9, dtype=torch.float32, device="cpu"), strict=True)
    assert not fused.valid((attn.q, attn.k, attn.v))
    reloaded = _run(model, True, **inputs)
    want = _run(random_dit(cfg, seed=9), False, **inputs)
    assert _rel(reloaded, want) < 1e-5 and _rel(reloaded, first) > 1e-2


def test_fused_projection_rejects_mixed_layers():
    attn = random_dit(tiny_config(), seed=3).blocks[0].self_attn
    with pytest.raises(ValueError, match="one kind"):
        FusedProjection((attn.q, FP8Linear.from_linear(attn.k)))


@pytest.mark.parametrize("fp8", [False, True])
def test_mix_and_project_matches_reference(fp8):
    """linear(_mix_expression(...)) with the per-sample constant moved into the bias."""
    g = torch.Generator().manual_seed(0)
    # Means below the spreads, as for attention outputs (the one-read variance needs that).
    x = torch.randn(2, 40, 16, generator=g) * 2 + 0.5
    emo = torch.randn(2, 40, 16, generator=g) * 0.1 - 0.05
    scale = torch.tensor([1.0, 0.25])
    linear = dit_blocks.CastLinear(16, 32)
    if fp8:
        linear = FP8Linear.from_linear(linear)
    with torch.no_grad():
        want = linear(dit_blocks._mix_expression(x.double(), emo.double(), scale.double()).float())
        fast = dit_blocks._mix_and_project(linear, x, emo, scale)
        # One row of x and emo shared by both samples broadcasts to both.
        shared = dit_blocks._mix_and_project(linear, x[:1], emo[:1], scale)
        shared_want = linear(
            dit_blocks._mix_expression(x[:1].expand(2, -1, -1), emo[:1].expand(2, -1, -1), scale)
        )
    assert fast.shape == shared.shape == (2, 40, 32)
    tolerance = 0.05 if fp8 else 1e-6  # fp8: the input is quantised before or after the shift
    assert _rel(fast, want) < tolerance
    assert _rel(shared, shared_want) < tolerance


def test_fp8_blocks_on_the_cpu_stay_close_to_bf16():
    """convert_to_fp8 + fast path (fp8 matmuls emulated on the CPU): the fused q/k/v is fp8 too, and
    the output is within fp8 error of the bf16 model."""
    cfg = tiny_config(dim=64, num_heads=4, ffn_dim=96, emo_dim=32)
    model = random_dit(cfg, seed=3, dtype=torch.bfloat16)
    inputs = dict(tiny_inputs(cfg, batch=2, seed=2), context=torch.randn(2, 5, cfg.text_dim))
    bf16 = _run(model, True, **inputs)
    converted = model.convert_to_fp8("all")
    assert "blocks.0.self_attn.q" in converted and "blocks.1.ffn.2" in converted
    assert not any(name.startswith(("head", "time_", "text_", "img_", "patch")) for name in converted)
    fp8 = _run(model, True, **inputs)
    assert model.blocks[0].self_attn.qkv_projection().fp8
    assert 1e-3 < _rel(fp8, bf16) < 0.1
    assert _rel(_run(model, False, **inputs), fp8) < 0.05  # fp8 reference path: the same layers


def test_context_lens_on_the_host_are_still_checked(model):
    cfg = model.config
    inputs = dict(tiny_inputs(cfg, batch=1), context=torch.randn(1, 5, cfg.text_dim))
    with pytest.raises(ValueError, match="context_lens"):
        model(**inputs, context_lens=torch.tensor([6]))


# ---------------------------------------------------------------- GPU


def _gpu_model(cfg, dtype=torch.bfloat16):
    return random_dit(cfg, seed=3, dtype=dtype, device="cuda")


GPU_CFG = dict(dim=256, num_heads=2, ffn_dim=384, emo_dim=64)  # head dim 128, as the real model


@pytest.mark.gpu
@needs_cuda
def test_gpu_fast_path_matches_reference_path():
    cfg = tiny_config(**GPU_CFG)
    model = _gpu_model(cfg)
    assert model.uses_fast_path()
    float32 = random_dit(cfg, seed=3, dtype=torch.bfloat16, device="cuda").float()
    inputs = {k: v.cuda() for k, v in tiny_inputs(cfg, batch=2, seed=4).items()}
    inputs.update(context=torch.randn(2, 5, cfg.text_dim, device="cuda"), ip_scale=torch.tensor([1.0, 0.5]))
    want = _run(float32, False, **inputs)
    ref = _run(model, False, **inputs)
    fast = _run(model, True, **inputs)
    # The fused path rounds once where the reference rounds twice or three times: its error against
    # float32 may not exceed the reference path's by much.
    assert torch.isfinite(fast).all()
    assert _rel(fast, want) < 1.5 * _rel(ref, want) + 1e-3, (_rel(fast, want), _rel(ref, want))
    shared = _run(model, None, **_guidance_inputs(cfg, "cuda", shared=True))
    separate = _run(model, None, **_guidance_inputs(cfg, "cuda", shared=False))
    assert _rel(shared, separate) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_error_budget():
    cfg = tiny_config(**GPU_CFG)
    model = _gpu_model(cfg)
    inputs = _guidance_inputs(cfg, "cuda", shared=True)
    bf16 = _run(model, None, **inputs)
    model.convert_to_fp8()
    fp8 = _run(model, None, **inputs)
    assert torch.isfinite(fp8).all()
    assert _rel(fp8, bf16) < 0.1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_forward_never_synchronises(fp8):
    """After a warm-up call (kernel compilation, table caches, q/k/v fusion) a forward with inputs on
    the device makes no call that waits for the GPU."""
    cfg = tiny_config(**GPU_CFG)
    model = _gpu_model(cfg)
    if fp8:
        model.convert_to_fp8("all")
    inputs = _guidance_inputs(cfg, "cuda", shared=True)
    inputs["context_lens"] = torch.tensor([5, 5], device="cuda")
    with torch.inference_mode():
        model(**inputs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_fp8_layer_sets():
    cfg = tiny_config(dim=64, num_heads=4, ffn_dim=96, emo_dim=32)
    model = random_dit(cfg, seed=3, dtype=torch.bfloat16)
    names = model.convert_to_fp8("self_attn+ffn")
    assert names and all(".self_attn." in n or ".ffn." in n for n in names)
    assert not isinstance(model.blocks[0].cross_attn.q, FP8Linear)
    model = random_dit(cfg, seed=3, dtype=torch.bfloat16)
    tokens = set(model.convert_to_fp8("tokens"))
    assert "blocks.0.cross_attn.q" in tokens and "blocks.0.cross_attn.k_img" not in tokens
    with pytest.raises(ValueError, match="fp8 layer set"):
        model.convert_to_fp8("most")


def test_speed_benchmarks_run_on_the_cpu():
    """The GPU benchmark scripts get few shots on the H200: keep their CPU modes working."""
    import subprocess
    import sys

    from tests.conftest import REPO

    commands = [
        ["bench/profile_dit.py", "--tiny", "--parts", "model", "--variants", "4", "--no-profile",
         "--warmup", "0", "--repeats", "1"],
        ["bench/dit_fp8_error.py", "--tiny", "--frames", "3", "--layer-sets", "ffn"],
    ]  # fmt: skip
    for command in commands:
        proc = subprocess.run(
            [sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final latents after 4 steps" in proc.stdout and "| ffn |" in proc.stdout

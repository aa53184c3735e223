"""Fused adaLN modulation and gated residuals against the DiT's unfused sequence and float64."""

from __future__ import annotations

import pytest
import torch
from flashportrait.kernels import (
    Fp8Activation,
    gated_residual,
    layernorm_modulate,
    residual_layernorm_modulate,
)
from flashportrait.kernels import reference as ref

from tests.kernels.helpers import (
    assert_as_accurate,
    assert_rounded_once,
    e4m3_step,
    layernorm_modulate_oracle,
)

# (batch, tokens, width): the tiny golden's width, a non-power-of-two width with 3 samples, and the
# full-size width 5,120 (few tokens: the interpreter runs one program per token).
SHAPES = [(1, 80, 128), (3, 37, 96), (2, 3, 5120)]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _block_inputs(b, l, c, device, seed=0, stream_dtype=torch.float32):
    """A residual stream with a per-token offset and spread (LayerNorm must remove the mean), a bf16
    branch output, and the 6-way float32 modulation chunked as the block does (strided views)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, c, generator=g) * (0.5 + 3 * torch.rand(b, l, 1, generator=g))
    x = x + 2 * torch.randn(b, l, 1, generator=g)
    y = torch.randn(b, l, c, generator=g).to(torch.bfloat16)
    e0 = 0.3 * torch.randn(b, 6, c, generator=g)
    weight = 1 + 0.1 * torch.randn(c, generator=g)
    bias = 0.1 * torch.randn(c, generator=g)
    x, y, e0 = x.to(device, stream_dtype), y.to(device), e0.to(device)
    return x, y, e0.chunk(6, dim=1), weight.to(device), bias.to(device)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate(device, shape, out_dtype):
    x, _, (shift, scale, *_), _, _ = _block_inputs(*shape, device)
    h = layernorm_modulate(x, shift, scale, out_dtype=out_dtype, backend="triton")
    assert h.dtype == out_dtype and h.shape == x.shape
    reference = ref.layernorm_modulate_reference(x, shift, scale, out_dtype=out_dtype)
    oracle = layernorm_modulate_oracle(x, shift, scale)
    assert_as_accurate(h, reference, oracle, "norm1 modulation")
    assert_rounded_once(h, oracle, "norm1 modulation")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_then_affine_norm(device, shape):
    """x += gate_msa * attn; h = norm3(x) (affine LayerNorm, no modulation)."""
    x, y, (_, _, gate, *_), weight, bias = _block_inputs(*shape, device, seed=1)
    x_new, h = residual_layernorm_modulate(x, y, gate, weight=weight, bias=bias, backend="triton")
    ref_x, ref_h = ref.residual_layernorm_modulate_reference(x, y, gate, weight=weight, bias=bias)
    oracle_x = x.double() + y.double() * gate.double()
    assert_as_accurate(x_new, ref_x, oracle_x, "residual")
    oracle_h = layernorm_modulate_oracle(x_new, None, None, weight, bias)
    assert_as_accurate(
        h, ref.layernorm_modulate_reference(x_new, weight=weight, bias=bias), oracle_h, "norm3"
    )
    assert_rounded_once(h, oracle_h, "norm3")
    assert torch.allclose(h.float(), ref_h.float(), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("stream_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_ungated_residual_then_modulated_norm(device, shape, stream_dtype):
    """x += cross_attn (no gate); h = norm2(x) * (1 + scale_mlp) + shift_mlp. With a bf16 stream the
    norm sees the rounded stream, as the unfused code does."""
    x, y, (_, _, _, shift, scale, _), _, _ = _block_inputs(*shape, device, seed=2, stream_dtype=stream_dtype)
    x_new, h = residual_layernorm_modulate(x, y, None, shift, scale, backend="triton")
    assert x_new.dtype == stream_dtype
    ref_x, _ = ref.residual_layernorm_modulate_reference(x, y, None, shift, scale)
    assert_as_accurate(x_new, ref_x, x.double() + y.double(), "residual")
    oracle_h = layernorm_modulate_oracle(x_new, shift, scale)
    assert_as_accurate(h, ref.layernorm_modulate_reference(x_new, shift, scale), oracle_h, "norm2")
    assert_rounded_once(h, oracle_h, "norm2")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual(device, shape, inplace):
    x, y, (*_, gate), _, _ = _block_inputs(*shape, device, seed=3)
    original = x.clone()
    out = gated_residual(x, y, gate, inplace=inplace, backend="triton")
    assert (out.data_ptr() == x.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(x, original)
    reference = ref.gated_residual_reference(original, y, gate)
    assert_as_accurate(out, reference, original.double() + y.double() * gate.double(), "gated residual")


def test_modulation_shared_by_all_samples(device):
    """A [1, 1, C] vector (the same timestep for every sample) broadcasts over the batch."""
    x, _, (shift, scale, *_), _, _ = _block_inputs(3, 5, 96, device, seed=4)
    h = layernorm_modulate(x, shift[:1], scale[:1], backend="triton")
    expanded = layernorm_modulate(x, shift[:1].expand(3, 1, 96), scale[:1].expand(3, 1, 96), backend="triton")
    assert torch.equal(h, expanded)
    assert_rounded_once(h, layernorm_modulate_oracle(x, shift[:1], scale[:1]))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp8_output(device, shape):
    """fp8=True: the modulated row quantised per token, as quantize_fp8 would quantise the float32
    modulated values: same scale, and every value within one e4m3 step (float32 differences of the
    fused arithmetic can move a value across a rounding midpoint)."""
    x, y, (shift, scale, gate, *_), _, _ = _block_inputs(*shape, device, seed=5)
    x_new, act = residual_layernorm_modulate(x, y, gate, shift, scale, fp8=True, backend="triton")
    assert isinstance(act, Fp8Activation)
    assert act.data.dtype == torch.float8_e4m3fn and act.scale.shape == (*shape[:2], 1)
    ref_x, h32 = ref.residual_layernorm_modulate_reference(x, y, gate, shift, scale, out_dtype=torch.float32)
    q_ref, s_ref = ref.quantize_fp8_reference(h32)
    assert torch.allclose(act.scale, s_ref, rtol=1e-5, atol=0)
    # Compared on the host: the float64 oracles below are CPU tensors.
    got, want = act.data.double().cpu(), q_ref.double().cpu()  # values on the e4m3 grid, in [-448, 448]
    assert ((got - want).abs() <= e4m3_step(want)).all()
    assert (got != want).double().mean() < 0.01
    # And against float64: the quantisation error of e4m3 (half a step) plus that one step at most.
    oracle = layernorm_modulate_oracle(ref_x, shift, scale) / act.scale.double().cpu()
    assert ((got - oracle).abs() <= 1.5 * e4m3_step(oracle) + 1e-3).all()
    # Plain layernorm_modulate with fp8 agrees with the fused residual variant (another compiled
    # specialisation: float32 contraction choices may move a midpoint value by one step).
    alone = layernorm_modulate(x_new, shift, scale, fp8=True, backend="triton").data.double().cpu()
    assert ((alone - got).abs() <= e4m3_step(got)).all() and (alone != got).double().mean() < 0.01


def test_torch_backend_is_the_reference():
    x, y, (shift, scale, gate, *_), weight, bias = _block_inputs(2, 7, 64, "cpu", seed=6)
    h = layernorm_modulate(x, shift, scale, backend="torch")
    assert torch.equal(h, ref.layernorm_modulate_reference(x, shift, scale))
    x_new, h = residual_layernorm_modulate(x, y, gate, weight=weight, bias=bias, backend="torch")
    ref_x, ref_h = ref.residual_layernorm_modulate_reference(x, y, gate, weight=weight, bias=bias)
    assert torch.equal(x_new, ref_x) and torch.equal(h, ref_h)
    act = layernorm_modulate(x, shift, scale, fp8=True, backend="torch")
    q, s = ref.quantize_fp8_reference(
        ref.layernorm_modulate_reference(x, shift, scale, out_dtype=torch.float32)
    )
    assert torch.equal(act.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(act.scale, s)
    target = x.clone()
    assert gated_residual(target, y, gate, inplace=True, backend="torch") is target
    assert torch.equal(target, ref.gated_residual_reference(x, y, gate))


def test_bad_vector_shape(device):
    x, _, _, _, _ = _block_inputs(2, 3, 64, device, seed=7)
    with pytest.raises(ValueError, match="does not fit"):
        layernorm_modulate(x, torch.zeros(3, 1, 64, device=device), None, backend="triton")

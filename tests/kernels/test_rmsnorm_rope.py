"""Fused q/k RMS norm + 3-axis RoPE against the DiT's unfused sequence and a float64 complex oracle."""

from __future__ import annotations

import pytest
import torch
from flashportrait.kernels import rmsnorm_rope
from flashportrait.kernels.reference import rmsnorm_rope_reference

from flashportrait.models.rope import rope_tables
from tests.kernels.helpers import assert_as_accurate, assert_rounded_once, rmsnorm_rope_oracle

# (batch, seq_len, heads, head_dim, grid): the tiny golden's geometry, its seq_len-padded variant
# (identity rows past the 80 real tokens), the full-size head_dim 128 with a non-power-of-two width,
# and an uneven pair split (head_dim 12: pairs [2, 2, 2]) on a non-square grid.
SHAPES = [
    (1, 80, 4, 32, (5, 4, 4)),
    (2, 88, 4, 32, (5, 4, 4)),
    (1, 24, 3, 128, (2, 3, 4)),
    (2, 30, 5, 12, (2, 3, 5)),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _inputs(b, l, h, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q/k out of a linear layer: a per-token offset and scale make the row statistic matter.
    x = torch.randn(b, l, h * d, generator=g) * (0.5 + torch.rand(b, l, 1, generator=g) * 4)
    x = x + torch.randn(b, l, 1, generator=g)
    weight = 1 + 0.1 * torch.randn(h * d, generator=g)
    return x.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_kernel_as_accurate_as_reference(device, shape, dtype):
    b, l, h, d, grid = shape
    x, weight = _inputs(b, l, h, d, dtype, device)
    cos, sin = rope_tables(grid, l, d, device=device)
    out = rmsnorm_rope(x, weight, cos, sin, h, backend="triton")
    assert out.shape == (b, l, h, d) and out.dtype == dtype and out.device.type == device.type
    reference = rmsnorm_rope_reference(x, weight, cos, sin, h)
    oracle = rmsnorm_rope_oracle(x, weight, grid, h)
    assert_as_accurate(out, reference, oracle, f"{shape} {dtype}")
    # Stronger: float32 throughout, one rounding at the end (the reference rounds three times).
    assert_rounded_once(out, oracle, f"{shape} {dtype}")
    # Rows past the real tokens are normalised but not rotated.
    tokens = grid[0] * grid[1] * grid[2]
    if l > tokens:
        plain = rmsnorm_rope_oracle(x[:, tokens:], weight, (0, 0, 0), h)
        assert_as_accurate(out[:, tokens:], reference[:, tokens:], plain, "padding rows")


def test_tables_as_2d_and_3d(device):
    b, l, h, d, grid = SHAPES[3]
    x, weight = _inputs(b, l, h, d, torch.bfloat16, device, seed=1)
    cos, sin = rope_tables(grid, l, d, device=device)
    a = rmsnorm_rope(x, weight, cos, sin, h, backend="triton")
    c = rmsnorm_rope(x, weight, cos[:, 0], sin[:, 0], h, backend="triton")
    assert torch.equal(a, c)


def test_weight_in_float32_with_bf16_input(device):
    """The DiT may keep norm weights in float32; the kernel reads either."""
    b, l, h, d, grid = SHAPES[2]
    x, weight = _inputs(b, l, h, d, torch.bfloat16, device, seed=2)
    cos, sin = rope_tables(grid, l, d, device=device)
    out32 = rmsnorm_rope(x, weight.float(), cos, sin, h, backend="triton")
    out16 = rmsnorm_rope(x, weight, cos, sin, h, backend="triton")
    assert torch.equal(out32, out16)  # a bf16 weight converts to float32 exactly


def test_noncontiguous_rows(device):
    """A slice of a fused qkv output (row stride 3*width) gives the same result as a copy."""
    b, l, h, d, grid = SHAPES[3]
    qkv, _ = _inputs(b, l, 3 * h, d, torch.bfloat16, device, seed=3)
    _, weight = _inputs(b, l, h, d, torch.bfloat16, device, seed=3)
    k = qkv[..., h * d : 2 * h * d]
    cos, sin = rope_tables(grid, l, d, device=device)
    assert torch.equal(
        rmsnorm_rope(k, weight, cos, sin, h, backend="triton"),
        rmsnorm_rope(k.contiguous(), weight, cos, sin, h, backend="triton"),
    )


def test_reference_matches_oracle_in_float32():
    """The reference itself (and the table layout) against the complex128 formulation."""
    b, l, h, d, grid = SHAPES[1]
    x, weight = _inputs(b, l, h, d, torch.float32, "cpu", seed=4)
    cos, sin = rope_tables(grid, l, d)
    out = rmsnorm_rope_reference(x, weight, cos, sin, h)
    oracle = rmsnorm_rope_oracle(x, weight, grid, h)
    assert torch.allclose(out.double(), oracle, rtol=1e-5, atol=1e-5)


def test_shape_errors():
    x = torch.randn(1, 8, 30)
    cos, sin = rope_tables((2, 2, 2), 8, 10)
    with pytest.raises(ValueError, match="heads"):
        rmsnorm_rope(x, torch.ones(30), cos, sin, 4)
    with pytest.raises(ValueError, match="rows"):
        rmsnorm_rope(x, torch.ones(30), cos[:4], sin[:4], 3)

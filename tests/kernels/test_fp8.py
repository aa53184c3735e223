"""Per-token e4m3 activation quantisation: bit-exact against the reference, exact rounding."""

from __future__ import annotations

import pytest
import torch
from flashportrait.kernels import Fp8Activation, quantize_fp8
from flashportrait.kernels import reference as ref

from tests.kernels.helpers import e4m3_step

# The interpreter converts the loop bound of the kernel's row loop with a deprecated numpy idiom.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (rows, K): the tiny width, a non-power-of-two K that is not a multiple of the kernel's 4096 block,
# the FFN's 13,824 (four blocks), and leading dimensions like [B, F, 97, emo_dim].
SHAPES = [(7, 128), (5, 5000), (2, 13824), (2, 3, 4, 96)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _activations(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitude (the per-token scale must follow them), one all-zero row.
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-12, 8, (*shape[:-1], 1), generator=g))
    x.view(-1, shape[-1])[1] = 0
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bit_exact_against_reference(device, shape, dtype):
    """Both compute absmax and x * (448 / absmax) in float32 and round once to nearest even: the
    codes and scales are identical."""
    x = _activations(shape, dtype, device)
    act = quantize_fp8(x, backend="triton")
    q, s = ref.quantize_fp8_reference(x)
    assert act.data.shape == x.shape and act.scale.shape == (*shape[:-1], 1)
    assert torch.equal(act.data.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(act.scale, s)
    # The zero row stays zero with a finite scale; every row's absmax lands on 448.
    flat = act.data.float().view(-1, shape[-1])
    assert (flat[1] == 0).all() and torch.isfinite(act.scale).all()
    others = torch.cat([flat[:1], flat[2:]])
    assert (others.abs().amax(-1) == 448).all()


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_quantisation_error_bound(device, shape):
    """Against float64: each value within half an e4m3 step of its scaled value."""
    x = _activations(shape, torch.bfloat16, device, seed=1)
    act = quantize_fp8(x, backend="triton")
    scaled = x.double().cpu() / act.scale.double().cpu()
    err = (act.data.double().cpu() - scaled).abs()
    assert (err <= 0.5 * e4m3_step(scaled) * (1 + 1e-6)).all()


def test_rounding_every_e4m3_value_and_midpoint(device):
    """Rows whose absmax is 448 are quantised with a scale of exactly 1, so the kernel's rounding is
    compared with torch's own float32 -> e4m3 conversion on every representable value, every midpoint
    between neighbours (ties to even) and their float32 neighbours."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1])])
    values = torch.cat([values, torch.full((-values.numel() % 127,), 0.5)]).view(-1, 127)
    values = torch.cat([values, torch.full((values.shape[0], 1), 448.0)], dim=1)
    act = quantize_fp8(values.to(device), backend="triton")
    assert (act.scale == 1).all()
    assert torch.equal(act.data.float().cpu(), values.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(6, 256), (3, 13824)], ids=lambda s: "x".join(map(str, s)))
def test_fused_gelu(device, shape, dtype):
    """GELU(tanh) fused on the way in: the float32 GELU agrees with PyTorch's to float32 precision,
    so codes may differ from the reference by one step where a value sits on a rounding midpoint."""
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
    act = quantize_fp8(x, "gelu_tanh", backend="triton")
    q, s = ref.quantize_fp8_reference(x, "gelu_tanh")
    assert torch.allclose(act.scale, s, rtol=1e-6, atol=0)
    got, want = act.data.double().cpu(), q.double().cpu()
    assert ((got - want).abs() <= e4m3_step(want)).all()
    assert (got != want).double().mean() < 0.01
    # Float64 GELU(tanh) of the same inputs, quantised: within half a step plus float32 noise.
    xd = x.double().cpu()
    gelu64 = 0.5 * xd * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd**3)))
    scaled = gelu64 / act.scale.double().cpu()
    assert ((got - scaled).abs() <= 0.5 * e4m3_step(scaled) + 1e-4).all()


def test_dispatch_and_errors():
    x = _activations((4, 64), torch.bfloat16, "cpu", seed=3)
    act = quantize_fp8(x, backend="torch")
    assert isinstance(act, Fp8Activation) and act.shape == x.shape
    assert torch.allclose(act.dequantize(), x.float(), rtol=2**-4, atol=0)
    # Automatic choice on a CPU tensor is the reference, even under the interpreter.
    auto = quantize_fp8(x)
    assert torch.equal(auto.data.view(torch.uint8), act.data.view(torch.uint8))
    with pytest.raises(ValueError, match="activation"):
        ref.quantize_fp8_reference(x, "relu")

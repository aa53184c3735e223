"""FP8Linear: weights quantised once per output channel, per-token activations, in-place conversion."""

from __future__ import annotations

import pytest
import torch
from flashportrait.kernels import quantize_fp8
from flashportrait.kernels.reference import fp8_linear_reference
from torch import nn

from flashportrait.models.fp8_linear import FP8Linear, convert_linears_to_fp8, dit_block_linears
from tests.kernels.helpers import e4m3_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _linear(k, n, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        # Output channels of different magnitudes: the per-channel scale must follow each.
        lin.weight.copy_(
            torch.randn(n, k, generator=g) * k**-0.5 * torch.exp2(torch.randint(-4, 4, (n, 1), generator=g))
        )
        if bias:
            lin.bias.copy_(0.05 * torch.randn(n, generator=g))
    return lin.to(device=device, dtype=torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def test_weight_quantised_per_output_channel():
    lin = _linear(96, 48)
    fp8 = FP8Linear.from_linear(lin)
    w = lin.weight.double()
    assert torch.equal(fp8.weight_scale.double(), (w.abs().amax(1).float() / 448).double())
    scaled = w / fp8.weight_scale.double()[:, None]
    assert (fp8.weight.double().abs().amax(1) == 448).all()
    assert ((fp8.weight.double() - scaled).abs() <= 0.5 * e4m3_step(scaled) * (1 + 1e-6)).all()
    assert torch.equal(fp8.bias, lin.bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(37,), (2, 3, 5)], ids=str)
def test_forward_is_the_fp8_product(lead, bias):
    """Output = the exact product of the quantised operands, rounded to bf16 (the emulation's float32
    accumulation is far below bf16's rounding)."""
    lin = _linear(128, 64, bias=bias, seed=1)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(*lead, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = fp8(x)
    assert out.shape == (*lead, 64) and out.dtype == torch.bfloat16
    act = quantize_fp8(x)
    exact = act.dequantize().double() @ fp8.dequantized_weight().double().T
    if bias:
        exact = exact + lin.bias.double()
    assert _rel(out, exact) < 2**-8
    # A pre-quantised input (what the fused norm kernels emit) gives the same result.
    assert torch.equal(fp8(act), out)


def test_error_against_bf16_within_budget():
    """e4m3 rounds each operand by up to 2^-4 relative (about 2.6% RMS): the product's relative L2
    error is about sqrt(2) x 2.6% = 3.7%; bound it at 5%, and check bf16 itself is 20x better."""
    lin = _linear(512, 256, seed=3)
    with torch.no_grad():
        lin.weight.normal_(0, 512**-0.5)
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(4)).bfloat16()
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    fp8_err = _rel(FP8Linear.from_linear(lin)(x), exact)
    bf16_err = _rel(lin(x), exact)
    assert 0.02 < fp8_err < 0.05
    assert bf16_err < fp8_err / 20


def test_sizes_must_fit_fp8_tiles():
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear(100, 64)
    with pytest.raises(ValueError, match="input features"):
        FP8Linear.from_linear(_linear(64, 32))(torch.randn(3, 48))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(32, 12)  # 12 outputs: not a multiple of 16

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block.ffn(block.q(x).float()).float()
        return self.head(x.float())


def test_convert_in_place_with_the_dit_filter():
    torch.manual_seed(5)
    model = _Model()
    x = torch.randn(4, 8)
    before = model(x)
    names = convert_linears_to_fp8(model, dit_block_linears)
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("q", "ffn.0", "ffn.2")]
    assert isinstance(model.blocks[1].ffn[2], FP8Linear) and isinstance(model.blocks[0].q, FP8Linear)
    assert type(model.embed) is nn.Linear and type(model.head) is nn.Linear
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    after = model(x)
    assert _rel(after, before) < 0.1


def test_convert_with_a_custom_filter_and_errors():
    model = _Model()
    assert convert_linears_to_fp8(model, lambda name, m: name.endswith("ffn.2")) == [
        "blocks.0.ffn.2",
        "blocks.1.ffn.2",
    ]
    with pytest.raises(ValueError, match="fp8 tiles"):
        convert_linears_to_fp8(_Model(), lambda name, m: name == "head")
    with torch.device("meta"):
        meta = _Model()
    with pytest.raises(ValueError, match="meta"):
        convert_linears_to_fp8(meta)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_matches_emulation(fast_accum):
    """torch._scaled_mm with row-wise scales against the float32 emulation of the same fp8 product:
    both round to bf16 (relative RMS about 2^-9 each); fast accumulation adds the tensor core's
    reduced-precision partial sums, still far below fp8's own 3.7%."""
    lin = _linear(512, 256, seed=6, device="cuda")
    fp8 = FP8Linear.from_linear(lin, fast_accum=fast_accum)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    act = quantize_fp8(x)
    out = fp8(act)
    emulated = fp8_linear_reference(act.data, act.scale, fp8.weight, fp8.weight_scale, fp8.bias)
    assert _rel(out, emulated) < (1e-2 if fast_accum else 4e-3)

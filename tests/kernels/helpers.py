"""Float64 oracles and the error comparison shared by the kernel tests.

Tolerance rule (as flash-attention tests its kernels): a fused kernel and the plain PyTorch
reference both compute in low precision; each is compared with a float64 oracle on the same inputs,
and the kernel's error may be at most FACTOR times the reference's own error, plus a floor of a few
units in the last place of float32 (where both errors are at that level, e.g. float32 outputs, the
order of float32 operations alone decides which is larger).
"""

from __future__ import annotations

import torch

FACTOR = 2.0
FLOAT32_FLOOR_ULPS = 8


def errors(value: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative L2 error) of value against a float64 oracle."""
    diff = value.double().cpu() - oracle.double().cpu()
    return diff.abs().max().item(), (diff.norm() / oracle.double().cpu().norm().clamp_min(1e-300)).item()


def assert_as_accurate(kernel: torch.Tensor, reference: torch.Tensor, oracle: torch.Tensor, what: str = ""):
    """The kernel's max and relative-L2 errors against the oracle are within FACTOR x the reference's
    (+ a float32 floor)."""
    assert kernel.shape == reference.shape == oracle.shape, (kernel.shape, reference.shape, oracle.shape)
    assert torch.isfinite(kernel.float()).all(), f"{what}: non-finite kernel output"
    k_max, k_rel = errors(kernel, oracle)
    r_max, r_rel = errors(reference, oracle)
    floor = FLOAT32_FLOOR_ULPS * torch.finfo(torch.float32).eps
    scale = oracle.abs().max().item()
    assert k_max <= FACTOR * r_max + floor * scale, f"{what}: max error {k_max:.3g} vs reference {r_max:.3g}"
    assert k_rel <= FACTOR * r_rel + floor, f"{what}: relative L2 error {k_rel:.3g} vs reference {r_rel:.3g}"


def assert_rounded_once(kernel: torch.Tensor, oracle: torch.Tensor, what: str = ""):
    """Half-precision outputs computed in float32 and rounded once: every element within half a unit
    in the last place of the output dtype of the oracle, plus float32 noise (64 ulps of the largest
    value, which can push a value across a rounding midpoint)."""
    dtype = kernel.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    o = oracle.double().cpu()
    smallest = torch.finfo(dtype).smallest_normal
    ulp = torch.exp2(torch.floor(torch.log2(o.abs().clamp_min(smallest))) - mantissa)
    bound = 0.5 * ulp + 64 * torch.finfo(torch.float32).eps * o.abs().max()
    excess = (kernel.double().cpu() - o).abs() - bound
    assert excess.max() <= 0, f"{what}: {int((excess > 0).sum())} elements off by more than half an ulp"


def rope_angles64(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[f*h*w, head_dim/2] float64 angles, written from the golden notes independently of
    flashportrait.models.rope: pairs split (c - 2(c//3), c//3, c//3) over (frame, height, width),
    pair i of an axis with p pairs turns by pos * theta^(-2i / (2p))."""
    f, h, w = grid
    c = head_dim // 2
    split = (c - 2 * (c // 3), c // 3, c // 3)
    grids = torch.meshgrid(
        torch.arange(f, dtype=torch.float64),
        torch.arange(h, dtype=torch.float64),
        torch.arange(w, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for pos, pairs in zip(grids, split, strict=True):
        inv = theta ** (-torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        parts.append(pos.reshape(-1, 1) * inv)
    return torch.cat(parts, dim=1)


def rmsnorm_rope_oracle(
    x: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int, int], num_heads: int, eps: float = 1e-6
) -> torch.Tensor:
    """float64 RMS norm over the full width, then the reference's complex128 rotation of the first
    f*h*w tokens (the rest unrotated). x: [B, L, H*D] -> [B, L, H, D] float64."""
    b, l, width = x.shape
    xd = x.double().cpu()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double().cpu()
    heads = normed.view(b, l, num_heads, width // num_heads)
    tokens = grid[0] * grid[1] * grid[2]
    d = width // num_heads
    freqs = torch.polar(torch.ones(tokens, d // 2, dtype=torch.float64), rope_angles64(grid, d))
    z = torch.view_as_complex(heads[:, :tokens].reshape(b, tokens, num_heads, d // 2, 2).contiguous())
    turned = torch.view_as_real(z * freqs[None, :, None, :]).flatten(-2)
    return torch.cat([turned, heads[:, tokens:]], dim=1)


def layernorm_modulate_oracle(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """float64 `LN(x) [* w + b] * (1 + scale) + shift`; vectors [B, 1, C] or [1, 1, C]."""
    xd = x.double().cpu()
    mean = xd.mean(-1, keepdim=True)
    y = (xd - mean) * torch.rsqrt((xd - mean).pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double().cpu()
    if bias is not None:
        y = y + bias.double().cpu()
    if scale is not None:
        y = y * (1 + scale.double().cpu())
    if shift is not None:
        y = y + shift.double().cpu()
    return y


def e4m3_step(value: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid at |value| (float64): 2^(e-3) for normal values, 2^-9 below 2^-6."""
    v = value.double().abs().clamp_min(2.0**-6)
    return torch.exp2(torch.floor(torch.log2(v)) - 3)

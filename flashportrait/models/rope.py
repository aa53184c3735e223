"""3-axis rotary position embedding of the Wan2.1 DiT, computed with real arithmetic.

Reference behaviour (golden `transformer_i2v` notes): a head of `head_dim` channels holds
`c = head_dim / 2` complex pairs, consecutive channels (2j, 2j+1) being (real, imag). The pairs are
split `[c - 2 (c // 3), c // 3, c // 3]` between the (frame, height, width) axes of the token grid
after patching, and each axis uses its own width in the exponent: pair i of an axis with p pairs
turns by `pos * theta^(-i / p)`. The reference multiplies complex128 numbers per sample; we build
cos/sin tables once per grid (angles in float64, then rounded to the compute precision) and rotate
with two real multiply-adds per pair, which is the same product. Tokens past `f*h*w` (the `seq_len`
padding) are left unrotated: their table rows are cos 1, sin 0.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per (frame, height, width) axis for one head of `head_dim` channels."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(positions: int, pairs: int, theta: float) -> torch.Tensor:
    """[positions, pairs] float64 angles, the reference's `rope_params(positions, 2 * pairs)`."""
    width = 2 * pairs
    inv = 1.0 / torch.pow(theta, torch.arange(0, width, 2, dtype=torch.float64).div(width))
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of every token of a (f, h, w) grid: [f*h*w, head_dim/2] float64, tokens in
    (f, h, w) row-major order (the order of `patch_embedding(x).flatten(2)`)."""
    f, h, w = grid
    pf, ph, pw = rope_pair_split(head_dim)
    af = _axis_angles(f, pf, theta)[:, None, None, :].expand(f, h, w, pf)
    ah = _axis_angles(h, ph, theta)[None, :, None, :].expand(f, h, w, ph)
    aw = _axis_angles(w, pw, theta)[None, None, :, :].expand(f, h, w, pw)
    return torch.cat([af, ah, aw], dim=-1).reshape(f * h * w, pf + ph + pw)


def rope_tables(
    grid: tuple[int, int, int],
    seq_len: int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [seq_len, 1, head_dim/2] in `dtype` on `device`; rows past f*h*w are the
    identity rotation (cos 1, sin 0)."""
    angles = rope_angles(grid, head_dim, theta)
    tokens = angles.shape[0]
    if seq_len < tokens:
        raise ValueError(f"seq_len {seq_len} is smaller than the {tokens} tokens of grid {grid}")
    cos = torch.ones(seq_len, head_dim // 2, dtype=torch.float64)
    sin = torch.zeros(seq_len, head_dim // 2, dtype=torch.float64)
    cos[:tokens] = torch.cos(angles)
    sin[:tokens] = torch.sin(angles)
    return cos[:, None].to(device=device, dtype=dtype), sin[:, None].to(device=device, dtype=dtype)


@lru_cache(maxsize=4)
def _identity_tables(seq_len: int, half: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.ones(seq_len, half, dtype=torch.float32, device=device),
        torch.zeros(seq_len, half, dtype=torch.float32, device=device),
    )


def identity_tables(
    seq_len: int, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) = (1, 0) tables [seq_len, head_dim/2] float32: the fused RMS-norm + RoPE kernel
    with these is a plain RMS norm (cross-attention q). Cached per (length, width, device)."""
    return _identity_tables(seq_len, head_dim // 2, torch.device(device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, L, H, D] by tables [L, 1, D/2]; computed in the tables' dtype, returned in x's.

    (a + ib)(cos + i sin) = (a cos - b sin) + i (a sin + b cos), pairs interleaved as in the reference.
    """
    d = x.shape[-1]
    pairs = x.to(cos.dtype).unflatten(-1, (d // 2, 2))
    re, im = pairs.unbind(-1)
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_complex(x: torch.Tensor, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """The reference formulation (complex128 per sample), kept as the test oracle for `apply_rope`.

    x: [B, L, H, D]; the first f*h*w tokens are rotated, the rest copied; returns float32.
    """
    _, _, h, d = x.shape
    tokens = grid[0] * grid[1] * grid[2]
    freqs = torch.polar(torch.ones(tokens, d // 2, dtype=torch.float64), rope_angles(grid, d, theta))
    rotated = []
    for sample in x:
        z = torch.view_as_complex(sample[:tokens].to(torch.float64).reshape(tokens, h, d // 2, 2))
        turned = torch.view_as_real(z * freqs[:, None, :]).flatten(2)
        rotated.append(torch.cat([turned, sample[tokens:].to(torch.float64)]))
    return torch.stack(rotated).float()


class RopeCache:
    """(cos, sin) tables per (grid, seq_len, head_dim, dtype, device), the most recent few kept.

    A plain attribute of the model (not a buffer): nothing of it enters the state dict, and the
    sampler's windows all share one grid, so the tables are built once per video size.
    """

    def __init__(self, theta: float, capacity: int = 8):
        self.theta = theta
        self.capacity = capacity
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(
        self,
        grid: tuple[int, int, int],
        seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), seq_len, head_dim, dtype, str(device))
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        tables = rope_tables(grid, seq_len, head_dim, theta=self.theta, dtype=dtype, device=device)
        self._tables[key] = tables
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
        return tables

"""Building blocks of the Wan 2.1 causal 3-D VAE (`wan_vae.py` assembles them).

Reference: `wan.models.wan_vae` (`CausalConv3d`, `RMS_norm`, `ResidualBlock`, `AttentionBlock`,
`Resample`, `Encoder3d`, `Decoder3d`) and golden case `wan_vae_tiny` (its `notes` are the contract).
Parameter names are those of `Wan2.1_VAE.pth`.

Causality and the cache. Every temporal convolution pads in front only, so frame `t` sees frames
`t-2..t`. The reference runs the encoder on chunks of 1, 4, 4, ... frames and the decoder one latent
frame at a time, keeping per layer the last 2 frames of that layer's input (`feat_cache`, CACHE_T=2)
and padding with zeros where fewer exist. We keep the same memory in an explicit `CausalCache` (one
slot per cached layer, owned by the caller, never by the module) initialised with 2 zero frames: the
conv then always sees `cat(cache, x)`, which holds exactly the frames (cached or zero) the reference's
padding produces. Because every other operation is per frame, a chunk of any length gives the same
numbers as the reference's one-frame-at-a-time loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.models.attention import attention

# Frames of its input a temporal kernel-3 convolution keeps between chunks (reference CACHE_T).
CACHE_FRAMES = 2


@dataclass
class CausalCache:
    """One request's causal memory for one encoder or decoder: slot i belongs to the layer whose
    `slot` is i. Tensors are `[B, C, 2, h, w]` (1 frame for the encoder's temporal downsampling)."""

    slots: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, size: int) -> CausalCache:
        return cls(slots=[None] * size)

    def nbytes(self) -> int:
        """Bytes held; constant once every slot is filled, whatever the video length."""
        return sum(t.numel() * t.element_size() for t in self.slots if t is not None)


def assign_cache_slots(module: nn.Module) -> int:
    """Number the layers under `module` that keep causal memory; returns how many slots a cache needs."""
    count = 0
    for layer in module.modules():
        if getattr(layer, "uses_cache", False):
            layer.slot = count
            count += 1
    return count


class CausalConv3d(nn.Conv3d):
    """A Conv3d with all temporal padding in front, taken from the cache (reference `CausalConv3d`:
    F.pad(W, W, H, H, 2*pad_t, 0) with cached frames replacing the zeros)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.front_frames = 2 * pad_t
        self.spatial_padding = (0, pad_h, pad_w)
        self.uses_cache = self.front_frames > 0
        self.slot = -1

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: [B, C, t, h, w] -> [B, C_out, t', h', w']; reads and updates this layer's cache slot."""
        if self.uses_cache:
            if cache is None:
                raise ValueError("a temporal CausalConv3d needs a CausalCache")
            past = cache.slots[self.slot]
            if past is None:
                b, c, _, h, w = x.shape
                past = x.new_zeros(b, c, self.front_frames, h, w)
            x = torch.cat([past, x], dim=2)
            # clone: a view would keep the whole chunk alive until the next one.
            cache.slots[self.slot] = x[:, :, -self.front_frames :].clone()
        return F.conv3d(x, self.weight, self.bias, self.stride, self.spatial_padding)


class RMSNorm(nn.Module):
    """Reference `RMS_norm`: F.normalize over channels * sqrt(C) * gamma (its bias is a constant 0).
    `images` selects the gamma shape [C, 1, 1] (2-D input) instead of [C, 1, 1, 1]."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm, SiLU, conv3, norm, SiLU, (dropout), conv3, plus a 1x1x1 shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices match the checkpoint: residual.0/.3 norms, residual.2/.6 convs (5 was dropout).
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        # [b*t, h*w, 1 head, c] each: q, k, v are channel blocks [0:c], [c:2c], [2c:3c].
        q, k, v = (part.unsqueeze(2) for part in qkv.chunk(3, dim=-1))
        # Head width is the full channel count (384 at full size), beyond FlashAttention's 256, so on
        # the GPU in half precision let PyTorch's SDPA pick a kernel that supports it.
        backend = "sdpa" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and c > 256 else None
        out = attention(q, k, v, backend=backend)  # [b*t, h*w, 1, c]
        out = out.squeeze(2).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return out + identity


class Upsample2x(nn.Module):
    """Nearest x2 in height and width (reference: nearest-exact in float32, which copies pixels, so any
    dtype gives the same values and the float32 round trip is skipped)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class PadRightBottom(nn.Module):
    """Reference ZeroPad2d((0, 1, 0, 1)) before the stride-2 3x3 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with the temporal part (reference `Resample`).

    upsample3d: `time_conv` (kernel 3, 2C outputs) turns each frame into two (channel block j -> frame
    2t+j), then x2 nearest and a 3x3 conv to C/2. The very first frame of a stream skips `time_conv`
    (reference 'Rep' marker) and the next frame's `time_conv` sees zeros, not frame 0.
    downsample3d: pad + stride-2 3x3 conv, then `time_conv` (kernel 3, stride 2, no padding) over
    (last frame of the previous chunk, this chunk); the very first frame passes through unchanged.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.uses_cache = mode == "downsample3d"
        self.slot = -1
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(PadRightBottom(), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """x: [B, C, t, h, w] -> [B, C/2, t or ~2t, 2h, 2w] (up) or [B, C, t or ~t/2, h/2, w/2] (down)."""
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b, c, t, h, w = x.shape
        frames = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        _, c2, h2, w2 = frames.shape
        x = frames.reshape(b, t, c2, h2, w2).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, _, h, w = x.shape
        parts = []
        if cache.slots[self.time_conv.slot] is None:
            first, x = x[:, :, :1], x[:, :, 1:]
            # Zeros stand in for the reference's zero padding after the 'Rep' marker.
            cache.slots[self.time_conv.slot] = first.new_zeros(b, c, CACHE_FRAMES, h, w)
            parts.append(first)
        t = x.shape[2]
        if t:
            y = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
            parts.append(y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        parts = []
        if cache.slots[self.slot] is None:
            first, x = x[:, :, :1], x[:, :, 1:]
            cache.slots[self.slot] = first.clone()
            parts.append(first)
        t = x.shape[2]
        if t:
            if t % 2:
                raise ValueError(
                    f"the causal encoder takes frames in pairs after the first at this level, got {t}"
                )
            y = self.time_conv(torch.cat([cache.slots[self.slot], x], dim=2))
            cache.slots[self.slot] = x[:, :, -1:].clone()
            parts.append(y)
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _run(layers: nn.Module, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    """Video [B, 3, t, H, W] -> moments [B, out_channels, t', H/8, W/8] (reference `Encoder3d`)."""

    def __init__(
        self,
        dim: int,
        out_channels: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_scales: tuple[float, ...],
        temporal_downsample: tuple[bool, ...],
    ):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])
        )
        self.head = nn.Sequential(
            RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder3d(nn.Module):
    """Latents [B, z, t, h, w] -> video [B, 3, ~4t, 8h, 8w] (reference `Decoder3d`)."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_scales: tuple[float, ...],
        temporal_upsample: tuple[bool, ...],
    ):
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous level's Resample convolved down to half the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x

"""The TAEHV tiny video VAE decoder ("taew2_1", `fast_vae.pth`), streaming.

Reference: `wan.models.wan_vae_tiny.TAEHV` (decoder) wrapped by `WanVAE_tiny.decode` (REFERENCE.md 1.1,
2.9; golden case `tiny_vae_decoder`). The fast path keeps the Wan VAE's encoder and replaces only the
decoder by this one, so no encoder is built here; the release file's `encoder.*` keys are accepted
and left unread.

Decoder (23 entries, indices = checkpoint keys `decoder.<i>`): Clamp (tanh(x/3)*3), conv 3x3, ReLU,
then three stages of [3 MemBlocks, nearest x2 upsample, TGrow, conv 3x3 without bias], ReLU, conv to
RGB. A MemBlock mixes each frame with the previous frame's INPUT to that block (zeros before the first
frame); TGrow is a 1x1 conv to `s*C` channels whose channel block j becomes the j-th of `s` frames.
That per-block one-frame memory is all the state: we carry it between chunks, so a chunk of any length
gives the frames of decoding the whole video at once (the reference's sequential mode; its parallel
mode agrees to float rounding).

`WanVAE_tiny.decode` around it: latents go in NORMALISED (`need_scaled: false` in the fast config;
with `need_scaled` they are first de-normalised with the Wan constants), the output is clamped to
[0, 1], the first `2**sum(time_upscale) - 1` = 3 frames are dropped and the rest mapped to [-1, 1]:
T latent frames -> 4T - 3 frames, lined up with the Wan VAE's frames (see `decoding.py`). We clamp in
the module dtype as the reference does, but map to [-1, 1] in float32 (the reference maps in bf16,
where `2x - 1` can round by one bf16 step; float32 is the exact value of the same formula).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.models.decoding import DecodeState
from flashportrait.models.wan_vae import LATENTS_MEAN, LATENTS_STD
from flashportrait.weights import (
    CheckpointError,
    InMemorySource,
    TensorSource,
    load_into,
    module_tensor_shapes,
    open_checkpoint,
)

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."


@dataclass(frozen=True)
class TinyVaeConfig:
    """TAEHV (model_type wan21, patch_size 1); names as in the golden case's `config.neutral`.

    decoder_widths: n_f of the four decoder stages. time_upscale / space_upscale: which TGrow doubles
    frames / which upsample doubles pixels (reference decoder_time_upscale / decoder_space_upscale).
    need_scaled: de-normalise the latents first (reference `need_scaled`; the fast config has false).
    encoder_width: width of the release file's (unused) encoder, for its key shapes only.
    """

    latent_channels: int = 16
    decoder_widths: tuple[int, ...] = (256, 128, 64, 64)
    time_upscale: tuple[bool, ...] = (True, True)
    space_upscale: tuple[bool, ...] = (True, True, True)
    need_scaled: bool = False
    image_channels: int = 3
    encoder_width: int = 64

    def __post_init__(self) -> None:
        if len(self.decoder_widths) != 4 or len(self.time_upscale) != 2 or len(self.space_upscale) != 3:
            raise ValueError(
                "TAEHV needs 4 decoder_widths, 2 time_upscale and 3 space_upscale flags, got "
                f"{self.decoder_widths}, {self.time_upscale}, {self.space_upscale}"
            )

    @classmethod
    def taew2_1(cls) -> TinyVaeConfig:
        """The released fast_vae.pth (TAEHV taew2_1, 9.8M decoder parameters)."""
        return cls()

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.time_upscale)

    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(self.space_upscale)

    @property
    def frames_to_trim(self) -> int:
        return self.temporal_factor - 1


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Upsample(nn.Module):
    """Nearest upsampling by `factor` (nn.Upsample default mode; factor 1 is the identity)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="nearest") if self.factor > 1 else x


class MemBlock(nn.Module):
    """ReLU(conv(cat[x, past]) + skip(x)) with past = the previous frame's input to this block."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: [N, C, h, w] (frames flattened into N) -> [N, C_out, h, w]."""
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """1x1 conv C -> s*C, then each frame becomes s frames (channel block j -> frame j)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B*t, C, h, w] (frame-major within each batch item) -> [B*t*s, C, h, w]."""
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


@dataclass
class TinyDecodeState(DecodeState):
    """Per-MemBlock memory (the last frame's input, [B, C, h, w]) and frames still to trim."""

    memory: dict[int, torch.Tensor] = field(default_factory=dict)
    trim_left: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.memory.values())


class TinyVaeDecoder(nn.Module):
    """TAEHV's decoder; implements `decoding.StreamingDecoder`."""

    def __init__(self, config: TinyVaeConfig):
        super().__init__()
        self.config = config
        n_f = config.decoder_widths
        layers: list[nn.Module] = [Clamp(), _conv(config.latent_channels, n_f[0]), nn.ReLU()]
        time_strides = (1, *(2 if t else 1 for t in config.time_upscale))
        for stage in range(3):
            width = n_f[stage]
            layers += [MemBlock(width, width) for _ in range(3)]
            layers += [
                Upsample(2 if config.space_upscale[stage] else 1),
                TGrow(width, time_strides[stage]),
                _conv(width, n_f[stage + 1], bias=False),
            ]
        layers += [nn.ReLU(), _conv(n_f[3], config.image_channels)]
        self.decoder = nn.Sequential(*layers)

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    def begin(self, batch: int) -> TinyDecodeState:
        return TinyDecodeState(batch=batch, trim_left=self.config.frames_to_trim)

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor, state: TinyDecodeState) -> torch.Tensor:
        """latents [B, 16, f, h, w] as TAEHV takes them -> last conv's output [B, 3, r*f, s*h, s*w]
        (unclamped, untrimmed, module dtype); advances the per-block memory in `state`."""
        state.check_chunk(latents, self.config.latent_channels)
        b, c, f, h, w = latents.shape
        # TAEHV works frame-major (N, T, C, H, W); frames are flattened into the conv batch.
        x = latents.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        for index, block in enumerate(self.decoder):
            x = block(x, self._past(x, b, index, state)) if isinstance(block, MemBlock) else block(x)
        n, rgb, height, width = x.shape
        out = x.reshape(b, n // b, rgb, height, width).permute(0, 2, 1, 3, 4)
        state.latent_frames += f
        state.height, state.width = height, width
        return out

    @staticmethod
    def _past(x: torch.Tensor, batch: int, index: int, state: TinyDecodeState) -> torch.Tensor:
        """Each frame's previous frame (the stream's last frame before this chunk for the first)."""
        n, c, h, w = x.shape
        frames = x.reshape(batch, n // batch, c, h, w)
        before = state.memory.get(index)
        if before is None:
            before = x.new_zeros(batch, c, h, w)
        state.memory[index] = frames[:, -1].clone()
        return torch.cat([before.unsqueeze(1), frames[:, :-1]], dim=1).reshape(n, c, h, w)

    def decode(self, latents: torch.Tensor, state: TinyDecodeState) -> tuple[torch.Tensor, TinyDecodeState]:
        """latents: normalised [B, 16, f, h, w] -> (frames [B, 3, t, 8h, 8w] float32 in [-1, 1], state)."""
        if self.config.need_scaled:
            mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(LATENTS_STD, dtype=torch.float32, device=latents.device)
            latents = latents.float() / inv_std.view(1, -1, 1, 1, 1) + mean
        raw = self.decode_raw(latents, state)
        drop = min(state.trim_left, raw.shape[2])
        state.trim_left -= drop
        frames = raw[:, :, drop:].clamp(0.0, 1.0).float() * 2.0 - 1.0
        state.frames += frames.shape[2]
        return frames, state

    def finish(self, state: TinyDecodeState) -> torch.Tensor:
        """Ends the stream and frees its memory; nothing is held back: [B, 3, 0, H, W]."""
        state.finished = True
        state.memory.clear()
        return state.empty_frames(self.device)


def encoder_shapes(config: TinyVaeConfig) -> dict[str, tuple[int, ...]]:
    """Key shapes of TAEHV's encoder as the release file holds it (never built: the fast path encodes
    with the Wan VAE). Layout: conv, ReLU, then 3 x [TPool, stride-2 conv without bias, 3 MemBlocks]
    with temporal pooling 2, 2, 1, then a conv to the latent channels."""
    w = config.encoder_width
    shapes: dict[str, tuple[int, ...]] = {"0.weight": (w, config.image_channels, 3, 3), "0.bias": (w,)}
    index = 2
    for pool in (2, 2, 1):
        shapes[f"{index}.conv.weight"] = (w, w * pool, 1, 1)
        shapes[f"{index + 1}.weight"] = (w, w, 3, 3)
        for block in range(index + 2, index + 5):
            for j, n_in in ((0, 2 * w), (2, w), (4, w)):
                shapes[f"{block}.conv.{j}.weight"] = (w, n_in, 3, 3)
                shapes[f"{block}.conv.{j}.bias"] = (w,)
        index += 5
    shapes[f"{index}.weight"] = (config.latent_channels, w, 3, 3)
    shapes[f"{index}.bias"] = (config.latent_channels,)
    return {ENCODER_PREFIX + k: v for k, v in shapes.items()}


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """What `fast_vae.pth` holds: our decoder's keys plus the (accepted, unread) encoder keys."""
    config = TinyVaeConfig.taew2_1()
    with torch.device("meta"):
        decoder = TinyVaeDecoder(config)
    return {**encoder_shapes(config), **module_tensor_shapes(decoder)}


def tiny_vae_source(source: TensorSource, model: TinyVaeDecoder) -> TensorSource:
    """The decoder's tensors of a TAEHV checkpoint, with the reference's `patch_tgrow_layers` applied
    (a TGrow conv with more output channels than ours keeps its LAST ones); refuses other files."""
    # TAEHV's decoder is an nn.Sequential: its first conv is `decoder.1` (the Wan VAE's is `decoder.conv1`).
    if f"{DECODER_PREFIX}1.weight" not in source:
        raise CheckpointError(
            f"{source.description} is not a TAEHV tiny VAE checkpoint (fast_vae.pth): it has no "
            f"{DECODER_PREFIX}1.weight; its keys start {list(source)[:4]}"
        )
    ours = module_tensor_shapes(model)
    tensors: dict[str, torch.Tensor] = {}
    for key in source:
        if key.startswith(ENCODER_PREFIX):
            continue
        tensor = source[key]
        owner = key.rpartition(".")[0].rpartition(".")[0]
        is_tgrow = key in ours and isinstance(model.get_submodule(owner), TGrow)
        if is_tgrow and tensor.shape[0] > ours[key][0]:
            tensor = tensor[-ours[key][0] :]
        tensors[key] = tensor
    return InMemorySource(tensors, description=source.description)


def load_tiny_vae(
    path: str | Path | TensorSource,
    config: TinyVaeConfig | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> TinyVaeDecoder:
    """Build the decoder on the meta device and load the `decoder.*` tensors of `fast_vae.pth` strictly
    (the `encoder.*` ones are accepted and not loaded)."""
    source = path if isinstance(path, TensorSource) else open_checkpoint(path)
    with torch.device("meta"):
        model = TinyVaeDecoder(config or TinyVaeConfig.taew2_1())
    load_into(model, tiny_vae_source(source, model), strict=True, dtype=dtype, device=device)
    return model.eval()

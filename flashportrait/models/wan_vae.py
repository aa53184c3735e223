"""The Wan 2.1 causal 3-D VAE: encoder for the I2V first-frame condition, streaming decoder.

Reference: `wan.models.wan_vae.AutoencoderKLWan` wrapping `AutoencoderKLWan_` (REFERENCE.md 1.1, 2.3,
2.9; golden case `wan_vae_tiny`). Blocks are in `wan_vae_blocks.py`.

* Encode (`encode`): the video `[B, 3, 1+4k, H, W]` in [-1, 1] runs through the causal encoder in
  chunks of 1, 4, 4, ... frames with the causal cache carried between them (as the reference does),
  then `conv1` splits the moments into mu and logvar. The posterior mode is mu, normalised per channel
  as `(mu - mean) * (1 / std)`: the latents the DiT works with, `[B, 16, 1+k, H/8, W/8]`.
* Decode (`begin` / `decode` / `finish`, protocol in `decoding.py`): latents are de-normalised as the
  reference does (`z / (1/std) + mean`), `conv2` (1x1x1) is applied, and the causal decoder runs on
  any chunking of latent frames with its cache in an explicit per-request state; outputs are clamped
  to [-1, 1]. Latent frame 0 gives 1 frame, every later one 4.

Normalisation is computed in float32 whatever the module dtype (the reference computes it in the VAE
dtype, bf16 in production; the goldens are float32): latents stay float32 in our pipeline.

Checkpoint: `Wan2.1_VAE.pth` holds our parameter names exactly (`encoder.*`, `conv1.*`, `conv2.*`,
`decoder.*`); the reference's wrapper state dict (and its manifest, and the golden file) has them under
`model.`, which we also accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flashportrait.models.decoding import DecodeState
from flashportrait.models.wan_vae_blocks import (
    CausalCache,
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    assign_cache_slots,
)
from flashportrait.weights import (
    CheckpointError,
    TensorSource,
    load_into,
    module_tensor_shapes,
    open_checkpoint,
    strip_prefix,
)

# Per-channel statistics of Wan 2.1 latents, hard-coded in the reference (not in the checkpoint;
# manifest `wan_vae.json` constants_not_in_state_dict, golden const/latents_mean and latents_std).
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# The reference wrapper's state-dict prefix (its loader prepends it to the release file's keys).
WRAPPER_PREFIX = "model."
# The reference encodes the first frame alone, then chunks of this many frames.
ENCODE_CHUNK = 4


@dataclass(frozen=True)
class WanVaeConfig:
    """Architecture (names as in the golden cases' `config.neutral`; reference names in comments).

    base_channels (dim), latent_channels (z_dim), channel_multipliers (dim_mult),
    res_blocks_per_level (num_res_blocks; the decoder uses one more per level),
    attention_at_scales (attn_scales: attention after res blocks at these spatial scales, 1.0 = full),
    temporal_downsample_per_level (temperal_downsample; the decoder upsamples in reverse order).
    """

    base_channels: int = 96
    latent_channels: int = 16
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks_per_level: int = 2
    attention_at_scales: tuple[float, ...] = ()
    temporal_downsample_per_level: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        levels = len(self.channel_multipliers)
        if len(self.temporal_downsample_per_level) != levels - 1:
            raise ValueError(
                f"temporal_downsample_per_level needs {levels - 1} flags for {levels} levels, "
                f"got {self.temporal_downsample_per_level}"
            )
        if self.latent_channels != len(LATENTS_MEAN):
            raise ValueError(f"the Wan 2.1 latent statistics are for {len(LATENTS_MEAN)} channels")

    @classmethod
    def wan21(cls) -> WanVaeConfig:
        """The released Wan2.1_VAE.pth (dim 96, z_dim 16)."""
        return cls()

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample_per_level)


@dataclass
class WanDecodeState(DecodeState):
    """A decode stream's causal memory (bounded: 2 frames per temporal conv)."""

    cache: CausalCache | None = None

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()


class WanVAE(nn.Module):
    """Encoder, moment/latent 1x1x1 convs and decoder; implements `decoding.StreamingDecoder`.

    decode_step_frames: the decoder processes at most this many latent frames per pass (bounds
    activation memory; any value gives the same frames).
    """

    def __init__(self, config: WanVaeConfig, decode_step_frames: int = 4):
        super().__init__()
        self.config = config
        self.decode_step_frames = decode_step_frames
        c = config
        z = c.latent_channels
        self.encoder = Encoder3d(
            c.base_channels,
            2 * z,
            c.channel_multipliers,
            c.res_blocks_per_level,
            c.attention_at_scales,
            c.temporal_downsample_per_level,
        )
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(
            c.base_channels,
            z,
            c.channel_multipliers,
            c.res_blocks_per_level,
            c.attention_at_scales,
            c.temporal_downsample_per_level[::-1],
        )
        self._encoder_slots = assign_cache_slots(self.encoder)
        self._decoder_slots = assign_cache_slots(self.decoder)

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [1, 16, 1, 1, 1] float32: the reference's `scale`."""
        mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, 1.0 / std

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean -> the DiT's latents: (mu - mean) * (1/std), float32."""
        mean, inv_std = self._statistics(mu.device)
        return (mu.float() - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> decoder input: z / (1/std) + mean (divides by the reciprocal, as the
        reference does), float32."""
        mean, inv_std = self._statistics(latents.device)
        return latents.float() / inv_std + mean

    # ---- encoder -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video: [B, 3, 1+4k, H, W] in [-1, 1] (H, W multiples of 8) -> (mu, logvar), each
        [B, 16, 1+k, H/8, W/8] float32, raw (not normalised; logvar unclamped)."""
        _, c, t, h, w = video.shape
        f = self.spatial_factor
        if c != 3 or (t - 1) % ENCODE_CHUNK or h % f or w % f:
            raise ValueError(
                f"the Wan VAE encodes [B, 3, 1+4k, H, W] videos with H and W multiples of {f}, "
                f"got {list(video.shape)}"
            )
        cache = CausalCache.empty(self._encoder_slots)
        x = video.to(device=self.device, dtype=self.dtype)
        pieces = [self.encoder(x[:, :, :1], cache)]
        for start in range(1, t, ENCODE_CHUNK):
            pieces.append(self.encoder(x[:, :, start : start + ENCODE_CHUNK], cache))
        mu, logvar = self.conv1(torch.cat(pieces, dim=2)).chunk(2, dim=1)
        return mu.float(), logvar.float()

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised posterior mode [B, 16, 1+k, H/8, W/8]
        float32 (the reference's `vae.encode(x).latent_dist.mode()`)."""
        mu, _ = self.encode_moments(video)
        return self.normalize(mu)

    # ---- streaming decoder -----------------------------------------------------------------------

    def begin(self, batch: int) -> WanDecodeState:
        return WanDecodeState(batch=batch, cache=CausalCache.empty(self._decoder_slots))

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor, state: WanDecodeState) -> torch.Tensor:
        """z: DE-normalised latents [B, 16, f, h, w] -> unclamped video [B, 3, t, 8h, 8w] in the module
        dtype (t = 1 + 4(f-1) for the stream's first chunk, else 4f); advances `state`."""
        state.check_chunk(z, self.config.latent_channels)
        if state.cache is None:
            raise RuntimeError("this decode stream has no cache; use begin()")
        x = self.conv2(z.to(device=self.device, dtype=self.dtype))
        _, _, f, _, _ = x.shape
        step = max(1, self.decode_step_frames)
        pieces = [self.decoder(x[:, :, i : i + step], state.cache) for i in range(0, f, step)]
        out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        _, _, t, height, width = out.shape
        state.latent_frames += f
        state.frames += t
        state.height, state.width = height, width
        return out

    def decode(self, latents: torch.Tensor, state: WanDecodeState) -> tuple[torch.Tensor, WanDecodeState]:
        """latents: normalised [B, 16, f, h, w] -> (frames [B, 3, t, 8h, 8w] float32 in [-1, 1], state)."""
        frames = self.decode_raw(self.denormalize(latents), state)
        return frames.clamp(-1.0, 1.0).float(), state

    def finish(self, state: WanDecodeState) -> torch.Tensor:
        """Ends the stream and frees its memory; nothing is held back: [B, 3, 0, H, W]."""
        state.finished = True
        state.cache = None
        return state.empty_frames(self.device)


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Names/shapes of the full-size model in the manifest's key space (the reference wrapper adds
    `model.` to the release file's keys)."""
    prefix = manifest.get("checkpoint_key_prefix_added_by_loader", WRAPPER_PREFIX)
    with torch.device("meta"):
        model = WanVAE(WanVaeConfig.wan21())
    return {prefix + k: v for k, v in module_tensor_shapes(model).items()}


def wan_vae_source(source: TensorSource) -> TensorSource:
    """Accept the release layout (no prefix) and the reference wrapper's `model.`-prefixed layout;
    refuse a file that is neither."""
    keys = list(source)
    if keys and all(k.startswith(WRAPPER_PREFIX) for k in keys):
        source = strip_prefix(source, WRAPPER_PREFIX)
        keys = list(source)
    if "decoder.conv1.weight" not in keys or "encoder.conv1.weight" not in keys:
        raise CheckpointError(
            f"{source.description} is not a Wan 2.1 VAE checkpoint (Wan2.1_VAE.pth): it has no "
            f"encoder.conv1.weight / decoder.conv1.weight; its keys start {keys[:4]}"
        )
    return source


def load_wan_vae(
    path: str | Path | TensorSource,
    config: WanVaeConfig | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    decode_step_frames: int = 4,
) -> WanVAE:
    """Build the VAE on the meta device and load `Wan2.1_VAE.pth` (or a source) strictly into it."""
    source = path if isinstance(path, TensorSource) else open_checkpoint(path)
    source = wan_vae_source(source)
    with torch.device("meta"):
        model = WanVAE(config or WanVaeConfig.wan21(), decode_step_frames=decode_step_frames)
    load_into(model, source, strict=True, dtype=dtype, device=device)
    return model.eval()

"""The streaming protocol shared by our two video decoders (the Wan VAE and the TAEHV tiny VAE).

A decoder turns latent frames into video frames chunk by chunk, carrying a small causal state from
chunk to chunk, so frames leave the server as soon as their latents are final and memory does not
grow with the video:

    state = decoder.begin(batch)
    for chunk in latent_chunks:                      # [B, 16, f, h, w] float32, any f >= 1
        frames, state = decoder.decode(chunk, state) # [B, 3, t, H, W] float32 in [-1, 1]
        send(frames)
    send(decoder.finish(state))                      # whatever is still held (nothing, for ours)

Inputs are the NORMALISED latents the sampler works with (the DiT's latent space); each decoder
applies what the reference applies before decoding (the Wan VAE de-normalises with the per-channel
mean/std; the tiny VAE takes them as they are, REFERENCE.md 1.1). Outputs are in [-1, 1] like the
reference's `decode_latents` before its final `x / 2 + 0.5`.

Frame accounting (the reference's causal first-frame convention, REFERENCE.md 2.9): `T` latent frames
decode to `r * (T - 1) + 1` video frames, `r = temporal_factor` (4 for Wan 2.1). Latent frame 0 gives
output frame 0 alone; latent frame `k >= 1` gives output frames `r*(k-1)+1 .. r*k`. A chunk holding
latent frames `[k0, k1)` therefore yields exactly the output frames `[frames_for(k0), frames_for(k1))`
(`output_span`), the same frames whole-video decoding gives at those positions, and output frame `j`
is the pipeline's frame `j` (the frame driven by driving frame `j`; the reference's script drops
frame 0 when it writes the video). Neither decoder holds frames back, so `finish` returns an empty
`[B, 3, 0, H, W]` tensor; callers should still send it, a future decoder may lag.

A state belongs to one request: decoders keep no per-request data themselves, so one decoder module
serves many concurrent streams, each with its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class DecodeState:
    """What every stream tracks; decoders subclass it with their causal memory.

    batch: B of every chunk of this stream. latent_frames / frames: consumed and returned so far.
    height, width: output frame size, known after the first chunk.
    """

    batch: int
    latent_frames: int = 0
    frames: int = 0
    height: int = 0
    width: int = 0
    finished: bool = False

    def check_chunk(self, latents: torch.Tensor, channels: int) -> None:
        """Refuse a chunk that does not belong to this stream."""
        if self.finished:
            raise RuntimeError("this decode stream is finished; begin a new one")
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, f, h, w], got shape {list(latents.shape)}")
        b, c, f, _, _ = latents.shape
        if b != self.batch or c != channels:
            raise ValueError(
                f"latent chunk of shape {list(latents.shape)} does not fit this stream "
                f"(batch {self.batch}, {channels} channels)"
            )
        if f == 0:
            raise ValueError("a latent chunk needs at least one frame")

    def empty_frames(self, device: torch.device) -> torch.Tensor:
        """[B, 3, 0, H, W] float32: what `finish` returns when nothing is held back."""
        return torch.zeros(self.batch, 3, 0, self.height, self.width, device=device)


@runtime_checkable
class StreamingDecoder(Protocol):
    """Latents to frames, chunk by chunk (see the module docstring for the frame accounting)."""

    @property
    def temporal_factor(self) -> int: ...

    @property
    def spatial_factor(self) -> int: ...

    def begin(self, batch: int) -> DecodeState: ...

    def decode(self, latents: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]: ...

    def finish(self, state: DecodeState) -> torch.Tensor: ...


def frames_for(latent_frames: int, temporal_factor: int) -> int:
    """Video frames decoded from the first `latent_frames` latent frames: r * (T - 1) + 1 (0 for 0)."""
    if latent_frames < 0:
        raise ValueError(f"latent frame count must be >= 0, got {latent_frames}")
    return 0 if latent_frames == 0 else temporal_factor * (latent_frames - 1) + 1


def output_span(latent_start: int, latent_count: int, temporal_factor: int) -> tuple[int, int]:
    """The output frames [start, stop) a chunk of latent frames [latent_start, +latent_count) yields."""
    return frames_for(latent_start, temporal_factor), frames_for(latent_start + latent_count, temporal_factor)


def latent_frame_of(frame: int, temporal_factor: int) -> int:
    """The latent frame whose decoding produces output frame `frame`."""
    if frame < 0:
        raise ValueError(f"frame index must be >= 0, got {frame}")
    return 0 if frame == 0 else (frame - 1) // temporal_factor + 1


def decode_all(decoder: StreamingDecoder, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Decode a whole latent video `[B, C, T, h, w]` through the stream, `chunk` latent frames at a time
    (all at once when None). Returns `[B, 3, r*(T-1)+1, H, W]` float32 in [-1, 1]."""
    b, _, t, _, _ = latents.shape
    step = t if chunk is None else chunk
    if step < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    state = decoder.begin(b)
    pieces = []
    for start in range(0, t, step):
        frames, state = decoder.decode(latents[:, :, start : start + step], state)
        pieces.append(frames)
    pieces.append(decoder.finish(state))
    return torch.cat(pieces, dim=2)

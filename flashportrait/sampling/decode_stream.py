"""Final latents -> streaming decoder -> output video frames, in order.

The sampler hands over final latent frames in order (`FinalLatents`); each piece goes through the
request's decode stream (`models/decoding.py`: Wan VAE or tiny VAE, a small causal state carried
between pieces, so the frames equal whole-video decoding). Frame accounting: latent frames [k0, k1)
give pipeline frames [r*(k0-1)+1, r*(k1-1)+1) (latent frame 0 gives frame 0 alone, r = 4).

Output, as the reference script writes it (REFERENCE.md 2.9, 1.4):
- `decode_latents` ends with `(x / 2 + 0.5).clamp(0, 1)` on the decoder's [-1, 1] frames;
- `sample = videos[:, :, 1:]` drops pipeline frame 0 (the reconstructed reference image), so output
  frame i is pipeline frame i + 1, driven by driving frame i + 1, and a video of n = 4k+1 frames gives
  n - 1 output frames;
- `simple_save_videos_grid` converts with `(x * 255).numpy().astype(np.uint8)`: truncation, not
  rounding, of the float32 product; `to_uint8` does the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from flashportrait.models.decoding import DecodeState, StreamingDecoder, frames_for


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """Decoder frames in [-1, 1] -> `(x / 2 + 0.5).clamp(0, 1)` float32 (the reference's last step)."""
    return (frames.float() / 2 + 0.5).clamp(0.0, 1.0)


def to_uint8(unit: torch.Tensor) -> torch.Tensor:
    """[B, 3, t, H, W] float in [0, 1] -> [B, t, H, W, 3] uint8, truncating `x * 255` as the reference."""
    return (unit.float() * 255).to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


@dataclass(frozen=True)
class DecodedFrames:
    """Output frames [frame_start, frame_start + t) (after the first-frame drop), in [0, 1].

    frames: [B, 3, t, H, W] float32 on the decoder's device.
    """

    frame_start: int
    frames: torch.Tensor

    @property
    def frame_stop(self) -> int:
        return self.frame_start + self.frames.shape[2]


class VideoDecodeStream:
    """One request's decoding: push final latent frames in order, get output frames in order.

    chunk_latents: at most this many latent frames per decoder call (bounds the decoder's activation
    memory and lets the first frames out sooner; chunking never changes the frames).
    drop_first_frame: drop pipeline frame 0 as the reference script does.
    Frames are numbered by counting what the decoder returns, so a decoder that held frames back
    until `finish` would still be numbered correctly.
    """

    def __init__(
        self,
        decoder: StreamingDecoder,
        *,
        batch: int = 1,
        chunk_latents: int | None = 4,
        drop_first_frame: bool = True,
    ) -> None:
        if chunk_latents is not None and chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        self.decoder = decoder
        self.chunk_latents = chunk_latents
        self.drop = 1 if drop_first_frame else 0
        self.latent_frames = 0  # latent frames consumed
        self.pipeline_frames = 0  # pipeline frames (before the drop) returned by the decoder
        self._state: DecodeState | None = decoder.begin(batch)

    def push(self, latent_start: int, latents: torch.Tensor) -> Iterator[DecodedFrames]:
        """Decode final latents [B, 16, f, h, w] of latent frames [latent_start, latent_start + f)."""
        if self._state is None:
            raise RuntimeError("this decode stream is finished")
        if latent_start != self.latent_frames:
            raise ValueError(
                f"latent frames must arrive in order: expected {self.latent_frames}, got {latent_start}"
            )
        _, _, count, _, _ = latents.shape
        step = count if self.chunk_latents is None else self.chunk_latents
        for offset in range(0, count, step):
            piece = latents[:, :, offset : offset + step]
            with torch.no_grad():
                frames, self._state = self.decoder.decode(piece, self._state)
            self.latent_frames += piece.shape[2]
            yield from self._emit(frames)

    def finish(self) -> Iterator[DecodedFrames]:
        """End the stream: yields any frames the decoder held back (none for ours), frees its state."""
        if self._state is None:
            return
        state, self._state = self._state, None
        with torch.no_grad():
            tail = self.decoder.finish(state)
        expected = frames_for(self.latent_frames, self.decoder.temporal_factor)
        yield from self._emit(tail)
        if self.pipeline_frames != expected:
            raise AssertionError(
                f"the decoder returned {self.pipeline_frames} frames for {self.latent_frames} latent "
                f"frames, expected {expected}"
            )

    def _emit(self, frames: torch.Tensor) -> Iterator[DecodedFrames]:
        """frames [B, 3, t, H, W] in [-1, 1]: the next t pipeline frames."""
        first = self.pipeline_frames
        count = frames.shape[2]
        self.pipeline_frames += count
        skip = min(count, max(0, self.drop - first))
        if count > skip:
            yield DecodedFrames(first + skip - self.drop, to_unit_range(frames[:, :, skip:]))

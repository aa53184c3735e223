"""The TAEHV tiny VAE decoder as a stateless graph (ONNX, then TensorRT), and its streaming decoders.

`TinyVaeDecoder` (flashportrait/models/tiny_vae.py) carries one tensor per MemBlock from chunk to
chunk: the last frame of that block's input. The exported graph takes those memories as inputs and
returns the new ones, so a runtime without Python state (ONNX Runtime, TensorRT) decodes a stream
chunk by chunk exactly as the PyTorch decoder does:

    LATENTS       [B, 16, f, h, w] float32, normalised as the sampler holds them (dynamic B, f, h, w)
    MEMORY_<i>    [B, C_i, h * s_i, w * s_i] float32, i = 0..8 (zeros before the first chunk)
    -> FRAMES     [B, 3, 4f, 8h, 8w] float32 in [-1, 1] (clamped and mapped, not yet trimmed)
    -> MEMORY_OUT_<i>  the memories after this chunk (feed them back as MEMORY_<i>)

C_i and s_i (the block's width and spatial scale) are in the file's metadata (`memory_channels`,
`memory_scales`), with `temporal_factor`, `spatial_factor` and `frames_to_trim`, so the streaming
decoders need only the file. The graph includes what `TinyVaeDecoder.decode` does around the layers
(de-normalising when `need_scaled`, the [0, 1] clamp and the map to [-1, 1]); the decoders drop the
first `frames_to_trim` frames of each stream, as `decode` does.

`OnnxTinyVaeDecoder` implements `decoding.StreamingDecoder` with ONNX Runtime; the TensorRT one is
`export.engines.TensorRTTinyVaeDecoder`. Parity (tests/export): chunked ONNX Runtime decoding
equals the PyTorch decoder chunk by chunk in float32: ONNX Runtime's error against the float64
decoder is at most 4x the PyTorch decoder's own float32 error (+1e-6), and the two differ by at most
1e-5 on frames in [-1, 1] (both errors are about 2e-6 at demo size).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flashportrait.export.tensorrt import ShapeProfile
from torch import nn

from flashportrait.models.decoding import DecodeState
from flashportrait.models.tiny_vae import MemBlock, TinyVaeDecoder, Upsample
from flashportrait.models.wan_vae import LATENTS_MEAN, LATENTS_STD

LATENTS = "LATENTS"
FRAMES = "FRAMES"
METADATA_KEY = "flashportrait.tiny_vae"


def memory_input(i: int) -> str:
    return f"MEMORY_{i}"


def memory_output(i: int) -> str:
    return f"MEMORY_OUT_{i}"


@dataclass(frozen=True)
class GraphLayout:
    """What a streaming runtime needs to know about the exported graph (stored in its metadata)."""

    latent_channels: int
    memory_channels: tuple[int, ...]  # C_i of each MemBlock, in order
    memory_scales: tuple[int, ...]  # s_i: the block's resolution over the latents'
    temporal_factor: int
    spatial_factor: int
    frames_to_trim: int

    @classmethod
    def of(cls, decoder: TinyVaeDecoder) -> GraphLayout:
        channels, scales, scale = [], [], 1
        for block in decoder.decoder:
            if isinstance(block, Upsample):
                scale *= block.factor
            elif isinstance(block, MemBlock):
                channels.append(block.conv[0].in_channels // 2)
                scales.append(scale)
        cfg = decoder.config
        return cls(cfg.latent_channels, tuple(channels), tuple(scales), cfg.temporal_factor,
                   cfg.spatial_factor, cfg.frames_to_trim)  # fmt: skip

    def memory_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """[B, C_i, h * s_i, w * s_i] for latents of size h x w."""
        return [
            (batch, c, height * s, width * s)
            for c, s in zip(self.memory_channels, self.memory_scales, strict=True)
        ]

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> GraphLayout:
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class TinyVaeStep(nn.Module):
    """One call of the exported graph: `TinyVaeDecoder.decode_raw` with explicit memories, plus the
    de-normalisation, clamp and [-1, 1] map of `TinyVaeDecoder.decode` (not the trim)."""

    def __init__(self, decoder: TinyVaeDecoder):
        super().__init__()
        self.decoder = decoder
        cfg = decoder.config
        self.need_scaled = cfg.need_scaled
        self.register_buffer("mean", torch.tensor(LATENTS_MEAN, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(LATENTS_STD, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, latents: torch.Tensor, *memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """latents [B, 16, f, h, w], memory: 9 x [B, C_i, h_i, w_i]
        -> (frames [B, 3, 4f, 8h, 8w] float32 in [-1, 1], the 9 updated memories)."""
        if self.need_scaled:
            latents = latents * self.std + self.mean
        b, c, f, h, w = latents.shape
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        updated = []
        remaining = list(memory)
        for block in self.decoder.decoder:
            if isinstance(block, MemBlock):
                n, channels, height, width = x.shape
                frames = x.reshape(b, -1, channels, height, width)
                # each frame's previous frame: the carried memory for the chunk's first frame
                past = torch.cat([remaining.pop(0).unsqueeze(1), frames[:, :-1]], dim=1)
                updated.append(frames[:, -1])
                x = block(x, past.reshape(n, channels, height, width))
            else:
                x = block(x)
        _, rgb, height, width = x.shape
        raw = x.reshape(b, -1, rgb, height, width).permute(0, 2, 1, 3, 4)
        return (raw.clamp(0.0, 1.0).float() * 2.0 - 1.0, *updated)


def example_inputs(layout: GraphLayout, batch: int = 1, frames: int = 2, size: tuple[int, int] = (4, 6)):
    gen = torch.Generator().manual_seed(0)
    h, w = size
    latents = torch.randn(batch, layout.latent_channels, frames, h, w, generator=gen)
    memory = [torch.randn(shape, generator=gen) for shape in layout.memory_shapes(batch, h, w)]
    return latents, memory


def export_onnx(decoder: TinyVaeDecoder, path: str | Path, *, opset: int = 17) -> Path:
    """Write the float32 streaming graph of `decoder` to `path` (dynamic batch, frames and size)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    decoder = decoder.float().eval()
    layout = GraphLayout.of(decoder)
    count = len(layout.memory_channels)
    latents, memory = example_inputs(layout)
    dynamic = {LATENTS: {0: "batch", 2: "frames", 3: "height", 4: "width"},
               FRAMES: {0: "batch", 2: "out_frames", 3: "out_height", 4: "out_width"}}  # fmt: skip
    for i in range(count):
        axes = {0: "batch", 2: f"memory_{i}_height", 3: f"memory_{i}_width"}
        dynamic[memory_input(i)] = axes
        dynamic[memory_output(i)] = axes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            TinyVaeStep(decoder).eval(),
            (latents, *memory),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[LATENTS, *(memory_input(i) for i in range(count))],
            output_names=[FRAMES, *(memory_output(i) for i in range(count))],
            dynamic_axes=dynamic,
        )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, layout.to_json()
    onnx.save(model, str(path))
    return path


def read_layout(path: str | Path) -> GraphLayout:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return GraphLayout.from_json(entry.value)
    raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not a tiny VAE decoder exported here")


def tensorrt_profiles(
    layout: GraphLayout,
    *,
    batch: tuple[int, int, int] = (1, 1, 2),
    frames: tuple[int, int, int] = (1, 4, 4),
    height: tuple[int, int, int] = (8, 64, 128),
    width: tuple[int, int, int] = (8, 64, 128),
) -> dict[str, ShapeProfile]:
    """One optimisation profile over (min, opt, max) of batch, latent frames and latent size (the
    defaults: one video, the sampler's 1-4 latent frames per call, 64-1024 px, tuned for 512 px);
    every memory input follows the latents' size at its block's scale."""
    profiles = {
        LATENTS: ShapeProfile(*((batch[k], layout.latent_channels, frames[k], height[k], width[k])
                                for k in range(3))),
    }  # fmt: skip
    for i, (channels, scale) in enumerate(zip(layout.memory_channels, layout.memory_scales, strict=True)):
        profiles[memory_input(i)] = ShapeProfile(
            *((batch[k], channels, height[k] * scale, width[k] * scale) for k in range(3))
        )
    return profiles


# ---- streaming decoders over the graph ----


@dataclass
class GraphDecodeState(DecodeState):
    """The graph's memories (None before the first chunk) and frames still to trim."""

    memory: list | None = None
    trim_left: int = 0
    latent_size: tuple[int, int] = (0, 0)


class GraphTinyVaeDecoder:
    """`decoding.StreamingDecoder` over a stateless graph; subclasses run it (`_run`).

    max_frames: latent frames per graph call (longer chunks are split; None: no limit).
    """

    def __init__(self, layout: GraphLayout, device: torch.device | str, max_frames: int | None = None):
        self.layout = layout
        self.device = torch.device(device)
        self.max_frames = max_frames

    @property
    def temporal_factor(self) -> int:
        return self.layout.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.layout.spatial_factor

    def begin(self, batch: int) -> GraphDecodeState:
        return GraphDecodeState(batch=batch, trim_left=self.layout.frames_to_trim)

    def _zeros(self, shapes: Sequence[tuple[int, ...]]) -> list:
        raise NotImplementedError

    def _run(self, latents: torch.Tensor, memory: list) -> tuple[torch.Tensor, list]:
        """latents [B, 16, f, h, w] float32 -> (frames [B, 3, 4f, 8h, 8w] float32 on `device`, memory)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, state: GraphDecodeState) -> tuple[torch.Tensor, GraphDecodeState]:
        """latents: normalised [B, 16, f, h, w] -> (frames [B, 3, t, 8h, 8w] float32 in [-1, 1], state)."""
        state.check_chunk(latents, self.layout.latent_channels)
        b, _, f, h, w = latents.shape
        if state.memory is None:
            state.memory = self._zeros(self.layout.memory_shapes(b, h, w))
            state.latent_size = (h, w)
        elif state.latent_size != (h, w):
            raise ValueError(f"latent chunk of size {h}x{w} in a stream of {state.latent_size}")
        step = f if self.max_frames is None else self.max_frames
        pieces = []
        for start in range(0, f, step):
            frames, state.memory = self._run(latents[:, :, start : start + step].float(), state.memory)
            pieces.append(frames)
        frames = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        drop = min(state.trim_left, frames.shape[2])
        state.trim_left -= drop
        frames = frames[:, :, drop:]
        state.latent_frames += f
        state.frames += frames.shape[2]
        state.height, state.width = frames.shape[3], frames.shape[4]
        return frames, state

    def finish(self, state: GraphDecodeState) -> torch.Tensor:
        """Ends the stream and frees its memories; nothing is held back: [B, 3, 0, H, W]."""
        state.finished = True
        state.memory = None
        return state.empty_frames(self.device)


class OnnxTinyVaeDecoder(GraphTinyVaeDecoder):
    """The exported graph through ONNX Runtime (one session, shared by every stream).

    providers: ONNX Runtime execution providers; outputs are returned on `device`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        device: torch.device | str = "cpu",
        max_frames: int | None = None,
    ):
        import onnxruntime as ort

        super().__init__(read_layout(path), device, max_frames)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), providers=list(providers))
        count = len(self.layout.memory_channels)
        self._outputs = [FRAMES, *(memory_output(i) for i in range(count))]

    def _zeros(self, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        return [np.zeros(shape, dtype=np.float32) for shape in shapes]

    def _run(self, latents: torch.Tensor, memory: list[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        feeds = {LATENTS: latents.detach().cpu().numpy()}
        feeds.update({memory_input(i): m for i, m in enumerate(memory)})
        frames, *updated = self.session.run(self._outputs, feeds)
        return torch.from_numpy(frames).to(self.device), updated


__all__ = [
    "FRAMES",
    "LATENTS",
    "GraphDecodeState",
    "GraphLayout",
    "GraphTinyVaeDecoder",
    "OnnxTinyVaeDecoder",
    "TinyVaeStep",
    "export_onnx",
    "memory_input",
    "memory_output",
    "read_layout",
    "tensorrt_profiles",
]

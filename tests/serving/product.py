"""The live product server of `test_product_live.py`: demo weights, demo media and one real
`tritonserver` with the project's model repository (`--model-config-name=cpu`), plus helpers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from flashportrait.client.client import (
    DrivingFeatures,
    FlashPortraitClient,
    FramesChunk,
    Generation,
    Progress,
)

from flashportrait.serving.server import TritonServer

PROMPT = "A woman smiles and nods."
CLIP_FRAMES = 13  # 4 latent frames: two windows of 2 (overlap 0), 12 output frames
SMALL = {"max_size": 64, "context_size": 2, "context_overlap": 0}
SAMPLER = {"model": "sampler", "version": "1"}


@dataclasses.dataclass
class Product:
    server: TritonServer
    weights: Path
    image_path: Path
    video_path: Path
    driving: DrivingFeatures
    prompt_embeds: np.ndarray
    negative_embeds: np.ndarray

    @property
    def image(self) -> bytes:
        return self.image_path.read_bytes()

    @property
    def video(self) -> bytes:
        return self.video_path.read_bytes()

    def client(self) -> FlashPortraitClient:
        return FlashPortraitClient(self.server.grpc_url)

    def sample(
        self,
        request_id: str,
        parameters: dict,
        features: np.ndarray | None = None,
        image: bytes | None = None,
    ) -> Generation:
        """A direct (cancellable) sampler request with the fixture's features and embeddings."""
        with self.client() as client:
            return client.sample(
                self.image if image is None else image,
                self.driving.features if features is None else features,
                self.prompt_embeds,
                self.negative_embeds,
                self.driving.fps,
                parameters,
                request_id,
            )

    def log_lines(self, request_id: str, pattern: str) -> list[re.Match]:
        regex = re.compile(rf"request {re.escape(request_id)}: {pattern}")
        return [m for m in (regex.search(line) for line in self.server.log_text().splitlines()) if m]


@dataclasses.dataclass
class Collected:
    """A whole stream: frames [F, H, W, 3] uint8 in output order, every event, and the progress seen."""

    frames: np.ndarray
    chunks: list[FramesChunk]
    progress: list[Progress]

    @property
    def last(self) -> Progress:
        return self.chunks[-1].progress if self.chunks else self.progress[-1]


def collect(generation: Generation) -> Collected:
    chunks: list[FramesChunk] = []
    progress: list[Progress] = []
    for event in generation:
        if isinstance(event, FramesChunk):
            chunks.append(event)
        else:
            progress.append(event)
    frames = np.concatenate([c.frames for c in chunks]) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
    return Collected(frames, chunks, progress)


def tile_features(features: np.ndarray, frames: int) -> np.ndarray:
    """[N, 554] -> [frames, 554]: the clip's features repeated back and forth (a longer driving video)."""
    cycle = np.concatenate([features, features[::-1]])
    repeats = -(-frames // cycle.shape[0])
    return np.ascontiguousarray(np.tile(cycle, (repeats, 1))[:frames])

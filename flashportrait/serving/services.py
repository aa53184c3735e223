"""The work of the non-streaming Triton models, importable and testable without a server.

Each service is built from its model's settings (`settings.py`) and maps the model's input arrays to
its output arrays (names as in `model_repository/README.md`), raising `RequestError` for anything a
user can fix. The `model.py` adapters only unpack requests and call these.

- `FaceAlignService`: driving video bytes -> CROPS [N, 224, 224, 3] uint8 RGB, FACE_MASK [N] bool,
  FPS [2] int64 (numerator, denominator), with the release's ONNX face models.
- `FeatureExtractorService`: CROPS -> FEATURES [N, 554] float32 with the exported motion encoder
  (ONNX Runtime), `chunk_frames` crops per call so memory does not grow with N.
- `TextEncoderService`: prompt and negative prompt -> embeddings [L, text_dim] float32 each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flashportrait.serving.settings import (
    Deployment,
    FaceAlignSettings,
    FeatureExtractorSettings,
    TextEncoderSettings,
)
from flashportrait.serving.streaming import RequestError

CROP_SIZE = 224
FEATURE_DIM = 554


def fps_array(fps) -> np.ndarray:
    """A frame rate (Fraction) as FPS [2] int64 (numerator, denominator); [0, 1] when unknown."""
    if fps is None:
        return np.array([0, 1], dtype=np.int64)
    return np.array([fps.numerator, fps.denominator], dtype=np.int64)


class FaceAlignService:
    """The face front end of `flashportrait.face` with the weights folder's face models."""

    def __init__(self, settings: FaceAlignSettings, deployment: Deployment) -> None:
        from flashportrait.components import FACE_ALIGN_PARTS, load_components
        from flashportrait.face import FaceFrontEnd, FaceFrontEndConfig

        if settings.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {settings.max_frames}")
        face = load_components(deployment.weights, mode=deployment.mode, parts=FACE_ALIGN_PARTS).face
        providers = ("CPUExecutionProvider",)
        if deployment.on_gpu:
            providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
        self.max_frames = settings.max_frames
        # One frame more than allowed is read, so a too-long video is recognised without decoding it all.
        self.front_end = FaceFrontEnd(
            FaceFrontEndConfig(
                detector_model=str(face.detector),
                landmark_model=str(face.landmarks),
                providers=providers,
                intra_op_threads=settings.threads,
                max_frames=settings.max_frames + 1,
            )
        )

    def align(self, video: bytes) -> dict[str, np.ndarray]:
        from flashportrait.face import FaceFrontEndError

        try:
            aligned = self.front_end.align_video(video)
        except FaceFrontEndError as error:
            raise RequestError(str(error)) from None
        if aligned.frame_count > self.max_frames:
            raise RequestError(
                f"the driving video has more than {self.max_frames} frames; this server takes at most "
                f"{self.max_frames} per request (face_align max_frames)"
            )
        return {
            "CROPS": aligned.crops,
            "FACE_MASK": aligned.mask.astype(bool),
            "FPS": fps_array(aligned.fps),
        }


class FeatureExtractorService:
    """The exported motion encoder (`<version folder>/model.onnx`) run by ONNX Runtime."""

    def __init__(self, settings: FeatureExtractorSettings, deployment: Deployment, version_dir: Path) -> None:
        import onnxruntime as ort

        path = Path(version_dir) / settings.model_file
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the feature extractor is exported from the weights' pd_fpg.pth when the "
                "runtime model repository is assembled (flashportrait serve --weights DIR, or "
                "python -m flashportrait.serving.repository --weights DIR --out DIR)"
            )
        if settings.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {settings.chunk_frames}")
        options = ort.SessionOptions()
        if settings.threads > 0:
            options.intra_op_num_threads = settings.threads
        providers = ["CPUExecutionProvider"]
        if deployment.on_gpu:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.chunk_frames = settings.chunk_frames

    def encode(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """crops [N, 224, 224, 3] uint8 RGB -> FEATURES [N, 554] float32."""
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
            raise RequestError(f"CROPS must be [N, 224, 224, 3] uint8, got {crops.dtype} {list(crops.shape)}")
        rows = [
            self.session.run(["FEATURES"], {"CROPS": np.ascontiguousarray(crops[i : i + self.chunk_frames])})[
                0
            ]
            for i in range(0, crops.shape[0], self.chunk_frames)
        ]
        features = np.concatenate(rows) if rows else np.zeros((0, FEATURE_DIM), np.float32)
        return {"FEATURES": features.astype(np.float32, copy=False)}


class TextEncoderService:
    """umT5 with a prompt cache; embeddings leave as float32 whatever the serving dtype."""

    def __init__(self, settings: TextEncoderSettings, deployment: Deployment) -> None:
        import torch

        from flashportrait.components import TEXT_ENCODER_PARTS, load_components

        components = load_components(
            deployment.weights,
            mode=deployment.mode,
            device=deployment.device,
            dtype=getattr(torch, deployment.dtype),
            parts=TEXT_ENCODER_PARTS,
            text_cache_size=settings.cache_size,
        )
        self.encoder = components.text_encoder

    def encode(self, prompt: str, negative_prompt: str) -> dict[str, np.ndarray]:
        embeds, negative = self.encoder.encode([prompt, negative_prompt])
        return {
            "PROMPT_EMBEDS": embeds.float().cpu().numpy(),
            "NEGATIVE_PROMPT_EMBEDS": negative.float().cpu().numpy(),
        }

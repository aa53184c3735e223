"""The driving-video front end: decoding, face detection and tracking, 222-point landmarks, the warp
to the motion encoder's 224x224 crop, and per-frame features with frames without a face filled.

    front_end = FaceFrontEnd(FaceFrontEndConfig(detector_model=..., landmark_model=...))
    video = front_end.align_video(path_or_bytes)   # crops [N, 224, 224, 3] uint8 RGB, mask [N], fps, audio
    features = front_end.extract_features(path_or_bytes, encoder)   # [N, 554]

Modules: `video` (PyAV decoding), `detector`, `landmarks`, `tracking`, `smoothing`, `warp`, `gaps`,
`pipeline`, `runtime` (ONNX Runtime sessions), `errors` (`MediaError`, `NoFaceError`).
"""

from flashportrait.face.errors import FaceFrontEndError, MediaError, NoFaceError
from flashportrait.face.pipeline import (
    AlignedChunk,
    AlignedVideo,
    FaceFrontEnd,
    FaceFrontEndConfig,
    VideoFeatures,
)
from flashportrait.face.video import AudioInfo, VideoInfo, VideoReader

__all__ = [
    "AlignedChunk",
    "AlignedVideo",
    "AudioInfo",
    "FaceFrontEnd",
    "FaceFrontEndConfig",
    "FaceFrontEndError",
    "MediaError",
    "NoFaceError",
    "VideoFeatures",
    "VideoInfo",
    "VideoReader",
]

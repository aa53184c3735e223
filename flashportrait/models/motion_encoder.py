"""The PD-FGC facial motion encoder (FanEncoder, `pd_fpg.pth`): face crops to expression features.

    MotionEncoder(config)(crops [B, 3, 224, 224] float32 in [-1, 1], RGB)
        -> MotionFeatures(headpose [B, 6], eye [B, 6], emotion [B, 30], mouth [B, 512])

Reference: `wan.models.pdf.FanEncoder` (golden case `fan_encoder`, REFERENCE.md 1.3), in eval mode:
BatchNorm uses its running statistics and the hourglass dropout is inactive (so it is omitted).
- `model` is a FAN landmark network cut after its first hourglass: conv 7x7/2 + BN + ReLU, three
  residual ConvBlocks with a 2x2 max-pool after the first, one depth-4 hourglass, a ConvBlock, 1x1
  convs to 68 heat-map channels, then a 3x3/2 conv to one 28x28 map, flattened, ReLU, fc to 512;
- four heads on that 512-vector: Linear-ReLU-BatchNorm1d-Linear (`to_*`), and for head pose, eyes and
  emotion a ReLU-Linear (`*_embed`) to 6, 6 and 30. The mouth feature is the 512-d `to_mouth`
  output: the release's `mouth_embed` head exists in the file but the reference never runs it, so we
  keep its parameters (the file must load strictly) and never call it.

The reference loads `pd_fpg.pth` with `strict=False` and silently ignores mismatches; we load strictly
and report (`load_motion_encoder`). The module exports to ONNX with a dynamic batch (see tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.config import ConfigError
from flashportrait.weights import LoadReport, TensorSource, load_into, module_tensor_shapes, open_checkpoint


@dataclass(frozen=True)
class MotionEncoderConfig:
    input_size: int = 224
    feature_dim: int = 512
    pose_dim: int = 6
    eye_dim: int = 6
    emotion_dim: int = 30
    num_landmarks: int = 68
    hourglass_depth: int = 4
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        # conv1 /2, max-pool /2, conv6 /2: the final map is input/8 on a side
        if self.input_size % 8:
            raise ConfigError(f"MotionEncoderConfig: input_size {self.input_size} is not a multiple of 8")

    @property
    def map_size(self) -> int:
        return self.input_size // 8


PD_FGC = MotionEncoderConfig()


class MotionFeatures(NamedTuple):
    """headpose [B, 6], eye [B, 6], emotion [B, 30], mouth [B, 512]; float32."""

    headpose: torch.Tensor
    eye: torch.Tensor
    emotion: torch.Tensor
    mouth: torch.Tensor

    def concatenated(self) -> torch.Tensor:
        """[B, 554] in the pipeline's order: head pose, eyes, emotion, mouth (REFERENCE.md 1.3)."""
        return torch.cat([self.headpose, self.eye, self.emotion, self.mouth], dim=-1)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN's residual block: three BN-ReLU-conv3x3 stages (out/2, out/4, out/4) concatenated.

    The residual goes through BN-ReLU-conv1x1 when the width changes (`downsample.0` / `.2`).
    """

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = _conv3x3(cin, cout // 2)
        self.bn2 = nn.BatchNorm2d(cout // 2, eps=eps)
        self.conv2 = _conv3x3(cout // 2, cout // 4)
        self.bn3 = nn.BatchNorm2d(cout // 4, eps=eps)
        self.conv3 = _conv3x3(cout // 4, cout // 4)
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(cin, eps=eps), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))
            if cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """FAN hourglass of `depth` levels on `channels` features.

    Level n: an upper branch `b1_n` at full resolution, a lower branch max-pooled 2x then `b2_n`,
    the next level (or `b2_plus_1` at the bottom), `b3_n`, and a bilinear (align_corners False)
    upsample back to the upper branch's size (sizes are not powers of two: 56, 28, 14, 7, 3).
    """

    def __init__(self, depth: int, channels: int, eps: float):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels, eps))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels, eps))
            if level == 1:
                self.add_module("b2_plus_1", ConvBlock(channels, channels, eps))
            self.add_module(f"b3_{level}", ConvBlock(channels, channels, eps))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self.get_submodule(f"b1_{level}")(x)
        lower = self.get_submodule(f"b2_{level}")(F.max_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self.get_submodule("b2_plus_1")(lower)
        lower = self.get_submodule(f"b3_{level}")(lower)
        return upper + F.interpolate(lower, size=upper.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FANFeature(nn.Module):
    """`FAN_use`: face crop [B, 3, S, S] -> 512-d feature [B, 512]. Key names are the release's."""

    def __init__(self, config: MotionEncoderConfig):
        super().__init__()
        eps = config.bn_eps
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.conv2 = ConvBlock(64, 128, eps)
        self.conv3 = ConvBlock(128, 128, eps)
        self.conv4 = ConvBlock(128, 256, eps)
        self.m0 = HourGlass(config.hourglass_depth, 256, eps)
        self.top_m_0 = ConvBlock(256, 256, eps)
        self.conv_last0 = nn.Conv2d(256, 256, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(256, eps=eps)
        self.l0 = nn.Conv2d(256, config.num_landmarks, kernel_size=1)
        self.bn5 = nn.BatchNorm2d(config.num_landmarks, eps=eps)
        self.conv6 = nn.Conv2d(config.num_landmarks, 1, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(config.map_size**2, config.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2, stride=2)
        x = self.conv4(self.conv3(x))
        x = self.top_m_0(self.m0(x))
        x = F.relu(self.bn_end0(self.conv_last0(x)))
        # the reference applies a second (idempotent) ReLU before `l0`
        x = F.relu(self.bn5(self.l0(x)))
        x = self.conv6(x)
        return self.fc(F.relu(x.flatten(1)))


def _projection(dim: int, eps: float) -> nn.Sequential:
    # keys `.0` and `.3` are Linear, `.2` BatchNorm1d (running stats), `.1` the ReLU
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.BatchNorm1d(dim, eps=eps), nn.Linear(dim, dim))


def _embedding(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Linear(dim, out))


class MotionEncoder(nn.Module):
    """FanEncoder; `state_dict()` keys equal those of `pd_fpg.pth`. Use in eval mode."""

    def __init__(self, config: MotionEncoderConfig = PD_FGC):
        super().__init__()
        self.config = config
        dim = config.feature_dim
        eps = config.bn_eps
        self.model = FANFeature(config)
        self.to_mouth = _projection(dim, eps)
        # never run (see the module docstring); 500 = 512 - pose - eye in the release
        self.mouth_embed = _embedding(dim, dim - config.pose_dim - config.eye_dim)
        self.to_headpose = _projection(dim, eps)
        self.headpose_embed = _embedding(dim, config.pose_dim)
        self.to_eye = _projection(dim, eps)
        self.eye_embed = _embedding(dim, config.eye_dim)
        self.to_emo = _projection(dim, eps)
        self.emo_embed = _embedding(dim, config.emotion_dim)

    def forward(self, crops: torch.Tensor) -> MotionFeatures:
        """crops: [B, 3, S, S] float32 in [-1, 1], RGB (S = config.input_size)."""
        feature = self.model(crops)
        return MotionFeatures(
            headpose=self.headpose_embed(self.to_headpose(feature)),
            eye=self.eye_embed(self.to_eye(feature)),
            emotion=self.emo_embed(self.to_emo(feature)),
            mouth=self.to_mouth(feature),
        )


def build_motion_encoder(
    config: MotionEncoderConfig = PD_FGC, *, device: torch.device | str = "meta"
) -> MotionEncoder:
    with torch.device(device):
        return MotionEncoder(config)


def load_motion_encoder(
    checkpoint: str | Path | TensorSource,
    config: MotionEncoderConfig = PD_FGC,
    *,
    device: torch.device | str = "cpu",
) -> tuple[MotionEncoder, LoadReport]:
    """Load `pd_fpg.pth` strictly into a float32 encoder in eval mode; the report says what loaded.

    Any missing, unexpected or mis-shaped key raises `CheckpointMismatchError` naming it (the
    reference's `strict=False` would have dropped it silently). Only the `num_batches_tracked`
    counters may be absent: eval-mode BatchNorm never reads them. The file's fp16/fp32 tensors are
    converted to float32, the precision the reference runs this model in.
    """
    source = checkpoint if isinstance(checkpoint, TensorSource) else open_checkpoint(checkpoint)
    # Built on the CPU, not the meta device: a counter absent from the file keeps its real zero.
    model = MotionEncoder(config)
    counters = [k for k in module_tensor_shapes(model) if k.endswith("num_batches_tracked")]
    report = load_into(model, source, dtype=torch.float32, allow_missing=counters)
    return model.to(device).eval(), report


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Our full-size encoder's keys and shapes (the release file's key space: no prefix)."""
    return module_tensor_shapes(build_motion_encoder(PD_FGC))

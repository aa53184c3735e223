"""The PD-FGC motion encoder as the ensemble's `feature_extractor`: ONNX export and a TensorRT engine.

    python -m flashportrait.export.motion_encoder --checkpoint pd_fpg.pth --output <repo>/feature_extractor/1
    python -m flashportrait.export.motion_encoder --random-weights --output /tmp/fx --tensorrt

The exported graph is `FeatureExtractor`: the face front end's crops in, the reference's per-frame
expression vector out, so `face_align`'s output feeds it directly:

    CROPS    [N, 224, 224, 3] uint8 RGB (dynamic N)   (`--input-format float`: [N, 3, 224, 224] in [-1, 1])
    FEATURES [N, 554] float32: head pose 6, eyes 6, emotion 30, mouth 512 (REFERENCE.md 1.3)

The preprocessing inside the graph is the reference's `image_preprocess` (x/255*2-1), in float32
instead of the reference's float64 (at most one float32 ulp on the input). The ONNX file is checked
against the PyTorch module with ONNX Runtime on every export (`compare_features`); the tolerance is the
golden case `fan_encoder`'s fp32 budget (20x the fp32-vs-fp64 error of the reference itself).

The TensorRT engine (fp16, one optimisation profile over the batch) is built with the `tensorrt`
Python package against the runtime that will load it (`export/tensorrt.py`, which writes the
version record `export/engines.py` checks before loading); where `tensorrt` is not importable,
`build_tensorrt_engine` raises `TensorRTUnavailable` saying so.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from flashportrait.export.tensorrt import ShapeProfile, TensorRTUnavailable, build_engine, import_tensorrt
from torch import nn

from flashportrait.models.motion_encoder import PD_FGC, MotionEncoder, load_motion_encoder

InputFormat = Literal["uint8", "float"]
INPUT_NAME = "CROPS"
OUTPUT_NAME = "FEATURES"
# Per-output fp32 budget of the golden case `fan_encoder` (suggested atol; rtol 2e-4).
FP32_TOLERANCE = {"headpose": 0.002, "eye": 0.0005, "emotion": 0.001, "mouth": 0.005}
FP32_RTOL = 2e-4
HEADS = (("headpose", 0, 6), ("eye", 6, 12), ("emotion", 12, 42), ("mouth", 42, 554))


class FeatureExtractor(nn.Module):
    """Crops to the 554-d expression vector: preprocessing + `MotionEncoder` + concatenation."""

    def __init__(self, encoder: MotionEncoder, input_format: InputFormat = "uint8") -> None:
        super().__init__()
        self.encoder = encoder
        self.input_format = input_format

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8: crops [N, 224, 224, 3] RGB; float: [N, 3, 224, 224] in [-1, 1] -> [N, 554] float32."""
        if self.input_format == "uint8":
            crops = (crops.to(torch.float32) / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2)
        return self.encoder(crops).concatenated()


def example_input(input_format: InputFormat, batch: int = 2) -> torch.Tensor:
    size = PD_FGC.input_size
    if input_format == "uint8":
        return torch.randint(
            0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def export_onnx(
    encoder: MotionEncoder, path: str | Path, input_format: InputFormat = "uint8", opset: int = 17
) -> Path:
    """Write the feature extractor to `path` as ONNX with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = FeatureExtractor(encoder.eval(), input_format).eval()
    device = next(module.parameters()).device  # trace where the weights are (a GPU encoder exports too)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (example_input(input_format).to(device),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


@dataclass(frozen=True)
class Parity:
    """Largest |ours - reference| per head and whether every head is inside its tolerance."""

    max_abs: dict[str, float]
    max_rel: dict[str, float]
    passed: bool

    def lines(self) -> list[str]:
        return [
            f"  {head}: max_abs={self.max_abs[head]:.3g} max_rel={self.max_rel[head]:.3g}"
            for head in self.max_abs
        ]


def compare_features(
    ours: np.ndarray, reference: np.ndarray, scale: dict[str, float] | None = None
) -> Parity:
    """Per-head comparison of [N, 554] features; tolerance `FP32_TOLERANCE` times `scale` (default 1)."""
    max_abs, max_rel, passed = {}, {}, True
    for head, lo, hi in HEADS:
        a, b = ours[:, lo:hi].astype(np.float64), reference[:, lo:hi].astype(np.float64)
        diff = np.abs(a - b)
        max_abs[head] = float(diff.max())
        max_rel[head] = float(diff.max() / max(np.abs(b).max(), 1e-12))
        factor = 1.0 if scale is None else scale.get(head, 1.0)
        passed &= bool(np.all(diff <= factor * (FP32_TOLERANCE[head] + FP32_RTOL * np.abs(b))))
    return Parity(max_abs, max_rel, passed)


def reference_features(encoder: MotionEncoder, crops_rgb: np.ndarray) -> np.ndarray:
    """The reference computation on crops [N, 224, 224, 3] uint8 RGB: float64 preprocessing, PyTorch."""
    from flashportrait.face.warp import encoder_input

    with torch.no_grad():
        return encoder.eval()(torch.from_numpy(encoder_input(crops_rgb))).concatenated().numpy()


def onnx_features(
    path: str | Path, crops: np.ndarray, providers: tuple[str, ...] = ("CPUExecutionProvider",)
):
    """Run the exported file with ONNX Runtime on crops in the file's input format -> [N, 554]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    return session.run([OUTPUT_NAME], {INPUT_NAME: crops})[0]


def onnx_crop_encoder(path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """The exported uint8 file as a `CropEncoder` for `FaceFrontEnd.extract_features` (one session)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    return lambda crops: session.run([OUTPUT_NAME], {INPUT_NAME: crops})[0]


def torch_crop_encoder(encoder: MotionEncoder, device: str | torch.device = "cpu"):
    """The PyTorch encoder as a `CropEncoder`: crops [N, 224, 224, 3] uint8 RGB -> [N, 554] float32."""
    module = FeatureExtractor(encoder.eval(), "uint8").to(device).eval()

    def encode(crops: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(crops).to(device)).float().cpu().numpy()

    return encode


def onnx_item_shape(onnx_path: str | Path) -> tuple[int, ...]:
    """The per-crop shape of the exported file's input (everything after the batch dimension)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return tuple(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])


def build_tensorrt_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 16,
    max_batch: int = 64,
    fp16: bool = True,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized TensorRT engine from the exported ONNX file, one profile over the batch,
    with its TensorRT version record beside it (`export.tensorrt.build_engine`)."""
    import_tensorrt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    item = onnx_item_shape(onnx_path)
    profile = ShapeProfile((min_batch, *item), (opt_batch, *item), (max_batch, *item))
    return build_engine(onnx_path, engine_path, {INPUT_NAME: profile}, fp16=fp16, workspace_gib=workspace_gib)


class TensorRTFeatureExtractor:
    """Runs a built engine on CUDA tensors, for parity checks and benchmarks (Triton loads plans itself)."""

    def __init__(self, engine_path: str | Path, device: str = "cuda") -> None:
        from flashportrait.export.engines import load_engine

        self.device = torch.device(device)
        self.engine = load_engine(engine_path)  # refuses an engine of another TensorRT release
        self.context = self.engine.create_execution_context()

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """crops on `device` in the engine's input format -> [N, 554] float32."""
        crops = crops.contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(crops.shape))
        out = torch.empty((crops.shape[0], 554), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(INPUT_NAME, crops.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="pd_fpg.pth (or a safetensors file with its keys)")
    weights.add_argument(
        "--random-weights", action="store_true", help="seeded random weights (benchmarks, CI)"
    )
    parser.add_argument("--output", required=True, help="folder for model.onnx (and model.plan)")
    parser.add_argument("--input-format", choices=["uint8", "float"], default="uint8")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--tensorrt", action="store_true", help="also build model.plan (fp16)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--fp32-engine", action="store_true", help="build the engine without fp16")
    return parser.parse_args(argv)


def _random_encoder(seed: int = 0) -> MotionEncoder:
    torch.manual_seed(seed)
    encoder = MotionEncoder(PD_FGC)
    for module in encoder.modules():  # non-trivial BatchNorm statistics, as a trained file has
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return encoder.eval()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    encoder = _random_encoder() if args.random_weights else load_motion_encoder(args.checkpoint)[0]
    output = Path(args.output)
    onnx_path = export_onnx(encoder, output / "model.onnx", args.input_format, args.opset)
    crops = example_input(args.input_format, batch=4).numpy()
    parity = compare_features(
        onnx_features(onnx_path, crops),
        FeatureExtractor(encoder, args.input_format)(torch.from_numpy(crops)).detach().numpy(),
    )
    print(f"wrote {onnx_path}; ONNX Runtime vs PyTorch: {'PASS' if parity.passed else 'FAIL'}")
    print("\n".join(parity.lines()))
    if not parity.passed:
        return 1
    if args.tensorrt:
        try:
            plan = build_tensorrt_engine(
                onnx_path,
                output / "model.plan",
                min_batch=args.min_batch,
                opt_batch=args.opt_batch,
                max_batch=args.max_batch,
                fp16=not args.fp32_engine,
            )
        except TensorRTUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {plan} (batch {args.min_batch}..{args.max_batch}, opt {args.opt_batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

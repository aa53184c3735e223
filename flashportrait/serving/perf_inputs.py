"""perf_analyzer input data (`--input-data FILE`) for the `flashportrait` ensemble and the `sampler`.

    python -m flashportrait.serving.perf_inputs --out model_repository/perf --url HOST:PORT

writes `flashportrait.json` (the demo portrait, a synthetic driving clip of `--frames` frames and a
prompt: valid for any weights) and `sampler.json` (the same portrait, the clip's features from the
server's `flashportrait_features`, and the prompt's embeddings from its `text_encoder`: their sizes
are the deployment's, so regenerate it against the server you load-test). The files in
`model_repository/perf/` were made against the demo weights (text_dim 32).

Encoding, as perf_analyzer 2.51 reads it: a BYTES element (an encoded image or video) is
`{"b64": base64(4-byte little-endian length + bytes)}`, the serialized form of one BYTES element;
text is a plain JSON string; float tensors are `{"content": [...], "shape": [...]}`. Generation
parameters are not part of the input data: pass them as `--request-parameter=NAME:VALUE:TYPE`
(`perf_parameters`).
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "A woman smiles and nods."
# Small, fast requests for a CPU smoke run: one or two windows of 4 latent frames at 64 pixels.
SMOKE_PARAMETERS: dict[str, int] = {"max_size": 64, "context_size": 4, "context_overlap": 2}


def bytes_element(data: bytes) -> dict[str, str]:
    """One BYTES element as perf_analyzer's `b64` content (length-prefixed, see the module docstring)."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode()}


def float_tensor(array: np.ndarray, digits: int = 6) -> dict[str, Any]:
    """A float32 tensor as `{"content", "shape"}`, values rounded to `digits` significant digits."""
    values = [float(f"{v:.{digits}g}") for v in np.asarray(array, dtype=np.float32).ravel()]
    return {"content": values, "shape": list(array.shape)}


def ensemble_input(image: bytes, video: bytes, prompt: str = PROMPT) -> dict[str, Any]:
    return {"data": [{"IMAGE": bytes_element(image), "VIDEO": bytes_element(video), "PROMPT": [prompt]}]}


def sampler_input(
    image: bytes, features: np.ndarray, prompt_embeds: np.ndarray, fps: tuple[int, int] = (25, 1)
) -> dict[str, Any]:
    """features [N, 554] float32, prompt_embeds [L, D] float32."""
    return {
        "data": [
            {
                "IMAGE": bytes_element(image),
                "FEATURES": float_tensor(features),
                "PROMPT_EMBEDS": float_tensor(prompt_embeds),
                "FPS": [int(fps[0]), int(fps[1])],
            }
        ]
    }


def perf_parameters(parameters: Mapping[str, int | float | str]) -> tuple[str, ...]:
    """`--request-parameter=NAME:VALUE:TYPE` flags for perf_analyzer."""
    # Floats go as strings: GenerationParams parses them (perf_analyzer 2.51 has no float type).
    kinds = {int: "int", float: "string", str: "string", bool: "bool"}
    return tuple(f"--request-parameter={k}:{v}:{kinds[type(v)]}" for k, v in parameters.items())


def write_inputs(out: Path, url: str, frames: int = 9) -> tuple[Path, Path]:
    """Write both files into `out` (the sampler's through the server at `url`)."""
    from flashportrait.client.client import FlashPortraitClient
    from flashportrait.demo import make_demo_media

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        image_path, video_path = make_demo_media(Path(scratch), frames)
        image, video = image_path.read_bytes(), video_path.read_bytes()
    with FlashPortraitClient(url) as client:
        driving = client.features(video, "perf-inputs-features")
        embeds, _ = client.text_embeddings(PROMPT, "", "perf-inputs-text")
    fps = (driving.fps.numerator, driving.fps.denominator) if driving.fps else (25, 1)
    ensemble_path, sampler_path = out / "flashportrait.json", out / "sampler.json"
    ensemble_path.write_text(json.dumps(ensemble_input(image, video)) + "\n")
    sampler_path.write_text(json.dumps(sampler_input(image, driving.features, embeds, fps)) + "\n")
    return ensemble_path, sampler_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashportrait.serving.perf_inputs", description=__doc__)
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for flashportrait.json and sampler.json"
    )
    parser.add_argument("--url", required=True, help="gRPC HOST:PORT of the server to load-test")
    parser.add_argument("--frames", type=int, default=9, help="frames of the synthetic driving clip")
    args = parser.parse_args(argv)
    for path in write_inputs(args.out, args.url, args.frames):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print("parameters for a CPU smoke run: " + " ".join(perf_parameters(SMOKE_PARAMETERS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tiny VAE decoder as a stateless ONNX graph: chunked ONNX Runtime decoding equals the PyTorch
decoder chunk by chunk.

Tolerance: both are float32 evaluations of the same arithmetic in different kernels, so each chunk's
ONNX Runtime frames must be within 1e-5 of PyTorch's (frames lie in [-1, 1]), and ONNX Runtime's
error against the float64 decoder at most 4x PyTorch's own float32 error plus 1e-6 (measured at demo
size: both about 2e-6).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from flashportrait.export.tiny_vae_onnx import (
    LATENTS,
    GraphLayout,
    OnnxTinyVaeDecoder,
    export_onnx,
    memory_input,
    read_layout,
    tensorrt_profiles,
)

from flashportrait.components import DeploymentConfig
from flashportrait.components.prepared import PreparedPaths
from flashportrait.config import from_mapping
from flashportrait.golden import GoldenCase
from flashportrait.models.decoding import StreamingDecoder, decode_all
from flashportrait.models.tiny_vae import TinyVaeConfig, load_tiny_vae

ATOL = 1e-5


@pytest.fixture(scope="module")
def decoders(prepared):
    path = PreparedPaths(prepared).tensors("tiny_vae")
    config = DeploymentConfig.tiny().tiny_vae
    return (
        load_tiny_vae(path, config, dtype=torch.float32),
        load_tiny_vae(path, config, dtype=torch.float64),
    )


@pytest.fixture(scope="module")
def exported(decoders, tmp_path_factory):
    return export_onnx(decoders[0], tmp_path_factory.mktemp("tiny_vae_onnx") / "tiny_vae_decoder.onnx")


def stream(decoder, latents: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    state, start, out = decoder.begin(latents.shape[0]), 0, []
    for size in chunks:
        frames, state = decoder.decode(latents[:, :, start : start + size], state)
        start += size
        out.append(frames)
    out.append(decoder.finish(state))
    return out


def test_chunked_onnx_runtime_decoding_equals_pytorch_chunk_by_chunk(decoders, exported):
    decoder, exact = decoders
    graph = OnnxTinyVaeDecoder(exported)
    assert isinstance(graph, StreamingDecoder)
    latents = torch.randn(2, 16, 7, 5, 6, generator=torch.Generator().manual_seed(3))  # batch 2, not square
    chunks = [1, 2, 1, 3]
    ours, theirs, oracle = (stream(d, latents if d is not exact else latents.double(), chunks)
                            for d in (graph, decoder, exact))  # fmt: skip
    for i, (a, b, o) in enumerate(zip(ours, theirs, oracle, strict=True)):
        assert a.shape == b.shape and a.dtype == torch.float32, i
        if a.numel() == 0:
            continue
        assert (a - b).abs().max() <= ATOL, i
        own_error = (b.double() - o.double()).abs().max()
        assert (a.double() - o.double()).abs().max() <= 4 * own_error + 1e-6, i
    # chunk by chunk: 1, 8, 4, 12 frames (the first 3 trimmed), then nothing held back
    assert [t.shape[2] for t in ours] == [1, 8, 4, 12, 0]
    torch.testing.assert_close(torch.cat(ours, dim=2), decode_all(decoder, latents), rtol=0, atol=ATOL)


def test_calls_can_be_split_into_single_frames(decoders, exported):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    whole = stream(OnnxTinyVaeDecoder(exported), latents, [3])
    split = stream(OnnxTinyVaeDecoder(exported, max_frames=1), latents, [3])
    torch.testing.assert_close(torch.cat(split, 2), torch.cat(whole, 2), rtol=0, atol=ATOL)


def test_graph_declares_its_memories_and_dynamic_axes(decoders, exported):
    layout = read_layout(exported)
    assert layout == GraphLayout.of(decoders[0])
    assert (
        layout.memory_channels == (32,) * 3 + (16,) * 6
        and layout.memory_scales == (1,) * 3 + (2,) * 3 + (4,) * 3
    )
    assert (layout.temporal_factor, layout.spatial_factor, layout.frames_to_trim) == (4, 8, 3)
    graph = onnx.load(str(exported)).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs[LATENTS] == ["batch", 16, "frames", "height", "width"]
    assert inputs[memory_input(8)] == ["batch", 16, "memory_8_height", "memory_8_width"]
    assert [o.name for o in graph.output] == ["FRAMES", *(f"MEMORY_OUT_{i}" for i in range(9))]
    profiles = tensorrt_profiles(layout, height=(4, 8, 16), width=(4, 8, 16))
    assert profiles[LATENTS].max == (2, 16, 4, 16, 16)
    assert profiles[memory_input(8)].min == (1, 16, 16, 16) and profiles[memory_input(8)].max == (
        2,
        16,
        64,
        64,
    )


def test_a_stream_is_one_request(exported):
    graph = OnnxTinyVaeDecoder(exported)
    state = graph.begin(1)
    _, state = graph.decode(torch.zeros(1, 16, 1, 4, 4), state)
    with pytest.raises(ValueError, match="size 5x4 in a stream of"):
        graph.decode(torch.zeros(1, 16, 1, 5, 4), state)
    with pytest.raises(ValueError, match="does not fit this stream"):
        graph.decode(torch.zeros(2, 16, 1, 4, 4), state)
    tail = graph.finish(state)
    assert tail.shape == (1, 3, 0, 32, 32) and state.memory is None
    with pytest.raises(RuntimeError, match="finished"):
        graph.decode(torch.zeros(1, 16, 1, 4, 4), state)


@pytest.mark.parametrize("need_scaled", [False, True])
def test_onnx_graph_reproduces_the_golden_case(golden_dir, tmp_path, need_scaled):
    """The reference's TAEHV outputs (golden `tiny_vae_decoder`, other widths), through the exported
    graph one latent frame per call, within the case's tolerance."""
    case = GoldenCase.load(golden_dir / "tiny_vae_decoder.json")
    derived = ("frames_to_trim", "spatial_factor", "temporal_factor")
    neutral = {k: v for k, v in case.config["neutral"].items() if k not in derived}
    config = from_mapping(TinyVaeConfig, {**neutral, "need_scaled": need_scaled})
    decoder = load_tiny_vae(case.params(), config, dtype=torch.float32)
    graph = OnnxTinyVaeDecoder(export_onnx(decoder, tmp_path / "golden.onnx"))
    name = f"video_need_scaled_{str(need_scaled).lower()}"
    rtol, atol = case.rtol_atol(name)
    ours = decode_all(graph, case.tensor("input/latents"), chunk=1)
    torch.testing.assert_close(ours, case.tensor(f"output/{name}"), rtol=rtol, atol=atol)

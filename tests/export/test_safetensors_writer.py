"""The streamed safetensors writer: its files load with the `safetensors` library, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from flashportrait.export.safetensors_writer import SafetensorsWriter, TensorSpec, file_sha256
from safetensors import safe_open
from safetensors.torch import load_file

from flashportrait.components.prepared import read_safetensors
from flashportrait.weights import SafetensorsFile, open_checkpoint


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 5, generator=gen).bfloat16(),  # 30 bytes: misaligns what follows
        "w.f32": torch.randn(7, generator=gen),
        "w.f16": torch.randn(2, 3, generator=gen).half(),
        "w.fp8": (torch.randn(16, 16, generator=gen) * 10).to(torch.float8_e4m3fn),
        "counter": torch.tensor(3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def write(path, tensors, order, metadata=None):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name in order:
            writer.write(name, tensors[name])
        return writer.close()


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_files_load_with_the_safetensors_library(tmp_path, order):
    tensors = sample_tensors()
    names = list(tensors) if order == "forward" else list(reversed(tensors))
    path = tmp_path / "x.safetensors"
    written = write(path, tensors, names, {"k": "v"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(loaded[name]), as_bytes(tensor)), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    # and with our direct reader (views of one buffer: needs every tensor aligned to its element size)
    direct, metadata = read_safetensors(path, "cpu")
    assert metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert direct[name].dtype == tensor.dtype and torch.equal(as_bytes(direct[name]), as_bytes(tensor))
    # the hash is the file's whether computed while writing (in order) or read back (out of order)
    assert written.sha256 == file_sha256(path) and written.size == path.stat().st_size
    assert written.dtypes["BF16"] == {"tensors": 1, "bytes": 30}
    assert written.dtypes["F32"] == {"tensors": 3, "bytes": 32}
    assert written.tensors == len(tensors)
    assert not (tmp_path / "x.safetensors.partial").exists()


def test_every_tensor_starts_at_a_multiple_of_its_element_size(tmp_path):
    path = tmp_path / "x.safetensors"
    write(path, sample_tensors(), list(sample_tensors()))
    size = int.from_bytes(path.read_bytes()[:8], "little")
    assert size % 8 == 0
    header = json.loads(path.read_bytes()[8 : 8 + size])
    dtypes = {"BF16": 2, "F32": 4, "F16": 2, "F8_E4M3": 1, "I64": 8, "BOOL": 1}
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % dtypes[entry["dtype"]] == 0, name


def test_header_is_never_taken_for_a_torch_pickle(tmp_path):
    # open_checkpoint sniffs the first bytes: 0x80 (pickle) or "PK" (zip). Over these name lengths
    # the natural (8-byte padded) header size passes 128 mod 256, which the writer must pad past.
    natural_sizes = set()
    for length in range(1, 300, 3):
        tensors = {"x" * length: torch.ones(2)}
        path = tmp_path / f"{length}.safetensors"
        write(path, tensors, list(tensors))
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        natural_sizes.add(-(-len(data[8 : 8 + size].rstrip(b" ")) // 8) * 8 % 256)
        assert data[:1] != b"\x80" and data[:2] != b"PK"
        assert isinstance(open_checkpoint(path), SafetensorsFile)
    assert 0x80 in natural_sizes


def test_wrong_writes_are_refused_and_leave_no_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = SafetensorsWriter(path, specs)
    with pytest.raises(ValueError, match="header says"):
        writer.write("w.f32", torch.zeros(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="header says"):
        writer.write("w.f32", torch.zeros(8))
    with pytest.raises(KeyError, match="not one of"):
        writer.write("nope", torch.zeros(1))
    writer.write("w.f32", tensors["w.f32"])
    with pytest.raises(ValueError, match="already written"):
        writer.write("w.f32", tensors["w.f32"])
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"), SafetensorsWriter(path, specs) as writer:
        writer.write("w.f32", tensors["w.f32"])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="duplicate"):
        SafetensorsWriter(path, [specs[0], specs[0]])

"""Format detection by content: safetensors headers whose length looks like a zip or pickle signature."""

from __future__ import annotations

import json
import struct

import torch

from flashportrait.weights import SafetensorsFile, open_checkpoint


def _write_safetensors_with_header_length(path, target_low_bytes: bytes) -> None:
    """A valid safetensors file whose 8-byte header length starts with `target_low_bytes`."""
    data = torch.arange(4, dtype=torch.float32)
    base = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    for pad in range(0, 70000):
        header = json.dumps({**base, "__metadata__": {"pad": "a" * pad}}).encode()
        if struct.pack("<Q", len(header)).startswith(target_low_bytes):
            path.write_bytes(struct.pack("<Q", len(header)) + header + data.numpy().tobytes())
            return
    raise AssertionError("no padding gives that header length")


def test_header_length_looking_like_a_pickle_or_zip(tmp_path):
    for name, low in (("pickle", b"\x80"), ("zip", b"PK")):
        path = tmp_path / f"{name}.bin"
        _write_safetensors_with_header_length(path, low)
        source = open_checkpoint(path)
        assert isinstance(source, SafetensorsFile)
        assert torch.equal(source["x"], torch.arange(4, dtype=torch.float32))

"""Writing safetensors files one tensor at a time, so a 33 GB DiT never has to be held in memory.

`safetensors.torch.save_file` needs every tensor at once. The format is simple enough to stream
(https://github.com/huggingface/safetensors, "Format"):

    8 bytes    N, the header size, unsigned little-endian
    N bytes    JSON: {"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [..],
               "data_offsets": [begin, end]}, ...}, offsets relative to the end of the header,
               padded with spaces
    the rest   the tensors' raw little-endian bytes, back to back, no holes

The header needs every name, dtype and shape before the first byte of data, which the caller knows
from the source checkpoint's metadata (`TensorSpec`). The data layout is planned like the library's
own writer: tensors ordered by element size, largest first, and the header padded to 8 bytes, so
every tensor starts at a multiple of its element size (the library's loader views the memory map by
dtype and needs that). Tensors may then be written in any order (each goes to its planned offset);
the file's sha256 is computed while writing when the writes come in file order, else by reading the
finished file back once.

The file is written as `<name>.partial` and renamed when every tensor is in, so a crash never leaves
a truncated file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

SAFETENSORS_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
HASH_BLOCK = 4 * 2**20  # bytes read at a time when hashing a finished file


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the file will hold: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * self.dtype.itemsize


@dataclass(frozen=True)
class WrittenFile:
    """What was written: total size, sha256 and per-dtype {"tensors": n, "bytes": b}."""

    path: Path
    size: int
    sha256: str | None
    dtypes: dict[str, dict[str, int]]
    tensors: int


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read through one reused buffer (a few MiB of memory, whatever the size)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (a view, no copy when it is already contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Streamed writer: `with SafetensorsWriter(path, specs, metadata) as w: w.write(name, t) ...`.

    specs: every tensor of the file (unique names). Each `write` must give a CPU tensor of exactly
    its spec's dtype and shape; closing checks that every spec was written. `order` is the file's
    data order: writing in that order lets the hash be computed on the fly. digest: False skips the
    sha256 (`WrittenFile.sha256` is None), e.g. for benchmark files.
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        digest: bool = True,
    ):
        self.path = Path(path)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names")
        unknown = sorted({str(s.dtype) for s in specs if s.dtype not in SAFETENSORS_DTYPE_NAMES})
        if unknown:
            raise ValueError(f"{self.path}: safetensors cannot store dtype(s) {unknown}")
        # Largest element size first (stable, so the caller's order within one size is kept).
        self.order: list[TensorSpec] = sorted(specs, key=lambda s: -s.dtype.itemsize)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for spec in self.order:
            self._offsets[spec.name] = (offset, offset + spec.nbytes)
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        # `weights.open_checkpoint` tells formats apart by the first bytes: a header size whose low
        # byte is 0x80 (a pickle's first opcode) or whose low bytes spell "PK" (a zip) would be taken
        # for a torch checkpoint, so such a size is padded by 8 more spaces.
        while (
            len(encoded).to_bytes(8, "little")[:1] == b"\x80"
            or len(encoded).to_bytes(8, "little")[:2] == b"PK"
        ):
            encoded += b" " * 8
        self._prefix = len(encoded).to_bytes(8, "little") + encoded
        self._data_size = offset
        self._specs = {s.name: s for s in specs}
        self._written: set[str] = set()
        self._next = 0  # index in `order` of the next tensor if writes stay sequential
        self._want_digest = digest
        self._digest: hashlib._Hash | None = hashlib.sha256(self._prefix) if digest else None
        self._partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, self._prefix)
        os.ftruncate(self._fd, len(self._prefix) + self._data_size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (CPU, the spec's dtype and shape) at its planned place."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: the writer is closed")
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"{self.path}: {name!r} is not one of the file's tensors")
        if name in self._written:
            raise ValueError(f"{self.path}: {name!r} was already written")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: {name} is {tensor.dtype} {list(tensor.shape)}, "
                f"the header says {spec.dtype} {list(spec.shape)}"
            )
        if tensor.device.type != "cpu":
            raise ValueError(f"{self.path}: {name} is on {tensor.device}; write CPU tensors")
        raw = tensor_bytes(tensor)
        data = raw
        begin, _ = self._offsets[name]
        position = len(self._prefix) + begin
        while data:
            done = os.pwrite(self._fd, data, position)
            data, position = data[done:], position + done
        if self._digest is not None:
            if self.order[self._next].name == name:
                self._digest.update(raw)
                self._next += 1
            else:
                self._digest = None  # out of order: hash the finished file instead
        self._written.add(name)

    def close(self) -> WrittenFile:
        """Check that every tensor was written, sync, rename into place and describe the file."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: the writer is closed")
        missing = [s.name for s in self.order if s.name not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self._partial, self.path)
        if not self._want_digest:
            sha = None
        else:
            sha = self._digest.hexdigest() if self._digest is not None else file_sha256(self.path)
        dtypes: dict[str, dict[str, int]] = {}
        for spec in self.order:
            entry = dtypes.setdefault(SAFETENSORS_DTYPE_NAMES[spec.dtype], {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += spec.nbytes
        return WrittenFile(self.path, self.path.stat().st_size, sha, dtypes, len(self.order))

    def abort(self) -> None:
        """Give up: close and delete the partial file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        # on success the caller closes explicitly to get the `WrittenFile`; close if it did not
        elif self._fd is not None:
            self.close()


__all__ = [
    "SAFETENSORS_DTYPE_NAMES",
    "SafetensorsWriter",
    "TensorSpec",
    "WrittenFile",
    "file_sha256",
    "tensor_bytes",
]

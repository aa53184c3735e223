"""Lazy, memory-mapped readers for the checkpoint formats of the FlashPortrait and Wan2.1 releases.

A checkpoint is opened as a `TensorSource`: a read-only mapping from key to tensor that knows every
key's shape and dtype without reading the data, and reads one tensor at a time when asked. Loading a
14B model therefore never holds two full copies in RAM: safetensors are memory-mapped by the
safetensors library, and torch pickles in the zip format are memory-mapped by `torch.load(mmap=True)`.

Formats (see `golden/manifests/README.md`):
- single `.safetensors` files;
- sharded safetensors with a `*.safetensors.index.json` weight map, or a folder of shards without one
  (the reference merges every `*.safetensors` in the folder);
- torch pickles (`.pt`, `.pth`) loaded with `weights_only=True`, with or without a top-level
  `state_dict` wrapper.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not have the expected layout."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorSource(Mapping[str, torch.Tensor]):
    """Read-only mapping key -> tensor whose metadata is known without reading tensor data."""

    description: str = "checkpoint"

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.info(key).shape for key in self}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {len(self)} tensors>"


class SafetensorsFile(TensorSource):
    """One `.safetensors` file, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.description = str(self.path)
        # Imported here so that models and benchmarks import on a machine with torch alone.
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {self.path} does not exist") from exc
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {exc}") from exc
        self._keys = list(self._handle.keys())
        self._keys_set = set(self._keys)
        self.metadata = self._handle.metadata() or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys_set

    def info(self, key: str) -> TensorInfo:
        if key not in self._keys_set:
            raise KeyError(key)
        piece = self._handle.get_slice(key)
        return TensorInfo(tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])


class MergedSource(TensorSource):
    """Several sources seen as one. With `override=False` a key present twice is an error (shards);
    with `override=True` later sources win (FlashPortrait's `transformer.pt` over the Wan shards)."""

    def __init__(self, sources: Sequence[TensorSource], *, override: bool, description: str | None = None):
        if not sources:
            raise CheckpointError("no checkpoint files to merge")
        self.sources = list(sources)
        self.description = description or " + ".join(s.description for s in self.sources)
        self._owner: dict[str, TensorSource] = {}
        for source in self.sources:
            for key in source:
                if key in self._owner and not override:
                    raise CheckpointError(
                        f"key {key!r} appears in both {self._owner[key].description} and {source.description}"
                    )
                self._owner[key] = source

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def info(self, key: str) -> TensorInfo:
        return self._owner[key].info(key)


class InMemorySource(TensorSource):
    """A plain dict of tensors (a loaded pickle) as a `TensorSource`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "in-memory state dict"):
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"{description}: entries that are not tensors: {_preview(bad)}; expected a flat state dict"
            )
        self._tensors = dict(tensors)
        self.description = description

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), t.dtype)


class RenamedSource(TensorSource):
    """A view of another source with keys rewritten by `rename` (return None to hide a key)."""

    def __init__(
        self, source: TensorSource, rename: Callable[[str], str | None], description: str | None = None
    ):
        self.source = source
        self.description = description or source.description
        self._map: dict[str, str] = {}
        for key in source:
            new = rename(key)
            if new is None:
                continue
            if new in self._map:
                raise CheckpointError(
                    f"{self.description}: keys {self._map[new]!r} and {key!r} both map to {new!r}"
                )
            self._map[new] = key

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source[self._map[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def info(self, key: str) -> TensorInfo:
        return self.source.info(self._map[key])


def add_prefix(source: TensorSource, prefix: str) -> TensorSource:
    """Prepend `prefix` to every key (the Wan VAE and CLIP loaders add `model.`)."""
    return RenamedSource(source, lambda k: prefix + k)


def strip_prefix(source: TensorSource, prefix: str, *, keep_others: bool = False) -> TensorSource:
    """Remove `prefix` from keys that have it; keys without it are dropped unless `keep_others`."""

    def rename(key: str) -> str | None:
        if key.startswith(prefix):
            return key[len(prefix) :]
        return key if keep_others else None

    return RenamedSource(source, rename)


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_pickle(path: Path) -> Mapping:
    if path.name.endswith(".safetensors"):
        # torch.load (2.13) hands paths with this suffix to the safetensors reader; the content
        # says pickle, so read it through a file object (no memory map for this odd naming).
        try:
            with path.open("rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        # Legacy (non-zip) pickles cannot be memory-mapped; read them normally.
        if "mmap" not in str(exc) and "zip" not in str(exc).lower():
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def open_torch_pickle(path: str | Path, *, unwrap_state_dict: bool = True) -> TensorSource:
    """A `.pt`/`.pth` file saved with `torch.save`, read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = _load_pickle(path)
    except CheckpointError:
        raise
    except Exception as exc:  # unpickling errors of every kind: report the file
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if unwrap_state_dict and isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict of tensors")
    return InMemorySource(obj, description=str(path))


def open_sharded_safetensors(path: str | Path) -> TensorSource:
    """A folder of safetensors shards, or its `*.safetensors.index.json`.

    With an index, exactly the shards it names are read and every key must be in the shard the index
    says. Without one, every `*.safetensors` in the folder is merged, as the reference loader does.
    """
    path = Path(path)
    index: Path | None = None
    if path.is_file() and path.name.endswith(".index.json"):
        index, folder = path, path.parent
    elif path.is_dir():
        folder = path
        candidates = sorted(folder.glob("*.safetensors.index.json"))
        if len(candidates) > 1:
            raise CheckpointError(f"{folder} holds several shard indexes: {[c.name for c in candidates]}")
        index = candidates[0] if candidates else None
    else:
        raise CheckpointError(f"{path} is neither a folder of safetensors shards nor a shard index")
    if index is None:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{folder} holds no *.safetensors files")
        return MergedSource([SafetensorsFile(s) for s in shards], override=False, description=str(folder))
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{index} is not a safetensors index (needs a 'weight_map' object): {exc}"
        ) from exc
    shard_names = sorted(set(weight_map.values()))
    missing = [n for n in shard_names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard(s) that are not in {folder}: {missing}")
    merged = MergedSource(
        [SafetensorsFile(folder / n) for n in shard_names], override=False, description=str(folder)
    )
    for key, shard in weight_map.items():
        if key not in merged:
            raise CheckpointError(f"{index} lists {key!r} in {shard}, but that shard does not hold it")
        owner = merged._owner[key]
        if Path(owner.description).name != shard:
            raise CheckpointError(f"{index} lists {key!r} in {shard}, but it is in {owner.description}")
    extra = [k for k in merged if k not in weight_map]
    if extra:
        raise CheckpointError(f"shards in {folder} hold keys the index does not list: {_preview(extra)}")
    return merged


def open_checkpoint(path: str | Path, *, unwrap_state_dict: bool = True) -> TensorSource:
    """Open any supported checkpoint layout by inspecting what is on disk (never by the file's name)."""
    path = Path(path)
    if path.is_dir() or path.name.endswith(".index.json"):
        return open_sharded_safetensors(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with path.open("rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header length (8 bytes, little endian) and then the JSON
    # header itself. Test that first: the length's low bytes can look like a zip ("PK") or pickle
    # (0x80) signature.
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return SafetensorsFile(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return open_torch_pickle(path, unwrap_state_dict=unwrap_state_dict)
    raise CheckpointError(f"{path} is neither a safetensors file nor a torch checkpoint")


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` (contiguous CPU copies are made one at a time by safetensors)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))

"""DiT block weights streamed from pinned host memory: the `blockwise` memory mode.

`BlockStreamer(blocks, device)` hosts each transformer block's weights (`hosted.HostedTensors`) and
registers forward hooks on every block:

- pre-hook of block i: block i is made resident (waiting for its prefetch, or loading it now if it
  was not prefetched), then block i+1 (block 0 after the last one, for the next DiT call) is
  prefetched: its storages are allocated on the compute stream and filled by a host-to-device copy
  on a separate copy stream, which first waits for the compute stream to reach this point;
- post-hook of block i: block i is released (hosted tensors back in their slots, derived caches
  dropped, device storages freed in compute-stream order).

So while block i computes, block i+1's weights travel over PCIe, and at most two blocks' weights are
on the device at any time (plus the transient q/k/v concatenation the fast path builds inside a
block). The copy of block i+1 cannot start before block i-1 has finished computing (its memory is
what block i+1 reuses); with two buffers that is the earliest safe point, and block i's compute (tens
of milliseconds at full size for a 21-frame window) is longer than one block's copy (about 0.8 GiB in
bf16, about 16 ms at 50 GB/s), so the transfer is hidden.

On the CPU the same hooks run with synchronous copies from ordinary host memory (the "device" is the
CPU), which is the functional equivalent the tests run; `resident_blocks()` says which blocks hold
device bytes.

Derived caches: the DiT's fast path concatenates q/k/v once per `SelfAttention` and keeps the
concatenation (`dit_blocks.FusedProjection`), rebinding q/k/v to views of it. A block that is
released drops that cache (`drop_derived_caches`), so the concatenation is rebuilt from the freshly loaded
weights on the next call (one device copy of the q/k/v weights per block call, about 0.1 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flashportrait.memory.hosted import HostedTensors
from flashportrait.models.dit_blocks import FusedProjection

# Objects derived from a block's weights that the block caches between calls (see module docstring).
_DERIVED_CACHES: tuple[type, ...] = (FusedProjection,)


def drop_derived_caches(block: nn.Module) -> None:
    """Forget objects `block` derived from its weights and keeps between calls (FusedProjection)."""
    for module in block.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, _DERIVED_CACHES):
                setattr(module, name, None)


def derived_bytes(block: nn.Module) -> int:
    """Bytes of device tensors held by derived caches of `block` (0 once released)."""
    total = 0
    for module in block.modules():
        for value in vars(module).values():
            if isinstance(value, FusedProjection):
                total += sum(t.untyped_storage().nbytes() for t in value.tensors.values())
    return total


class BlockStreamer:
    """Streams the weights of `blocks` (run in order) to `device` (module docstring).

    prefetch: overlap the next block's copy with the current block (False: load each block when it
    starts, for comparison). on_event: optional callback(event, block index) for "load", "prefetch",
    "release" (tests and benchmarks record the residency with it).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        *,
        prefetch: bool = True,
        on_event: Any = None,
    ) -> None:
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("BlockStreamer needs at least one block")
        for block in self.blocks:
            drop_derived_caches(block)
        self.hosted = [HostedTensors([block], device) for block in self.blocks]
        self.device = self.hosted[0].device
        self.prefetch = prefetch
        self.on_event = on_event
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._ready: list[torch.cuda.Event | None] = [None] * len(self.blocks)
        self._index = {id(block): i for i, block in enumerate(self.blocks)}
        self._handles = []
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre))
            self._handles.append(block.register_forward_hook(self._post, always_call=True))

    @property
    def block_bytes(self) -> list[int]:
        """Bytes of each block's weights."""
        return [h.nbytes for h in self.hosted]

    @property
    def host_bytes(self) -> int:
        return sum(self.block_bytes)

    def resident_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now (loaded or in flight)."""
        return [i for i, h in enumerate(self.hosted) if h.device_bytes()]

    def device_bytes(self) -> int:
        return sum(h.device_bytes() for h in self.hosted) + sum(derived_bytes(b) for b in self.blocks)

    def _emit(self, event: str, index: int) -> None:
        if self.on_event is not None:
            self.on_event(event, index)

    def _pre(self, module: nn.Module, args: Any) -> None:
        index = self._index[id(module)]
        hosted = self.hosted[index]
        ready = self._ready[index]
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
            self._ready[index] = None
        elif not hosted.loaded:
            hosted.load()
            self._emit("load", index)
        if self.prefetch:
            self._prefetch((index + 1) % len(self.blocks))

    def _prefetch(self, index: int) -> None:
        hosted = self.hosted[index]
        if hosted.loaded:
            return
        hosted.allocate()
        if self._copy_stream is None:
            hosted.copy_in()
        else:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                hosted.copy_in()
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            self._ready[index] = event
        hosted.loaded = True
        self._emit("prefetch", index)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._release(self._index[id(module)])

    def _release(self, index: int) -> None:
        ready = self._ready[index]
        if ready is not None:  # never used: the copy must end before its memory is reused
            torch.cuda.current_stream(self.device).wait_event(ready)
            self._ready[index] = None
        drop_derived_caches(self.blocks[index])
        self.hosted[index].release()
        self._emit("release", index)

    def release_all(self) -> None:
        """Free every block (also a prefetched one) on the device."""
        for index in range(len(self.blocks)):
            if self.hosted[index].loaded:
                self._release(index)

    def close(self) -> None:
        """Remove the hooks and load every block for good (resident again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.release_all()
        for hosted in self.hosted:
            hosted.load()


__all__ = ["BlockStreamer", "derived_bytes", "drop_derived_caches"]

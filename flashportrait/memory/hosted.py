"""Module weights that live in host memory and exist on the device only while they are loaded.

`HostedTensors` takes every parameter and buffer of some modules, copies each underlying storage
once into (pinned, on CUDA) host memory, and leaves the modules' tensors on the device with storages
of zero bytes. `load()` re-allocates each storage on the device and copies the bytes back in;
`release()` shrinks the storages to zero bytes again. The weights are read-only, so nothing is ever
copied back to the host.

Why storages and not `module.to(device)`: the tensor objects, their shapes, dtypes and devices never
change, so every caller that reads `module.device`, `weight.dtype` or `weight.shape` (to place its
inputs, to pick a path) sees a device module, loaded or not, and needs no change. The same trick is
FSDP's way of freeing parameters between uses. Reading a released weight's values is an error of
the caller: entry points must load first (`offload.OnDemand`, `blockwise.BlockStreamer` do). That
includes printing one: its storage has no bytes, so `repr` reads past it (on the CPU a crash).

Storages are the unit (not tensors), so tensors sharing one storage (views, tied weights, the DiT's
q/k/v views of one fused weight) stay shared. A module may rebind a tensor while it runs (the DiT's
`FusedProjection` replaces q/k/v by views of a concatenation); `release()` puts the hosted tensor
objects back into their slots so nothing derived from a loaded weight outlives the use.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Slot:
    """A place a tensor is registered: `module._parameters[name]` or `module._buffers[name]`."""

    module: nn.Module
    name: str
    parameter: bool
    tensor: torch.Tensor

    def current(self) -> torch.Tensor | None:
        table = self.module._parameters if self.parameter else self.module._buffers
        return table.get(self.name)

    def restore(self) -> None:
        table = self.module._parameters if self.parameter else self.module._buffers
        if table.get(self.name) is not self.tensor:
            table[self.name] = self.tensor


@dataclass
class _Group:
    """One device storage and its host copy [nbytes] uint8."""

    storage: torch.UntypedStorage
    host: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.host.numel()


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a 1-D uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def module_slots(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner, name, is_parameter, tensor) of every parameter and buffer under `modules`, each
    registration once."""
    seen: set[tuple[int, str]] = set()
    out = []
    for root in modules:
        for module in root.modules():
            for parameter, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None or (id(module), name) in seen:
                        continue
                    seen.add((id(module), name))
                    out.append((module, name, parameter, tensor))
    return out


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


# Storages start at multiples of this in the host buffer (the CUDA allocator's alignment).
_ALIGN = 512
PIN_ENV = "FLASHPORTRAIT_PINNED"


def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """A [nbytes] uint8 host buffer and, when pinned, the function that unpins it early (a finaliser
    unpins it otherwise, before its pages are freed).

    Pinned with `cudaHostRegister` on an ordinary allocation, at its exact size: PyTorch's pinned
    allocator (`pin_memory=True`) rounds every buffer up to a power of two, which would pin up to
    twice the weights (a 10.6 GiB umT5-XXL would take 16 GiB). `FLASHPORTRAIT_PINNED=allocator` uses
    PyTorch's allocator instead; a failed registration is an error naming the size.
    """
    if not pin or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8), None
    if os.environ.get(PIN_ENV, "register") == "allocator":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)
    if int(error) != 0:
        raise RuntimeError(
            f"pinning {nbytes / 2**30:.2f} GiB of host memory with cudaHostRegister failed ({error}); "
            f"set {PIN_ENV}=allocator to use PyTorch's pinned allocator"
        )
    registered = [buffer.data_ptr()]

    def unpin() -> None:
        if registered:
            cudart.cudaHostUnregister(registered.pop())

    weakref.finalize(buffer, unpin)
    return buffer, unpin


class HostedTensors:
    """The parameters and buffers of `modules`, hosted (see the module docstring).

    device: where the weights are used; tensors elsewhere (the host, another GPU) or over storages
        that cannot be resized are moved (new tensor objects registered in their modules), the
        others keep their objects.
    pin: page-locked host memory (default: when the device is CUDA), which makes loads asynchronous
        (`host_buffer`).
    The host copy is one buffer holding every storage. After construction the weights are released
    (zero device bytes).
    """

    def __init__(self, modules: Sequence[nn.Module], device: torch.device | str, *, pin: bool | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        pin = self.device.type == "cuda" if pin is None else pin
        slots = module_slots(modules)
        sources: dict[tuple[str, int], torch.UntypedStorage] = {}
        for module, name, _, tensor in slots:
            if tensor.is_meta:
                raise ValueError(f"{type(module).__name__}.{name} is on the meta device; load it first")
            sources.setdefault(storage_key(tensor), tensor.untyped_storage())
        offsets, total = {}, 0
        for key, source in sources.items():
            offsets[key] = total
            total += -(-source.nbytes() // _ALIGN) * _ALIGN
        self.host, self._unpin = host_buffer(total, pin)
        self.groups: list[_Group] = []
        self.slots: list[_Slot] = []
        storages = {}
        with torch.no_grad():
            for key, source in sources.items():
                host = self.host[offsets[key] : offsets[key] + source.nbytes()]
                host.copy_(_bytes_view(source))
                if source.device == self.device and source.resizable():
                    storages[key] = source
                else:  # a new device storage, for the tensors to be set onto (freed below)
                    storages[key] = torch.empty(
                        source.nbytes(), dtype=torch.uint8, device=self.device
                    ).untyped_storage()
                self.groups.append(_Group(storages[key], host))
            rebound: dict[int, torch.Tensor] = {}  # a tensor registered twice (tied) stays one object
            for module, name, parameter, tensor in slots:
                storage = storages[storage_key(tensor)]
                original = id(tensor)
                if original in rebound:
                    tensor = rebound[original]
                    (module._parameters if parameter else module._buffers)[name] = tensor
                elif storage_key(tensor) != (str(storage.device), storage.data_ptr()):
                    tensor = self._rebind(module, name, parameter, tensor, storage)
                    rebound[original] = tensor
                self.slots.append(_Slot(module, name, parameter, tensor))
        self.loaded = True
        self.release()

    def unpin(self) -> None:
        """Unpin the host buffer now (otherwise when it is garbage collected)."""
        if self._unpin is not None:
            self._unpin()

    @staticmethod
    def _rebind(
        module: nn.Module, name: str, parameter: bool, tensor: torch.Tensor, storage: torch.UntypedStorage
    ) -> torch.Tensor:
        """A tensor like `tensor` (offset, shape, strides) over `storage`, registered in its slot."""
        moved = torch.empty(0, dtype=tensor.dtype, device=storage.device).set_(
            storage, tensor.storage_offset(), tensor.shape, tensor.stride()
        )
        if parameter:
            moved = nn.Parameter(moved, requires_grad=False)
            module._parameters[name] = moved
        else:
            module._buffers[name] = moved
        return moved

    @property
    def nbytes(self) -> int:
        """Bytes of the weights (host copy; also the device bytes while loaded)."""
        return sum(g.nbytes for g in self.groups)

    def device_bytes(self) -> int:
        """Bytes the storages hold on the device now."""
        return sum(g.storage.nbytes() for g in self.groups)

    def allocate(self) -> None:
        """Device storages at full size, contents undefined (`copy_in` fills them). Allocation
        happens on the current stream, so memory freed there earlier is reused in stream order."""
        for group in self.groups:
            if group.storage.nbytes() != group.nbytes:
                group.storage.resize_(group.nbytes)

    def copy_in(self) -> None:
        """Host -> device copies on the current stream (asynchronous from pinned memory)."""
        for group in self.groups:
            _bytes_view(group.storage).copy_(group.host, non_blocking=True)

    def load(self) -> None:
        """Allocate and fill on the current stream; ordered before any later work on it."""
        if not self.loaded:
            self.allocate()
            self.copy_in()
            self.loaded = True

    def release(self) -> None:
        """Put the hosted tensors back into their slots and free the device storages (the memory
        returns to the allocator in the current stream's order, so queued work still reads it)."""
        for slot in self.slots:
            slot.restore()
        for group in self.groups:
            group.storage.resize_(0)
        self.loaded = False


__all__ = ["PIN_ENV", "HostedTensors", "host_buffer", "module_slots", "storage_key"]

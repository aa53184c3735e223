"""One process drives, the others follow: every DiT call of the driving rank is replayed on the rest.

Sequence parallelism needs every rank of the group to make the same DiT call with the same inputs.
Only the driving rank (rank 0) runs the sampler (conditioning, wavefront, decoding, output); the
other ranks hold just the DiT and wait for calls:

- `CallBroadcaster(dit)` on the driver: a forward pre-hook that broadcasts the call (its arguments'
  structure and non-tensor values with `broadcast_object_list`, then each tensor with `broadcast`)
  before the driver's own forward runs;
- `serve_calls(dit)` on the followers: receive a call, run `dit(*args, **kwargs)` (the sequence-
  parallel hooks do the rest), repeat until the driver's `stop()`.

The inputs are therefore bit-identical on every rank (a follower never recomputes them), and a
follower needs neither the VAE, CLIP, text encoder nor the face models. Tensors that are a broadcast
view of one row (`expand`, stride 0, as the sampler passes x, y, t and the CLIP and expression tokens
for its guidance passes) are sent as that row and expanded again, so the follower's DiT takes the
same shared-row fast path and makes the same collectives. A tensor's device kind is kept: a host
tensor (the DiT checks some values only on the host) arrives on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class _TensorRef:
    """A tensor argument: index into the sent tensors, its shape, dtype, where it lives (host or
    device) and the dims that are broadcast views (sent with size 1)."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_host: bool
    expanded: tuple[int, ...]


def _compact(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """t without its broadcast dims (stride 0, size > 1): (the rows sent, those dims)."""
    dims = tuple(d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1)
    for d in dims:
        t = t.narrow(d, 0, 1)
    return t.contiguous(), dims


def pack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """`value` with every tensor replaced by a `_TensorRef` (appended to `tensors`); tuples, lists and
    dicts are walked, anything else is sent as it is (it must pickle)."""
    if isinstance(value, torch.Tensor):
        compact, dims = _compact(value.detach())
        tensors.append(compact)
        return _TensorRef(len(tensors) - 1, tuple(value.shape), value.dtype, value.device.type == "cpu", dims)
    if isinstance(value, tuple):
        return tuple(pack(v, tensors) for v in value)
    if isinstance(value, list):
        return [pack(v, tensors) for v in value]
    if isinstance(value, dict):
        return {k: pack(v, tensors) for k, v in value.items()}
    return value


def unpack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of `pack` with the received tensors."""
    if isinstance(value, _TensorRef):
        return tensors[value.index].expand(value.shape)
    if isinstance(value, tuple):
        return tuple(unpack(v, tensors) for v in value)
    if isinstance(value, list):
        return [unpack(v, tensors) for v in value]
    if isinstance(value, dict):
        return {k: unpack(v, tensors) for k, v in value.items()}
    return value


def _refs(value: Any) -> list[_TensorRef]:
    if isinstance(value, _TensorRef):
        return [value]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where this backend's collectives take tensors: the current CUDA device for NCCL, else the host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CallBroadcaster:
    """On the driving rank `src`: sends every forward call of `dit` to the group (module docstring)."""

    def __init__(self, dit: nn.Module, group: dist.ProcessGroup | None = None, src: int = 0) -> None:
        self.group = group
        self.src = src
        self.calls = 0
        self._stopped = False
        self._handle = dit.register_forward_pre_hook(self._send, with_kwargs=True)

    def _send(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors: list[torch.Tensor] = []
        meta = pack((args, kwargs), tensors)
        dist.broadcast_object_list([meta], src=self.src, group=self.group)
        device = comm_device(self.group)
        for tensor in tensors:
            dist.broadcast(tensor.to(device), src=self.src, group=self.group)
        self.calls += 1

    def stop(self) -> None:
        """Tell the followers to return from `serve_calls` (once; also when no call was made)."""
        if not self._stopped:
            self._stopped = True
            self._handle.remove()
            dist.broadcast_object_list([None], src=self.src, group=self.group)


def send_stop(group: dist.ProcessGroup | None = None, src: int = 0) -> None:
    """The driver's stop without a broadcaster (the driver failed before it built one)."""
    dist.broadcast_object_list([None], src=src, group=group)


def expect_stop(group: dist.ProcessGroup | None = None, src: int = 0) -> None:
    """On a follower that could not load its DiT: wait for the driver's stop (RuntimeError if a call
    comes instead)."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=src, group=group)
    if box[0] is not None:
        raise RuntimeError("this follower has no DiT but the driver sent a DiT call")


@torch.no_grad()
def serve_calls(
    dit: nn.Module, group: dist.ProcessGroup | None = None, src: int = 0, device: torch.device | None = None
) -> int:
    """On a following rank: run the driver's DiT calls on `dit` (on `device`, default the DiT's) until
    it stops; returns the number of calls. An error here ends this process (the launcher then stops
    the others): the group's collectives cannot continue without it."""
    device = device or next(dit.parameters()).device
    comm = comm_device(group)
    served = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        meta = box[0]
        if meta is None:
            return served
        tensors = []
        for ref in sorted(_refs(meta), key=lambda r: r.index):
            shape = tuple(1 if d in ref.expanded else n for d, n in enumerate(ref.shape))
            buffer = torch.empty(shape, dtype=ref.dtype, device=comm)
            dist.broadcast(buffer, src=src, group=group)
            tensors.append(buffer.to("cpu" if ref.on_host else device))
        args, kwargs = unpack(meta, tensors)
        dit(*args, **kwargs)
        served += 1


__all__ = ["CallBroadcaster", "comm_device", "expect_stop", "pack", "send_stop", "serve_calls", "unpack"]

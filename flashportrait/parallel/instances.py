"""One sampler instance per GPU for throughput: the device a Triton model instance runs on.

Throughput on a multi-GPU host comes from independent requests on independent GPUs, not from
splitting one request: the sampler's `config.pbtxt` asks Triton for one instance per GPU,

    instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 0, 1, 2, 3 ] } ]

and Triton then creates four instances of the Python model (`count` per listed GPU), each in its own
stub process, and queues requests to whichever is free. Triton tells each instance its GPU in the
`initialize(args)` dictionary: `args["model_instance_kind"]` is "GPU" and
`args["model_instance_device_id"]` is the GPU's index as a string ("2"). `device_for_instance(args)`
turns that into `torch.device("cuda:2")` and makes it the process's current CUDA device, so that
everything the instance allocates without naming a device (CUDA streams, Triton kernels, cuBLAS
workspaces, the block streamer's copy stream) lands on its GPU too. The index is valid in the stub
as it is: the stub inherits the server's environment, so with `CUDA_VISIBLE_DEVICES=2,3` on the
server Triton numbers those GPUs 0 and 1 and so does torch in the stub.

KIND_CPU (and KIND_MODEL, where the model places itself) give the CPU unless `fallback` says
otherwise. A model with `count: 2` on one GPU gets two instances sharing it: each holds its own copy
of the weights, so that only pays off with a memory mode that leaves room (`flashportrait.memory`).
Sequence parallelism across GPUs for one request is `flashportrait.parallel.ulysses` (one Triton
instance driving follower processes) and is not combined with one-instance-per-GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def device_for_instance(
    args: Mapping[str, Any], *, fallback: str = "cpu", set_current: bool = True
) -> torch.device:
    """The torch device of the Triton model instance initialised with `args` (module docstring).

    KIND_GPU -> `cuda:<model_instance_device_id>` (made the current CUDA device when `set_current`);
    any other kind -> `fallback`. Raises RuntimeError with a message naming the instance when a GPU
    instance finds no CUDA or its index is not visible.
    """
    kind = str(args.get("model_instance_kind", "")).upper().removeprefix("KIND_")
    name = args.get("model_instance_name", args.get("model_name", "model instance"))
    if kind != "GPU":
        return torch.device(fallback)
    raw = str(args.get("model_instance_device_id", "0")).strip() or "0"
    try:
        index = int(raw)
    except ValueError:
        raise RuntimeError(f"{name}: model_instance_device_id {raw!r} is not a GPU index") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"{name}: a KIND_GPU instance on GPU {index}, but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise RuntimeError(f"{name}: GPU {index} is not visible to this process ({count} visible)")
    device = torch.device("cuda", index)
    if set_current:
        torch.cuda.set_device(device)
    return device


__all__ = ["device_for_instance"]

"""Starting the processes of one sequence-parallel group on one host.

`spawn(fn, nprocs, *args, backend=...)` starts `nprocs` processes with `torch.multiprocessing.spawn`,
each running `fn(rank, world_size, *args)` inside an initialised `torch.distributed` group (NCCL with
one GPU per rank, `cuda:<rank>`, or gloo on the CPU for tests), and destroys the group afterwards.
Under `torchrun`, `init_from_env()` does the same set-up from its environment variables.

NVLink multicast stays off (NVLS and symmetric-memory multicast have failed on shared H200 hosts):
`NCCL_NVLS_ENABLE=0` and `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` are set in the environment before any
process group exists, unless the caller set them already (`multicast_off`).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.distributed as dist

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# Followers wait in a collective while the driver decodes the driving video or encodes the prompt:
# far longer than the 10-minute default watchdog timeout for long videos.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)


def multicast_off(env: MutableMapping[str, str] | None = None) -> None:
    """Set the variables of `MULTICAST_OFF` in `env` (default os.environ) where they are unset."""
    env = os.environ if env is None else env
    for name, value in MULTICAST_OFF.items():
        env.setdefault(name, value)


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _init(rank: int, world: int, backend: str, timeout: datetime.timedelta) -> None:
    multicast_off()
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)


def _entry(
    rank: int,
    world: int,
    backend: str,
    timeout: datetime.timedelta,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    _init(rank, world, backend, timeout)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "nccl",
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run `fn(rank, nprocs, *args)` in `nprocs` new processes of one group (module docstring).
    `fn` and `args` must pickle (a module-level function). Raises if any process fails (the others
    are then terminated by `torch.multiprocessing`)."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise RuntimeError(f"{nprocs} processes need {nprocs} GPUs, {torch.cuda.device_count()} visible")
    multicast_off()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = os.environ.get("FLASHPORTRAIT_MASTER_PORT") or str(free_port())
    torch.multiprocessing.spawn(_entry, args=(nprocs, backend, timeout, fn, args), nprocs=nprocs, join=True)


def init_from_env(
    backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> tuple[int, int]:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set): initialise the group, NCCL on
    `cuda:<LOCAL_RANK>` when CUDA is available, else gloo. Returns (rank, world_size)."""
    multicast_off()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


__all__ = [
    "DEFAULT_TIMEOUT",
    "MULTICAST_OFF",
    "default_backend",
    "free_port",
    "init_from_env",
    "multicast_off",
    "spawn",
]

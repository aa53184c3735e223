"""`flashportrait generate --gpus N`: one request over N GPUs of this host (sequence parallelism).

The launcher (`launch.spawn`) starts N processes, one per GPU (`cuda:<rank>`, NCCL; with
`--device cpu`, N CPU processes over gloo, which is how the tests run it):

- rank 0 is the driver: it runs the ordinary `flashportrait generate` (face front end, text
  encoder, sampler, MP4 writer) with the DiT sharded (`ulysses.SequenceParallel`) and every DiT call
  broadcast to the followers (`driver.CallBroadcaster`);
- ranks 1..N-1 are followers: they load only the DiT (in the same memory mode), shard it the same
  way and replay the driver's calls (`driver.serve_calls`) until it stops them.

Every process holds the whole DiT (Ulysses splits activations, not weights), so each GPU needs the
memory of a one-GPU run's DiT; the driver alone also holds the text encoder, CLIP and the VAEs.
The exit status is the driver's. A user error (bad parameter, missing weights) is the driver's
message and status; the followers then stop without loading or serving anything more.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch


def run_parallel(args: argparse.Namespace) -> int:
    """Spawn `args.gpus` processes and return the driver's exit status."""
    import torch.multiprocessing as mp

    from flashportrait.generate import _fail
    from flashportrait.parallel.launch import default_backend, spawn

    device_type = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if device_type == "cuda" and torch.cuda.device_count() < args.gpus:
        return _fail(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices are visible")
    status = mp.get_context("spawn").SimpleQueue()
    spawn(_rank_main, args.gpus, args, device_type, status, backend=default_backend(device_type))
    return int(status.get()) if not status.empty() else 1


def _rank_main(rank: int, world: int, args: argparse.Namespace, device_type: str, status: Any) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if rank == 0:
        status.put(_drive(args, device))
    else:
        _follow(args, device)


def _drive(args: argparse.Namespace, device: torch.device) -> int:
    from flashportrait.generate import run
    from flashportrait.parallel.driver import CallBroadcaster, send_stop
    from flashportrait.parallel.ulysses import SequenceParallel

    attached: list[CallBroadcaster] = []

    def attach(sampler: Any) -> None:
        SequenceParallel(sampler.dit)
        attached.append(CallBroadcaster(sampler.dit))

    one = copy.copy(args)
    one.gpus, one.device = 1, str(device)
    # An unexpected exception propagates without a stop: the followers may be inside a collective
    # of the failed call, and the launcher terminates them when this process fails.
    code = run(one, sampler_hook=attach)
    if attached:
        attached[0].stop()
    else:
        send_stop()
    return code


def _follow(args: argparse.Namespace, device: torch.device) -> None:
    from flashportrait.components import MissingWeightsError
    from flashportrait.config import ConfigError
    from flashportrait.memory import load_components_for
    from flashportrait.parallel.driver import expect_stop, serve_calls
    from flashportrait.parallel.ulysses import SequenceParallel
    from flashportrait.weights import CheckpointError, CheckpointMismatchError

    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default
    components = None
    if args.weights is not None:
        try:
            components, _ = load_components_for(
                args.weights, memory=args.memory, mode=args.mode, device=device, dtype=dtype, parts=("dit",)
            )
        except (MissingWeightsError, ConfigError, CheckpointError, CheckpointMismatchError):
            components = None
    if components is None:  # the driver meets the same error, reports it and stops the followers
        expect_stop()
        return
    SequenceParallel(components.dit)
    serve_calls(components.dit, device=device)


__all__ = ["run_parallel"]

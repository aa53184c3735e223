"""Memory modes: where each model's weights live while a deployment serves requests.

A mode is a combination of three independent options, named by joining them with `+`
(`fp8+blockwise`); `resident` is none of them:

| option       | what changes                                                                   |
|--------------|--------------------------------------------------------------------------------|
| (resident)   | every model on the device, bf16 DiT (about 32 GiB DiT + 11 GiB umT5-XXL + 2 GiB)|
| `fp8`        | the DiT blocks' linear layers in float8 e4m3 (`fp8_linear`), about half the DiT |
| `components` | umT5, CLIP, the Wan VAE encoder and the motion encoder in pinned host memory, on |
|              | the device only while they run (`offload.OnDemand`)                            |
| `blockwise`  | the DiT blocks' weights in pinned host memory, streamed one block ahead of the |
|              | compute on a copy stream (`blockwise.BlockStreamer`)                           |

Every combination is valid (`MEMORY_MODES`). `resident`, `components` and `blockwise` compute the
same arithmetic, so they give bit-identical results; `fp8` changes the DiT's matmuls (error budget in
`fp8_linear.py` and BENCHMARKS.md). The DiT's small non-block layers (patch, text, time and image
embeddings, head: about 0.5 GiB), the portrait encoder, the tiny VAE and the Wan VAE decoder always
stay resident.

`apply_memory_mode(target, mode, device)` applies a mode to loaded models (a `Components` or a
`Sampler`), whichever device they were loaded on; `load_components_for` loads a weights folder
straight into a mode (offloaded parts are read into host memory, the rest onto the device, so a
24 GiB card never holds the bf16 DiT).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashportrait.config import ConfigError
from flashportrait.memory.blockwise import BlockStreamer, drop_derived_caches
from flashportrait.memory.offload import OnDemand, component_offloads
from flashportrait.models.fp8_linear import FP8Linear, convert_linears_to_fp8, dit_block_linears

RESIDENT = "resident"
OPTIONS = ("fp8", "components", "blockwise")  # canonical order of a mode's name


@dataclass(frozen=True)
class MemoryMode:
    """A memory mode (module docstring); `MemoryMode.parse("fp8+blockwise")`."""

    fp8: bool = False
    components: bool = False
    blockwise: bool = False

    @classmethod
    def parse(cls, text: str | MemoryMode) -> MemoryMode:
        if isinstance(text, MemoryMode):
            return text
        name = str(text).strip().lower()
        if name == RESIDENT:
            return cls()
        parts = [p.strip() for p in name.split("+")]
        unknown = [p for p in parts if p not in OPTIONS]
        if not name or unknown or len(set(parts)) != len(parts):
            raise ConfigError(
                f"memory mode {text!r} is not valid: use {RESIDENT!r} or a '+'-joined combination of "
                f"{list(OPTIONS)} (for example 'fp8+blockwise')"
            )
        return cls(**{p: True for p in parts})

    @property
    def name(self) -> str:
        chosen = [f.name for f in fields(self) if getattr(self, f.name)]
        return "+".join(chosen) if chosen else RESIDENT

    @property
    def offloads(self) -> bool:
        """Some weights live in host memory."""
        return self.components or self.blockwise

    def __str__(self) -> str:
        return self.name


# Every combination, fewest options first: resident, fp8, components, blockwise, fp8+components, ...
MEMORY_MODES: tuple[str, ...] = tuple(
    MemoryMode(**dict.fromkeys(chosen, True)).name
    for size in range(len(OPTIONS) + 1)
    for chosen in itertools.combinations(OPTIONS, size)
)


@dataclass
class MemoryState:
    """What `apply_memory_mode` did: the streamer and the on-demand components (for reports)."""

    mode: MemoryMode
    device: torch.device
    streamer: BlockStreamer | None = None
    on_demand: list[OnDemand] = field(default_factory=list)
    fp8_layers: int = 0

    def host_bytes(self) -> int:
        """Bytes of weights kept in host memory."""
        streamed = self.streamer.host_bytes if self.streamer is not None else 0
        return streamed + sum(o.nbytes for o in self.on_demand)

    def offloaded_device_bytes(self) -> int:
        """Bytes the offloaded weights hold on the device now."""
        streamed = self.streamer.device_bytes() if self.streamer is not None else 0
        return streamed + sum(o.device_bytes() for o in self.on_demand)

    def close(self) -> None:
        """Make everything resident again (hooks removed)."""
        if self.streamer is not None:
            self.streamer.close()
        for wrapper in self.on_demand:
            wrapper.close()


def _is_fp8(dit: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in dit.modules())


def _convert_blocks_to_fp8(dit: nn.Module, device: torch.device, park: torch.device | None) -> int:
    """Quantise the blocks' linear layers on `device`, one block at a time (a block on the host is
    moved there first, so the device never holds more than one bf16 block), each block then moved to
    `park` if given (the host, for blockwise streaming). Returns the number of layers converted."""
    converted = 0
    for index, block in enumerate(dit.blocks):
        prefix = f"blocks.{index}."
        # A fused q/k/v concatenation of the bf16 layers would keep them alive after the conversion.
        drop_derived_caches(block)
        block.to(device)
        converted += len(
            convert_linears_to_fp8(block, lambda name, module, p=prefix: dit_block_linears(p + name, module))
        )
        if park is not None:
            block.to(park)
    return converted


def _to_device(modules: Iterable[nn.Module | None], device: torch.device) -> None:
    for module in modules:
        if module is not None:
            module.to(device)


def apply_memory_mode(
    target: Any, mode: str | MemoryMode, device: torch.device | str | None = None
) -> MemoryState:
    """Apply `mode` to the models of `target` (a `components.Components` or a `Sampler`: attributes
    `dit`, `vae`, `clip`, `portrait_encoder`, `tiny_vae`/`decoder`, `text_encoder`, `motion_encoder`,
    any of them None or absent). device: where the models run (default: the DiT's device).

    Call it before the first request and before `Sampler.from_components` reads the models; the
    modules are changed in place (weights moved, layers converted, hooks registered).
    """
    mode = MemoryMode.parse(mode)
    dit = getattr(target, "dit", None)
    if device is None:
        if dit is None:
            raise ValueError("apply_memory_mode needs a device when the target has no DiT")
        device = dit.device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    state = MemoryState(mode, device)
    if dit is not None:
        if mode.fp8 and not _is_fp8(dit):
            hosted = next(dit.blocks[0].parameters()).device.type == "cpu"
            park = torch.device("cpu") if mode.blockwise and hosted else None
            state.fp8_layers = _convert_blocks_to_fp8(dit, device, park)
        rest = [m for name, m in dit.named_children() if name != "blocks"]
        _to_device(rest, device)
        if mode.blockwise:
            state.streamer = BlockStreamer(dit.blocks, device)
        else:
            dit.blocks.to(device)
        _empty_cache(device)
    if mode.components:
        state.on_demand = component_offloads(target, device)
    else:
        text = getattr(target, "text_encoder", None)
        names = ("clip", "vae", "motion_encoder")
        _to_device([getattr(text, "encoder", None), *(getattr(target, n, None) for n in names)], device)
    vae = getattr(target, "vae", None)
    decoder = getattr(target, "decoder", None)  # the tiny VAE, or the Wan VAE in quality mode (done above)
    resident = [getattr(target, "portrait_encoder", None), getattr(target, "tiny_vae", None)]
    _to_device([*resident, None if decoder is vae else decoder], device)
    _empty_cache(device)
    return state


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Parts of `components.layout.PARTS` that a mode keeps in host memory when loading.
def hosted_parts(mode: str | MemoryMode) -> frozenset[str]:
    """Parts `load_components_for` reads into host memory for `mode` (the DiT for fp8 too: it is
    converted block by block on the device, so the bf16 DiT never sits there whole)."""
    mode = MemoryMode.parse(mode)
    parts: set[str] = set()
    if mode.fp8 or mode.blockwise:
        parts.add("dit")
    if mode.components:
        parts |= {"vae", "clip", "text_encoder", "motion_encoder"}
    return frozenset(parts)


def load_components_for(
    weights: str | Path | Any,
    *,
    memory: str | MemoryMode = RESIDENT,
    device: torch.device | str = "cpu",
    parts: Iterable[str] | None = None,
    **kwargs: Any,
) -> tuple[Any, MemoryState]:
    """`components.load_components` for a memory mode: the parts the mode hosts are read into host
    memory, the others straight onto `device`, then `apply_memory_mode`. Returns (components, state).
    kwargs: the other arguments of `load_components` (mode, dtype, config, ...)."""
    from flashportrait.components import ALL_PARTS, load_components

    memory = MemoryMode.parse(memory)
    wanted = tuple(ALL_PARTS if parts is None else parts)
    hosted = [p for p in wanted if p in hosted_parts(memory)]
    direct = [p for p in wanted if p not in hosted]
    device = torch.device(device)
    places = ((torch.device("cpu"), hosted), (device, direct))
    loaded = [
        load_components(weights, device=where, parts=group, **kwargs) for where, group in places if group
    ]
    components = loaded[0]
    for other in loaded[1:]:
        components = replace(
            components,
            **{f.name: getattr(other, f.name) for f in fields(other) if getattr(other, f.name) is not None},
        )
    return components, apply_memory_mode(components, memory, device)


__all__ = [
    "MEMORY_MODES",
    "OPTIONS",
    "RESIDENT",
    "MemoryMode",
    "MemoryState",
    "apply_memory_mode",
    "hosted_parts",
    "load_components_for",
]

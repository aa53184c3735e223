"""Memory modes: which weights stay on the device, which live in host memory (see `modes.py`).

    components, state = load_components_for(weights, memory="fp8+blockwise", device="cuda", mode="fast")
    sampler = Sampler.from_components(components)

or, on models already loaded: `apply_memory_mode(components_or_sampler, "components", device)`.
`hosted.py`: weights in host memory with zero-byte device storages between uses; `offload.py`: the
`components` option; `blockwise.py`: the `blockwise` option (streamed DiT blocks).
"""

from flashportrait.memory.blockwise import BlockStreamer
from flashportrait.memory.hosted import HostedTensors
from flashportrait.memory.modes import (
    MEMORY_MODES,
    OPTIONS,
    RESIDENT,
    MemoryMode,
    MemoryState,
    apply_memory_mode,
    hosted_parts,
    load_components_for,
)
from flashportrait.memory.offload import OnDemand, component_offloads

__all__ = [
    "MEMORY_MODES",
    "OPTIONS",
    "RESIDENT",
    "BlockStreamer",
    "HostedTensors",
    "MemoryMode",
    "MemoryState",
    "OnDemand",
    "apply_memory_mode",
    "component_offloads",
    "hosted_parts",
    "load_components_for",
]

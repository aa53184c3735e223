"""Components on the device only while they run: the `components` memory mode.

`OnDemand(owner, device, parts=..., methods=...)` hosts the weights of `parts` (default: the whole
`owner`) in pinned host memory (`hosted.HostedTensors`) and loads them around every call of the
entry points `methods` of `owner`: `forward` through forward pre/post hooks (the post hook runs even
when the call raises), any other method (`WanVAE.encode_moments`) through an instance attribute that
wraps the bound method. Calls nest (an entry point that calls another one loads once).

Which parts and entry points (`component_offloads`): the umT5 text encoder (`forward`), the CLIP
image tower (`forward`, which `encode` calls), the Wan VAE's encoder half (`encoder` + `conv1`, used
only by `encode_moments`; the decoder half stays resident because quality mode decodes every chunk
with it) and the PD-FGC motion encoder (`forward`). Each runs once per request (text, conditioning,
features) or once per batch of driving frames, so the host-to-device copy (about 11 GiB for umT5-XXL
in bf16, 1.2 GiB for CLIP at PCIe speed) is paid per request, not per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from flashportrait.memory.hosted import HostedTensors


class OnDemand:
    """Weights of `parts` loaded only while an entry point of `owner` runs (module docstring)."""

    def __init__(
        self,
        owner: nn.Module,
        device: torch.device | str,
        *,
        parts: Sequence[nn.Module] | None = None,
        methods: Sequence[str] = ("forward",),
        label: str | None = None,
    ) -> None:
        self.owner = owner
        self.label = label or type(owner).__name__
        self.hosted = HostedTensors(list(parts) if parts is not None else [owner], device)
        self.calls = 0  # loads done (a nested call does not load again)
        self._depth = 0
        self._handles: list[Any] = []
        self._wrapped: list[str] = []
        for name in methods:
            if name == "forward":
                self._handles.append(owner.register_forward_pre_hook(self._pre))
                self._handles.append(owner.register_forward_hook(self._post, always_call=True))
            else:
                setattr(owner, name, self._wrap(getattr(owner, name)))
                self._wrapped.append(name)

    def _wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self:
                return method(*args, **kwargs)

        return call

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.__enter__()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> OnDemand:
        if self._depth == 0:
            self.hosted.load()
            self.calls += 1
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.hosted.release()

    @property
    def nbytes(self) -> int:
        return self.hosted.nbytes

    def device_bytes(self) -> int:
        return self.hosted.device_bytes()

    def close(self) -> None:
        """Remove the hooks and wrappers and load the weights for good (resident again)."""
        for handle in self._handles:
            handle.remove()
        for name in self._wrapped:
            delattr(self.owner, name)
        self._handles, self._wrapped = [], []
        self.hosted.load()


def component_offloads(target: Any, device: torch.device | str) -> list[OnDemand]:
    """`OnDemand` wrappers for the offloadable components `target` has (a `Components` or a
    `Sampler`: attributes `text_encoder`, `clip`, `vae`, `motion_encoder`, each optional)."""
    out = []
    text = getattr(target, "text_encoder", None)
    if text is not None:
        # TextEncoder is the tokenizer + cache around the umT5 module.
        encoder = getattr(text, "encoder", text)
        out.append(OnDemand(encoder, device, label="text_encoder"))
    clip = getattr(target, "clip", None)
    if clip is not None:
        out.append(OnDemand(clip, device, label="clip"))
    vae = getattr(target, "vae", None)
    if vae is not None:
        vae.decoder.to(device)
        vae.conv2.to(device)
        out.append(
            OnDemand(
                vae, device, parts=[vae.encoder, vae.conv1], methods=("encode_moments",), label="vae_encoder"
            )
        )
    motion = getattr(target, "motion_encoder", None)
    if motion is not None:
        out.append(OnDemand(motion, device, label="motion_encoder"))
    return out


__all__ = ["OnDemand", "component_offloads"]

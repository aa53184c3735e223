"""The per-request generation parameters, validated, and how they resolve to a scheduler and guidance.

Defaults are the reference scripts' (REFERENCE.md 1.1, 1.4) except `max_size`: fast_infer.py resizes
the reference image to 720 on its longer side; we default to 512, the size the serving benchmarks use
(a 512x512 window of 51 latent frames is already 52,224 DiT tokens); 720 is one parameter away.

Modes (`mode`): "fast" = the step-distilled DiT (LoRA merged at load time), the 4-step StepDistill
schedule and the tiny VAE decoder; "quality" = the plain DiT, 30-step flow-matching Euler and the Wan
VAE decoder (infer.py). Which DiT and decoder are loaded is a deployment choice
(`flashportrait.components`); a request may only ask for the mode its sampler was loaded in.

`alp` switches on the paper's Adaptive Latent Prediction (`alp.py`) for one request: the DiT runs every
`alp_interval` steps after `alp_order` + 1 warm-up steps and the other steps are forecast. It is for
many-step schedules (the quality mode's 30 Euler steps); with the fast mode's 4 distilled steps there
is nothing to skip and the request is refused.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flashportrait.sampling.alp import MAX_ORDER as MAX_ALP_ORDER
from flashportrait.sampling.alp import ALPConfig
from flashportrait.sampling.guidance import GuidanceConfig
from flashportrait.sampling.schedulers import KINDS, SchedulerConfig

MODES = ("fast", "quality")
# What each mode samples with when the request does not say (fast_infer.py / infer.py).
MODE_SCHEDULERS = {"fast": "step_distill", "quality": "euler"}
DEFAULT_STEPS = {"step_distill": 4, "euler": 30, "unipc": 30, "dpmpp": 30}
STEP_DISTILL_STEPS = 4  # the length of StepDistill's fixed denoising_step_list
# The reference script's prompt; its (long, Chinese) negative prompt only matters when
# text_cfg_scale != 1, which the defaults do not use, so our default negative prompt is empty.
DEFAULT_PROMPT = "The girl is singing"
DEFAULT_NEGATIVE_PROMPT = ""

MAX_STEPS = 100
MAX_CFG_SCALE = 20.0
MAX_IP_SCALE = 5.0
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1280
MIN_CONTEXT, MAX_CONTEXT = 2, 81  # latent frames per window (the reference: 51 = 201 video frames)
MAX_SHIFT = 20.0
MAX_SEED = 2**63 - 1


class GenerationError(ValueError):
    """A request the user can fix (a bad parameter or input); the message says what and how."""


@dataclass(frozen=True)
class GenerationParams:
    """One request's sampling parameters (see the module docstring for the modes).

    mode: "fast" or "quality"; None = the sampler's own mode.
    scheduler: "step_distill", "euler", "unipc" or "dpmpp"; None = the mode's (step_distill / euler).
    steps: denoising steps; None = the scheduler's default (4 for step_distill, which only runs 4; 30
        for the others).
    emo_cfg_scale, text_cfg_scale, ip_scale: guidance (`guidance.py`); the reference's 4, 1, 1.
    seed: initial noise, drawn per latent frame from (seed, frame) (`sampler.frame_noise`).
    max_size: longer side of the reference image after resizing (then rounded up to 16).
    context_size, context_overlap: window and overlap in latent frames (the reference's 51 and 30).
    shift: the flow-matching time shift (5).
    alp: Adaptive Latent Prediction on (many-step schedules only; see the module docstring);
    alp_interval: K, DiT passes every K steps after the warm-up (1 = every step, the full computation);
    alp_order: n, the highest Taylor order (0..3), also n + 1 warm-up passes. Ignored when alp is off.
    """

    mode: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    emo_cfg_scale: float = 4.0
    text_cfg_scale: float = 1.0
    ip_scale: float = 1.0
    seed: int = 42
    max_size: int = 512
    context_size: int = 51
    context_overlap: int = 30
    shift: float = 5.0
    alp: bool = False
    alp_interval: int = 5
    alp_order: int = 3

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise GenerationError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.scheduler is not None and self.scheduler not in KINDS:
            raise GenerationError(f"scheduler must be one of {list(KINDS)}, got {self.scheduler!r}")
        if self.steps is not None:
            _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_float("emo_cfg_scale", self.emo_cfg_scale, 0.0, MAX_CFG_SCALE)
        _check_float("text_cfg_scale", self.text_cfg_scale, 0.0, MAX_CFG_SCALE)
        _check_float("ip_scale", self.ip_scale, 0.0, MAX_IP_SCALE)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("max_size", self.max_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        _check_int("context_size", self.context_size, MIN_CONTEXT, MAX_CONTEXT)
        _check_int("context_overlap", self.context_overlap, 0, self.context_size - 1)
        if self.context_overlap == 1:
            # The blend ramp j/(L-1) of an overlap of one frame divides by zero (quirk 3).
            raise GenerationError("context_overlap 1 is not allowed (the blend ramp needs 0 or >= 2 frames)")
        _check_float("shift", self.shift, 0.0, MAX_SHIFT)
        if self.shift == 0:
            raise GenerationError("shift must be positive")
        if not isinstance(self.alp, bool):
            raise GenerationError(f"alp must be true or false, got {self.alp!r}")
        _check_int("alp_interval", self.alp_interval, 1, MAX_STEPS)
        _check_int("alp_order", self.alp_order, 0, MAX_ALP_ORDER)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GenerationParams:
        """From loosely typed values (Triton request parameters, JSON, CLI): strings are parsed by the
        field's type, "" and None mean the default for optional fields; unknown names are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise GenerationError(f"unknown generation parameter(s) {unknown}; known: {sorted(fields)}")
        parsed = {name: _parse(name, value, hints[name]) for name, value in values.items()}
        return cls(**{k: v for k, v in parsed.items() if v is not _DEFAULT})

    def resolved_mode(self, sampler_mode: str) -> str:
        mode = self.mode or sampler_mode
        if mode != sampler_mode:
            raise GenerationError(
                f"this sampler was loaded in {sampler_mode!r} mode and cannot run a {mode!r} request"
            )
        return mode

    def scheduler_config(self, sampler_mode: str) -> SchedulerConfig:
        """The scheduler this request samples with on a sampler loaded in `sampler_mode`."""
        kind = self.scheduler or MODE_SCHEDULERS[self.resolved_mode(sampler_mode)]
        steps = DEFAULT_STEPS[kind] if self.steps is None else self.steps
        if kind == "step_distill" and steps != STEP_DISTILL_STEPS:
            raise GenerationError(
                f"the step_distill scheduler (fast mode) runs exactly {STEP_DISTILL_STEPS} steps, got "
                f"steps={steps}; use scheduler 'euler' for another step count"
            )
        return SchedulerConfig(kind=kind, num_steps=steps, shift=float(self.shift))

    def alp_config(self, sampler_mode: str) -> ALPConfig | None:
        """The request's Adaptive Latent Prediction, or None when it is off."""
        if not self.alp:
            return None
        kind = self.scheduler_config(sampler_mode).kind
        if kind == "step_distill":
            raise GenerationError(
                "alp (Adaptive Latent Prediction) is for many-step sampling (quality mode, 30 Euler "
                f"steps); the fast mode's {STEP_DISTILL_STEPS} distilled steps have no steps to skip"
            )
        return ALPConfig(interval=self.alp_interval, order=self.alp_order)

    def guidance(self) -> GuidanceConfig:
        return GuidanceConfig(float(self.emo_cfg_scale), float(self.text_cfg_scale), float(self.ip_scale))


_DEFAULT = object()


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise GenerationError(f"{name} must be between {low} and {high}, got {value}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenerationError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise GenerationError(f"{name} must be between {low:g} and {high:g}, got {value}")


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse(name: str, value: Any, hint: Any) -> Any:
    """`value` converted to the field type `hint` (bool, int, float, str, or X | None)."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if optional:
            return None
        return _DEFAULT
    if base is str:
        return str(value)
    if base is bool:
        return _parse_bool(name, value)
    if isinstance(value, bool):
        raise GenerationError(f"{name} must be a number, got {value!r}")
    try:
        if base is int:
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    value = float(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if base is int else "a number"
        raise GenerationError(f"{name} must be {kind}, got {value!r}") from None


def _parse_bool(name: str, value: Any) -> bool:
    """True/False, 1/0, or the strings true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise GenerationError(f"{name} must be true or false, got {value!r}")

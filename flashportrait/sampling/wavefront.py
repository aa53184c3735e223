"""The reference's windowed denoising, computed in dependency (wavefront) order and streamed.

The reference loop (`stepmajor.py`, REFERENCE.md 2.7) runs every window at step 0, then every window at
step 1, and so on. Unit (w, s) = window w at step s. Reading that loop, (w, s) touches exactly:

- reads: `latents[:, :, window w]` as they are at the START of step s, i.e. the latents after step s-1
  of each frame f of w, whose value is the one written last at step s-1: by the last window covering f.
  Windows are contiguous with increasing starts, so the last writer over all of w's frames is
  R(w) = the last window starting before w ends; every window <= R(w) wrote before it at step s-1.
- reads (s > 0, w > 0): `pred_latents` of step s over the frames w shares with w-1, which is what
  (w-1, s) wrote there (w-1 is the last window before w covering those frames).
- writes: step-s latents of w's frames, after (w-1, s) wrote them (at step 0 the later window simply
  overwrites, so the order of writers within a step matters too).

Hence (w, s) may run exactly when (w-1, s) is done and (R(w), s-1) is done (then all windows
overlapping w have finished step s-1). Equivalently: w is the next window of step s, and the latents
after step s-1 are complete for every frame of w. Both conditions are necessary (the values of those
very units are read) and sufficient (nothing else is read or overwritten); tests/sampling check the read
set against a provenance-tracking run of the reference loop, and the results bit for bit against it.

Frame f of the latents after step s is complete once every window covering f has done step s: frames
[0, start of the next window still to run at step s). Each step keeps only frames written and still
needed by step s+1; after the last step, complete frames are FINAL and are handed out at once, in order.

Order: among the ready units the one with the deepest step runs first. Until the first final frame this
runs exactly the dependency closure of (0, last step), so the work before the first output, and the live
latents at any time, depend on the window size, overlap and step count but not on the video length.

Deviations from the reference, on purpose (golden README "Reproduce, or deviate on purpose"):
- latents stay float32 (`BlendCast.NONE`); `BlendCast.BF16_ROUNDTRIP` reproduces the reference's
  `.to(bfloat16)` of blended windows (w > 0, s > 0), which crashes the unmodified reference in float32;
- solver state is per window; the reference's single scheduler object leaks multistep history from
  window to window in step-major order (quirk 5), which no streaming order can reproduce.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flashportrait.sampling.windows import WindowPlan


class BlendCast(enum.Enum):
    """What happens to a blended window result before it is stored."""

    NONE = "none"  # float32 throughout (ours; golden outputs `*_no_bf16_cast`)
    BF16_ROUNDTRIP = "bf16_roundtrip"  # round to bfloat16 and back, as the reference (golden `latents`)


class SchedulerLike(Protocol):
    """A solver with explicit state, one state per window (`flashportrait.sampling.schedulers`)."""

    @property
    def timesteps(self) -> Sequence[float] | torch.Tensor: ...

    def init_state(self) -> Any: ...

    def step(
        self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, Any]: ...


# (window index, step index, latents of the window [B, 16, C, h, w] float32) -> guided model prediction
# [B, 16, C, h, w] float32.
Denoiser = Callable[[int, int, torch.Tensor], torch.Tensor]
# The initial noise: the whole [B, 16, F, h, w] float32 tensor, or (frame_start, frame_stop) -> that slice.
InitialLatents = torch.Tensor | Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class FinalLatents:
    """Latent frames [frame_start, frame_stop) that no remaining work can change, in order."""

    frame_start: int
    frame_stop: int
    latents: torch.Tensor  # [B, 16, frame_stop - frame_start, h, w] float32


@dataclass(frozen=True)
class StepLatents:
    """Latents after `step` of frames [frame_start, frame_stop), once complete (only when requested)."""

    step: int
    frame_start: int
    frame_stop: int
    latents: torch.Tensor  # [B, 16, frame_stop - frame_start, h, w] float32


@dataclass(frozen=True)
class Progress:
    """Emitted after every unit of work (window `window` at step `step`)."""

    units_done: int
    units_total: int
    window: int
    step: int
    live_frames: int  # latent frames held between units (all steps' buffers and the noise)


class SamplingCancelled(Exception):
    """The cancellation check returned True; raised between two units of work."""


class WavefrontSchedule:
    """The integer bookkeeping of the wavefront: readiness, completeness, release; no tensors."""

    def __init__(self, starts: Sequence[int], context_size: int, num_steps: int) -> None:
        if not starts or any(b <= a for a, b in itertools.pairwise(starts)) or starts[0] != 0:
            raise ValueError(f"window starts {list(starts)} must begin at 0 and increase strictly")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.starts = tuple(starts)
        self.context_size = context_size
        self.num_steps = num_steps
        self.num_windows = len(starts)
        self.length = starts[-1] + context_size
        # R(w): the last window starting before window w ends (the last writer of w's last frame).
        self.reach = tuple(bisect.bisect_left(self.starts, s + context_size) - 1 for s in self.starts)
        self.done = [0] * num_steps  # windows finished per step (always a prefix, in order)
        self.noise_loaded = 0  # initial-noise frames fetched so far

    @property
    def units_total(self) -> int:
        return self.num_windows * self.num_steps

    @property
    def units_done(self) -> int:
        return sum(self.done)

    def complete(self, step: int) -> int:
        """Frames [0, n) of the latents after `step` are complete (step -1: the initial noise)."""
        if step < 0:
            return self.length
        done = self.done[step]
        return self.length if done == self.num_windows else self.starts[done]

    def released(self, step: int) -> int:
        """Frames [0, n) of the latents after `step` are no longer held: every window of step+1 has
        read them, or, after the last step, they were handed out as final."""
        return self.complete(step + 1 if step + 1 < self.num_steps else step)

    def ready(self, window: int, step: int) -> bool:
        if window != self.done[step] or window >= self.num_windows:
            return False
        return step == 0 or self.complete(step - 1) >= self.starts[window] + self.context_size

    def next_unit(self) -> tuple[int, int] | None:
        """The ready unit with the deepest step, or None when all work is done."""
        for step in reversed(range(self.num_steps)):
            if self.ready(self.done[step], step):
                return self.done[step], step
        if self.units_done != self.units_total:
            raise AssertionError(f"no ready unit but work remains: {self.done}")
        return None

    def finish(self, window: int, step: int) -> None:
        if not self.ready(window, step):
            raise AssertionError(f"unit (window {window}, step {step}) is not ready")
        if step == 0:
            self.noise_loaded = max(self.noise_loaded, self.starts[window] + self.context_size)
        self.done[step] += 1

    def live_frames(self) -> int:
        """Latent frames held between units: the noise and each step's written, unreleased frames."""
        live = max(0, self.noise_loaded - self.complete(0))
        for step in range(self.num_steps):
            done = self.done[step]
            written = self.starts[done - 1] + self.context_size if done else 0
            live += max(0, written - self.released(step))
        return live


def wavefront_order(starts: Sequence[int], context_size: int, num_steps: int) -> list[tuple[int, int]]:
    """The (window, step) units in the order the executor runs them (deterministic)."""
    schedule = WavefrontSchedule(starts, context_size, num_steps)
    order = []
    while (unit := schedule.next_unit()) is not None:
        schedule.finish(*unit)
        order.append(unit)
    return order


def run_wavefront(
    plan: WindowPlan,
    denoiser: Denoiser,
    scheduler: SchedulerLike,
    initial_latents: InitialLatents,
    *,
    blend_cast: BlendCast = BlendCast.NONE,
    should_cancel: Callable[[], bool] | None = None,
    emit_steps: bool = False,
) -> Iterator[FinalLatents | StepLatents | Progress]:
    """Denoise `plan`'s latent video in wavefront order, yielding final latents as soon as they exist.

    Yields, after each unit of work: `StepLatents` for frames that became complete at that unit's step
    (only with `emit_steps`), `FinalLatents` for frames that became final (in order, covering
    [0, plan.latent_length) exactly once; the short-video extension is never output), then `Progress`.
    `should_cancel` is called before every unit; when it returns True, `SamplingCancelled` is raised.
    The values equal `denoise_step_major(plan.windows(), ...)` bit for bit.
    """
    num_steps = len(scheduler.timesteps)
    context = plan.context_size
    schedule = WavefrontSchedule(plan.starts, context, num_steps)
    output_length = plan.latent_length
    noise = _NoiseSource(initial_latents, schedule.length)
    # buffers[s + 1]: latents after step s (buffers[0]: initial noise), one [B, 16, 1, h, w] per frame.
    buffers: list[dict[int, torch.Tensor]] = [{} for _ in range(num_steps + 1)]
    states: dict[int, Any] = {}
    emitted = [0] * num_steps  # frames already handed out per step (StepLatents; FinalLatents at last)

    while (unit := schedule.next_unit()) is not None:
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled(f"cancelled after {schedule.units_done} of {schedule.units_total} units")
        w, s = unit
        start = plan.starts[w]
        stop = start + context
        if s == 0:
            for frame, latent in noise.fetch(schedule.noise_loaded, stop):
                buffers[0][frame] = latent
            states[w] = scheduler.init_state()
        source, target = buffers[s], buffers[s + 1]
        x = torch.cat([source[f] for f in range(start, stop)], dim=2)
        out, states[w] = scheduler.step(denoiser(w, s, x), s, x, states[w])
        if w > 0 and s > 0:
            overlap = plan.overlaps[w]
            if overlap:
                weight = (
                    plan.blend_weights(w).to(device=out.device, dtype=out.dtype).view(1, 1, overlap, 1, 1)
                )
                # What window w-1 wrote at this step over the shared frames (the first `overlap` of w).
                written = torch.cat([target[f] for f in range(start, start + overlap)], dim=2)
                out[:, :, :overlap] = out[:, :, :overlap] * weight + written * (1 - weight)
            if blend_cast is BlendCast.BF16_ROUNDTRIP:
                out = out.to(torch.bfloat16).to(torch.float32)
        for position, frame in enumerate(range(start, stop)):
            target[frame] = out[:, :, position : position + 1].clone()
        del x, out
        if s == num_steps - 1:
            del states[w]
        schedule.finish(w, s)

        complete = min(schedule.complete(s), output_length)
        if complete > emitted[s]:
            chunk = torch.cat([target[f] for f in range(emitted[s], complete)], dim=2)
            if emit_steps:
                yield StepLatents(s, emitted[s], complete, chunk)
            if s == num_steps - 1:
                yield FinalLatents(emitted[s], complete, chunk)
            emitted[s] = complete
        # Release what no remaining unit reads: the inputs of step s that all of step s has read, and
        # the final frames just handed out.
        _drop_below(buffers[s], schedule.complete(s))
        if s == num_steps - 1:
            _drop_below(target, schedule.complete(s))
        yield Progress(schedule.units_done, schedule.units_total, w, s, sum(len(b) for b in buffers))


class _NoiseSource:
    """Initial latents fetched frame by frame as step 0 first needs them."""

    def __init__(self, initial: InitialLatents, length: int) -> None:
        if isinstance(initial, torch.Tensor) and initial.shape[2] != length:
            raise ValueError(f"initial latents have {initial.shape[2]} frames, the plan generates {length}")
        self.initial = initial

    def fetch(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        if stop <= start:
            return
        if isinstance(self.initial, torch.Tensor):
            block = self.initial[:, :, start:stop]
        else:
            block = self.initial(start, stop)
            if block.shape[2] != stop - start:
                raise ValueError(f"initial latents for frames [{start}, {stop}) have {block.shape[2]} frames")
        for offset in range(stop - start):
            yield start + offset, block[:, :, offset : offset + 1].to(torch.float32).clone()


def _drop_below(buffer: dict[int, torch.Tensor], frame: int) -> None:
    for key in [k for k in buffer if k < frame]:
        del buffer[key]

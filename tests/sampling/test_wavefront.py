"""The wavefront executor computes the reference loop's numbers, streams early, and stays bounded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flashportrait.golden import GoldenCase
from flashportrait.sampling.guidance import GuidanceConfig, combine_guidance, guidance_passes
from flashportrait.sampling.schedulers import SchedulerConfig, build_scheduler
from flashportrait.sampling.stepmajor import denoise_step_major
from flashportrait.sampling.wavefront import (
    BlendCast,
    FinalLatents,
    Progress,
    SamplingCancelled,
    StepLatents,
    WavefrontSchedule,
    run_wavefront,
    wavefront_order,
)
from flashportrait.sampling.windows import frame_counts, plan_windows


class EulerFlow:
    """A plain flow-matching Euler step on a linear sigma grid (memoryless)."""

    def __init__(self, num_steps: int) -> None:
        self.sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
        self.timesteps = self.sigmas[:-1] * 1000

    def init_state(self):
        return None

    def step(self, model_output, step_index, sample, state):
        return sample + (self.sigmas[step_index + 1] - self.sigmas[step_index]) * model_output, state


class FakeMultistep(EulerFlow):
    """A second-order multistep solver whose state (the previous output) must be the window's own."""

    def init_state(self):
        return (None, 0)

    def step(self, model_output, step_index, sample, state):
        previous, expected_step = state
        assert step_index == expected_step, "solver state used out of order (shared between windows?)"
        slope = model_output if previous is None else 1.5 * model_output - 0.5 * previous
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return sample + dt * slope, (model_output, step_index + 1)


def fake_denoiser(window: int, step: int, x: torch.Tensor) -> torch.Tensor:
    """Depends on the window, the step and every frame of the window (like attention)."""
    mix = x.mean(dim=2, keepdim=True)
    return torch.tanh(x * (0.6 + 0.1 * (window % 4)) - 0.5 * mix + 0.05 * step) + 0.01 * x.roll(1, dims=2)


def _noise(frames: int, seed: int = 0, hw: int = 2) -> torch.Tensor:
    return torch.randn(1, 16, frames, hw, hw, generator=torch.Generator().manual_seed(seed))


def _stream(plan, scheduler, noise, **kwargs):
    finals, steps, progress = [], [], []
    for event in run_wavefront(plan, fake_denoiser, scheduler, noise, **kwargs):
        if isinstance(event, FinalLatents):
            finals.append(event)
        elif isinstance(event, StepLatents):
            steps.append(event)
        else:
            progress.append(event)
    return finals, steps, progress


def _concat(finals) -> torch.Tensor:
    position = 0
    for chunk in finals:
        assert chunk.frame_start == position and chunk.frame_stop > position
        assert chunk.latents.shape[2] == chunk.frame_stop - chunk.frame_start
        position = chunk.frame_stop
    return torch.cat([chunk.latents for chunk in finals], dim=2)


def _plan_or_skip(n, context, overlap):
    try:
        return plan_windows(n, context, overlap)
    except ValueError:
        assume(False)


@settings(max_examples=200, deadline=None)
@given(
    context=st.integers(2, 12),
    overlap_frac=st.floats(0, 0.9),
    n=st.integers(2, 70),
    num_steps=st.integers(1, 5),
    multistep=st.booleans(),
    bf16=st.booleans(),
)
def test_wavefront_equals_step_major_bit_for_bit(context, overlap_frac, n, num_steps, multistep, bf16):
    plan = _plan_or_skip(n, context, min(context - 1, int(context * overlap_frac)))
    solver = FakeMultistep if multistep else EulerFlow
    cast = BlendCast.BF16_ROUNDTRIP if bf16 else BlendCast.NONE
    noise = _noise(plan.generated_length)
    per_step = {}
    expected = denoise_step_major(
        plan.windows(), fake_denoiser, solver(num_steps), noise, blend_cast=cast, on_step=per_step.__setitem__
    )
    finals, steps, progress = _stream(plan, solver(num_steps), noise, blend_cast=cast, emit_steps=True)

    assert torch.equal(_concat(finals), expected[:, :, : plan.latent_length])
    for step in range(num_steps):  # latents after every step, reassembled from the stream
        chunks = [e for e in steps if e.step == step]
        assert torch.equal(_concat(chunks), per_step[step][:, :, : plan.latent_length])
    # Deterministic order, and the executor holds exactly what the schedule says it needs.
    assert [(p.window, p.step) for p in progress] == wavefront_order(plan.starts, context, num_steps)
    schedule = WavefrontSchedule(plan.starts, context, num_steps)
    for event in progress:
        schedule.finish(event.window, event.step)
        assert event.live_frames == schedule.live_frames()
    assert progress[-1].units_done == progress[-1].units_total == plan.num_windows * num_steps


@pytest.mark.parametrize("kind", ["euler", "step_distill", "unipc", "dpmpp"])
def test_with_the_real_schedulers(kind):
    plan = plan_windows(40, 7, 3)
    scheduler = build_scheduler(SchedulerConfig(kind=kind, num_steps=5))
    noise = _noise(plan.generated_length, seed=3)
    expected = denoise_step_major(plan.windows(), fake_denoiser, scheduler, noise)
    finals, _, _ = _stream(plan, scheduler, noise)
    assert torch.isfinite(expected).all()
    assert torch.equal(_concat(finals), expected)


def reference_reads(windows, num_steps):
    """Run the reference loop on writer tags: for every unit (w, s), the units whose writes it reads."""
    length = max(max(window) for window in windows) + 1
    latents = [None] * length  # the unit that wrote each frame's latents before this step
    reads = {}
    for step in range(num_steps):
        pred = [None] * length
        for w, window in enumerate(windows):
            read = {latents[f] for f in window} - {None}  # x = latents[:, :, window]
            if w > 0 and step > 0:  # the blend reads pred_latents over the overlap with w-1
                prev = windows[w - 1]
                overlap = len(set(window) & set(prev))
                read |= {pred[f] for f in prev[len(prev) - overlap :]}
            reads[w, step] = read
            for f in window:
                pred[f] = (w, step)
        latents = pred
    return reads


@settings(max_examples=150, deadline=None)
@given(
    context=st.integers(2, 20),
    overlap_frac=st.floats(0, 0.95),
    n=st.integers(2, 120),
    num_steps=st.integers(1, 4),
    data=st.data(),
)
def test_dependency_rule_is_exactly_what_the_reference_reads(context, overlap_frac, n, num_steps, data):
    plan = _plan_or_skip(n, context, min(context - 1, int(context * overlap_frac)))
    windows = plan.windows()
    reads = reference_reads(windows, num_steps)
    schedule = WavefrontSchedule(plan.starts, context, num_steps)
    for (w, s), read in reads.items():
        previous_step = {k for k, step in read if step == s - 1}
        same_step = {k for k, step in read if step == s}
        assert {step for _, step in read} <= {s - 1, s}
        # (R(w), s-1) is read itself, and every other unit read at s-1 precedes it in step s-1.
        assert max(previous_step, default=None) == (schedule.reach[w] if s > 0 else None)
        # The blend reads exactly what window w-1 wrote at this step.
        assert same_step == ({w - 1} if w > 0 and s > 0 and plan.overlaps[w] > 0 else set())
    # Readiness is "the next window of its step (writes in window order) and every unit it reads done",
    # for arbitrary progress states.
    for _ in range(20):
        done = data.draw(st.lists(st.integers(0, plan.num_windows), min_size=num_steps, max_size=num_steps))
        schedule.done = list(done)
        for (w, s), read in reads.items():
            satisfied = w == done[s] and all(done[step] > k for k, step in read)
            assert schedule.ready(w, s) == satisfied


def _first_final_units(plan, num_steps):
    order = wavefront_order(plan.starts, plan.context_size, num_steps)
    return order.index((0, num_steps - 1)) + 1


def _peak_live(plan, num_steps):
    schedule = WavefrontSchedule(plan.starts, plan.context_size, num_steps)
    peak = 0
    while (unit := schedule.next_unit()) is not None:
        schedule.finish(*unit)
        peak = max(peak, schedule.live_frames())
    return peak


def _closure_size(reads, unit):
    """Units that must run before `unit` completes: what it reads, and earlier windows of its step."""
    seen, todo = set(), [unit]
    while todo:
        w, s = todo.pop()
        if (w, s) in seen:
            continue
        seen.add((w, s))
        todo.extend(reads[w, s])
        if w > 0:
            todo.append((w - 1, s))
    return len(seen)


@settings(max_examples=25, deadline=None)
@given(context=st.integers(3, 30), overlap_frac=st.floats(0.1, 0.9), num_steps=st.integers(1, 6))
def test_first_final_frame_and_live_memory_do_not_grow_with_length(context, overlap_frac, num_steps):
    overlap = max(2, min(context - 1, int(context * overlap_frac)))
    long_n = 10 * context  # past the wavefront's depth (about num_steps windows' reach)
    long_plan = _plan_or_skip(long_n, context, overlap)
    first = _first_final_units(long_plan, num_steps)
    # Until the first final frame only its dependency closure runs: the least work possible.
    assert first == _closure_size(reference_reads(long_plan.windows(), num_steps), (0, num_steps - 1))
    peak = _peak_live(long_plan, num_steps)
    # The replaced last window's larger overlap can hold up to C more frames per step buffer at the end.
    slack = (num_steps + 1) * context
    for n in (long_n + 1, long_n + context // 2 + 3, 3 * long_n + 7):
        plan = _plan_or_skip(n, context, overlap)
        assert _first_final_units(plan, num_steps) == first
        assert _peak_live(plan, num_steps) <= peak + slack
    for n in range(context, long_n, max(1, long_n // 8)):
        # Shorter videos: the replaced last window can join the closure, one more unit per step.
        plan = _plan_or_skip(n, context, overlap)
        assert _first_final_units(plan, num_steps) <= first + num_steps
        assert _peak_live(plan, num_steps) <= peak + slack


def test_cancellation_stops_between_units():
    plan = plan_windows(40, 7, 3)
    calls = []

    def denoiser(window, step, x):
        calls.append((window, step))
        return fake_denoiser(window, step, x)

    events = []
    with pytest.raises(SamplingCancelled):
        for event in run_wavefront(
            plan, denoiser, EulerFlow(4), _noise(40), should_cancel=lambda: len(calls) == 9
        ):
            events.append(event)
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(calls) == 9 and len(progress) == 9  # the 9th unit completed, the 10th never started
    assert calls == wavefront_order(plan.starts, 7, 4)[:9]


def test_noise_is_fetched_once_in_order_and_final_chunks_come_early():
    plan = plan_windows(60, 7, 3)
    noise = _noise(60)
    requests = []

    def initial(start, stop):
        requests.append((start, stop))
        return noise[:, :, start:stop]

    finals, _, _ = _stream(plan, EulerFlow(4), initial)
    fetched = [f for start, stop in requests for f in range(start, stop)]
    assert fetched == list(range(60))
    assert torch.equal(
        _concat(finals), denoise_step_major(plan.windows(), fake_denoiser, EulerFlow(4), noise)
    )
    assert len(finals) == plan.num_windows  # one chunk per window at the last step
    assert finals[0].frame_stop == plan.starts[1]  # frames only window 0 writes


def test_short_video_streams_only_its_frames():
    plan = plan_windows(3, 7, 3)  # one window over 7 frames, 3 output
    noise = _noise(7)
    finals, _, _ = _stream(plan, FakeMultistep(3), noise)
    expected = denoise_step_major(plan.windows(), fake_denoiser, FakeMultistep(3), noise)
    assert [(c.frame_start, c.frame_stop) for c in finals] == [(0, 3)]
    assert torch.equal(finals[0].latents, expected[:, :, :3])
    with pytest.raises(ValueError, match="frames"):
        list(run_wavefront(plan, fake_denoiser, EulerFlow(3), _noise(3)))


def _stream_stats(num_video_frames, num_steps=4):
    """Stream a video with the tiny pipeline's windows (C=7, O=3) and per-frame noise."""
    plan = plan_windows(frame_counts(num_video_frames).latent_length, 7, 3)

    def noise(start, stop):
        frames = [_noise(1, seed=f, hw=8) for f in range(start, stop)]
        return torch.cat(frames, dim=2)

    first_final, peak, position, checksum = None, 0, 0, 0.0
    for event in run_wavefront(plan, fake_denoiser, EulerFlow(num_steps), noise):
        if isinstance(event, FinalLatents):
            assert event.frame_start == position
            position = event.frame_stop
            checksum += float(event.latents.double().sum())
        else:
            peak = max(peak, event.live_frames)
            if first_final is None and position:
                first_final = event.units_done
    assert position == plan.latent_length
    return plan, first_final, peak, checksum


def test_ten_minute_video_streams_like_a_twenty_second_one():
    long_plan, long_first, long_peak, _ = _stream_stats(15_000)  # 10 min at 25 fps
    short_plan, short_first, short_peak, _ = _stream_stats(500)  # 20 s
    assert (long_plan.latent_length, short_plan.latent_length) == (3750, 125)
    assert long_first == short_first  # same work before the first chunk
    assert long_peak <= short_peak * 1.03  # live latents within a few percent


@pytest.mark.parametrize("streamed", [True, False])
def test_replaying_the_golden_transformer_outputs_reproduces_every_step(golden_dir, streamed):
    """pipeline_tiny run_i: with the recorded DiT outputs standing in for the model, our windows,
    guidance, StepDistill steps and blends give the reference's latents after every step exactly, and
    every window is fed exactly the latents the reference fed it."""
    case = GoldenCase.load(golden_dir / "pipeline_tiny.json")
    run, config = case.call["runs"]["run_i"], case.config
    plan = plan_windows(config["latent_length"], config["context_size"], config["context_overlap"])
    assert plan.windows() == run["windows_used"]
    outputs = case.tensor("debug/run_i/transformer_output")  # [step, window, pass, 1, 16, C, h, w]
    guidance = GuidanceConfig(run["emo_cfg_scale"], run["text_cfg_scale"], case.call["common"]["ip_scale"])
    assert len(guidance_passes(guidance)) == outputs.shape[2] == run["num_transformer_passes_per_window_step"]
    noise = case.tensor("input/noise_latents")
    num_steps = outputs.shape[0]
    after = [case.tensor(f"output/run_i/latents_after_step_{s}_no_bf16_cast") for s in range(num_steps)]

    def replay(window, step, x):
        fed = noise if step == 0 else after[step - 1]
        assert torch.equal(x, fed[:, :, list(plan.window(window))])
        return combine_guidance(guidance, list(outputs[step, window]))

    scheduler = build_scheduler(SchedulerConfig(kind=run["scheduler"]))
    if streamed:
        steps: dict[int, list[StepLatents]] = {}
        for event in run_wavefront(plan, replay, scheduler, noise, emit_steps=True):
            if isinstance(event, StepLatents):
                steps.setdefault(event.step, []).append(event)
        ours = [_concat(steps[s]) for s in range(len(after))]
    else:
        ours = []
        denoise_step_major(plan.windows(), replay, scheduler, noise, on_step=lambda s, x: ours.append(x))
    for step, expected in enumerate(after):
        assert torch.equal(ours[step], expected), f"step {step}"

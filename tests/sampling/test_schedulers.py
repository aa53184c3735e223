"""Scheduler properties: exactness on straight flows, schedules, and per-window multistep state."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashportrait.config import ConfigError, from_mapping
from flashportrait.sampling.schedulers import (
    FlowDPMPPScheduler,
    FlowMatchEulerScheduler,
    FlowUniPCScheduler,
    MultistepState,
    SchedulerConfig,
    StepDistillScheduler,
    build_scheduler,
)

ALL_KINDS = ("euler", "step_distill", "unipc", "dpmpp")


def _straight_flow(seed: int = 0, shape=(1, 3, 2, 4, 4)):
    """x(sigma) = (1 - sigma) x0 + sigma n, whose velocity n - x0 is the same at every sigma."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x0, noise, (lambda sigma: (1 - sigma) * x0 + sigma * noise)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(ALL_KINDS), steps=st.integers(1, 40), shift=st.floats(1.0, 8.0))
def test_every_scheduler_is_exact_on_a_straight_flow(kind, steps, shift):
    """With a constant velocity every solver (any order) must land on the path at each sigma."""
    scheduler = build_scheduler(SchedulerConfig(kind=kind, num_steps=steps, shift=shift))
    x0, noise, path = _straight_flow()
    x = path(scheduler.sigmas[0])
    state = scheduler.init_state()
    for k in range(scheduler.num_steps):
        x, state = scheduler.step(noise - x0, k, x, state)
        torch.testing.assert_close(x, path(scheduler.sigmas[k + 1]), rtol=0, atol=2e-5)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


def test_euler_step_is_the_explicit_formula():
    scheduler = FlowMatchEulerScheduler(10, shift=5.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    prev, state = scheduler.step(v, 3, x, None)
    assert state is None
    expected = x + (scheduler.sigmas[4] - scheduler.sigmas[3]) * v
    assert torch.equal(prev, expected)


def test_reference_schedules():
    euler = FlowMatchEulerScheduler(4, shift=5.0)
    torch.testing.assert_close(
        euler.timesteps, torch.tensor([1000.0, 909.7072, 717.3174, 24.41407]), rtol=1e-6, atol=1e-3
    )
    assert euler.sigmas[-1] == 0 and euler.timesteps.dtype == torch.float32
    distill = StepDistillScheduler(shift=5.0)
    torch.testing.assert_close(distill.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]))
    assert distill.sigmas.tolist()[-1] == 0.0
    unipc = FlowUniPCScheduler(10, shift=5.0)
    assert unipc.timesteps.dtype == torch.int64 and unipc.timesteps[0] == 999
    dpmpp = FlowDPMPPScheduler(10, shift=5.0)
    assert dpmpp.timesteps.dtype == torch.int64 and dpmpp.timesteps[0] == 1000
    for scheduler in (euler, distill, unipc, dpmpp):
        assert scheduler.sigmas.shape == (scheduler.num_steps + 1,)
        assert (scheduler.sigmas[1:] < scheduler.sigmas[:-1]).all()


def test_step_distill_last_step_returns_x0():
    scheduler = StepDistillScheduler(shift=3.0)
    x, v = torch.randn(4), torch.randn(4)
    prev, _ = scheduler.step(v, 3, x, None)
    assert torch.equal(prev, x - scheduler.sigmas[3] * v)


def _run_windows(scheduler, samples, outputs, *, shared: bool):
    """outputs[i][w]: model output at step i for window w; returns final samples per window."""
    samples = list(samples)
    states = [scheduler.init_state() for _ in samples]
    shared_state = scheduler.init_state()
    for i, per_window in enumerate(outputs):
        for w, model_output in enumerate(per_window):
            if shared:
                samples[w], shared_state = scheduler.step(
                    model_output, i, samples[w], shared_state.at_step(i)
                )
            else:
                samples[w], states[w] = scheduler.step(model_output, i, samples[w], states[w])
    return samples


@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlowDPMPPScheduler])
def test_per_window_state_is_independent_of_other_windows(cls):
    scheduler = cls(8, shift=5.0)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(1, 2, 3, generator=g) for _ in range(3)]
    outputs = [[torch.randn(1, 2, 3, generator=g) for _ in range(3)] for _ in range(5)]
    together = _run_windows(scheduler, samples, outputs, shared=False)
    for w in range(3):
        alone = _run_windows(scheduler, [samples[w]], [[step[w]] for step in outputs], shared=False)
        assert torch.equal(together[w], alone[0])
    # The reference's shared history (quirk 5) gives different numbers (DPM++: NaN from window 1 on).
    shared = _run_windows(scheduler, samples, outputs, shared=True)
    assert not all(torch.equal(a, b) for a, b in zip(together, shared, strict=True))
    assert all(torch.isfinite(x).all() for x in together)


def test_golden_windowed_case_with_per_window_state_stays_finite(golden_dir):
    """Where the reference's shared DPM++ history produces NaN, one state per window does not."""
    spec = json.loads((golden_dir / "schedulers.json").read_text())["cases"][
        "multistep_windowed_pipeline_usage"
    ]
    for entry in spec.values():
        cls = FlowUniPCScheduler if entry["kind"] == "unipc" else FlowDPMPPScheduler
        scheduler = cls(entry["num_inference_steps"], shift=entry["shift"])
        samples = [torch.tensor(x) for x in entry["x0_per_window"]]
        outputs = [[torch.tensor(w["model_output"]) for w in step["windows"]] for step in entry["steps"]]
        assert all(torch.isfinite(x).all() for x in _run_windows(scheduler, samples, outputs, shared=False))


def test_state_out_of_step_order_is_an_error():
    scheduler = FlowUniPCScheduler(6, shift=5.0)
    x, v = torch.randn(3), torch.randn(3)
    state = scheduler.init_state()
    x1, state = scheduler.step(v, 0, x, state)
    with pytest.raises(ValueError, match="one state per"):
        scheduler.step(v, 0, x, state)  # a second window reusing the first window's state
    with pytest.raises(TypeError):
        scheduler.step(v, 1, x1, None)
    assert isinstance(state, MultistepState) and state.next_step == 1
    with pytest.raises(IndexError):
        scheduler.step(v, 6, x1, state.at_step(6))


def test_states_are_immutable_and_reusable():
    """Re-running a step from a saved state gives the same result (e.g. to retry a window)."""
    scheduler = FlowDPMPPScheduler(6, shift=3.0)
    x, v = torch.randn(3), torch.randn(3)
    x1, s1 = scheduler.step(v, 0, x, scheduler.init_state())
    a, _ = scheduler.step(v * 2, 1, x1, s1)
    b, _ = scheduler.step(v * 2, 1, x1, s1)
    assert torch.equal(a, b)


def test_sample_dtype_is_kept():
    scheduler = FlowMatchEulerScheduler(4)
    prev, _ = scheduler.step(torch.randn(3).bfloat16(), 0, torch.randn(3), None)
    assert prev.dtype == torch.float32


def test_config():
    cfg = from_mapping(SchedulerConfig, {"kind": "unipc", "num_steps": 30, "shift": 5})
    assert isinstance(build_scheduler(cfg), FlowUniPCScheduler)
    cfg = from_mapping(SchedulerConfig, {"kind": "step_distill", "denoising_step_list": [1000, 500]})
    assert build_scheduler(cfg).num_steps == 2
    with pytest.raises(ConfigError):
        from_mapping(SchedulerConfig, {"kind": "ddim"})
    with pytest.raises(ConfigError):
        from_mapping(SchedulerConfig, {"kind": "euler", "steps": 4})

"""Adaptive Latent Prediction (`flashportrait/sampling/alp.py`): the forecast on known trajectories,
per-window/per-stream state, and the sampler with ALP on the tiny random models (30 Euler steps)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flashportrait.sampling.alp import AdaptiveLatentPredictor, ALPConfig, taylor_matrix
from flashportrait.sampling.guidance import combine_batched
from flashportrait.sampling.params import GenerationError, GenerationParams
from flashportrait.sampling.random_models import SamplerSizes, random_sampler
from flashportrait.sampling.sampler import GenerationRequest, WindowDenoiser
from flashportrait.sampling.stepmajor import denoise_step_major
from flashportrait.sampling.wavefront import FinalLatents
from tests.conftest import REPO

STEPS = 30
SHAPE = (2, 16, 3, 2, 2)  # [P streams, 16, C, h, w]


def _polynomial(degree: int, seed: int = 0):
    """v(s) = sum_k c_k (s / STEPS)^k with random [P, 16, C, h, w] coefficients (values of order 1)."""
    generator = torch.Generator().manual_seed(seed)
    coefficients = [torch.randn(SHAPE, generator=generator) for _ in range(degree + 1)]
    return lambda s: sum(c * (s / STEPS) ** k for k, c in enumerate(coefficients))


def _latents(step: int, growth: float = 0.9) -> torch.Tensor:
    """Window latents whose relative change per step is constant (|growth - 1|): gamma stays 1."""
    return torch.ones(1, 16, 3, 2, 2) * growth**step


def _run(predictor: AdaptiveLatentPredictor, trajectory, window: int = 0, latents=_latents):
    return [predictor(window, s, latents(s), lambda s=s: trajectory(s)) for s in range(predictor.num_steps)]


def test_schedule_is_warm_up_then_every_interval():
    assert ALPConfig().model_steps(STEPS) == [0, 1, 2, 3, 8, 13, 18, 23, 28]
    assert ALPConfig(interval=2, order=1).model_steps(8) == [0, 1, 3, 5, 7]
    assert ALPConfig(interval=5, order=0).model_steps(12) == [0, 5, 10]
    assert ALPConfig(interval=1).model_steps(STEPS) == list(range(STEPS))
    for bad in (dict(interval=0), dict(order=4), dict(order=-1), dict(interval=True), dict(rate_exponent=-1)):
        with pytest.raises(ValueError):
            ALPConfig(**bad)


def test_taylor_matrix_gives_the_interpolating_polynomials_coefficients():
    steps, anchor = [13, 18, 23, 28], 28
    coefficients = np.array([0.5, -2.0, 0.25, 0.125])  # p(s) = sum_i c_i (s - 28)^i
    values = [sum(c * (s - anchor) ** i for i, c in enumerate(coefficients)) for s in steps]
    np.testing.assert_allclose(taylor_matrix(steps, anchor) @ values, coefficients, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="distinct"):
        taylor_matrix([1, 1], 1)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("interval", [2, 3, 5])
@pytest.mark.parametrize(("order", "degree"), [(0, 0), (1, 1), (2, 2), (3, 0), (3, 2), (3, 3)])
def test_forecast_is_exact_on_polynomial_trajectories(adaptive, interval, order, degree):
    """A degree-<=n trajectory is reproduced to float rounding at every forecast step, with the adaptive
    factors too (the derivative estimates agree between fits and the latents move at a constant rate)."""
    trajectory = _polynomial(degree, seed=degree)
    predictor = AdaptiveLatentPredictor(ALPConfig(interval, order, adaptive=adaptive), STEPS)
    outputs = _run(predictor, trajectory)
    errors = [float((out - trajectory(s)).abs().max()) for s, out in enumerate(outputs)]
    scale = max(float(trajectory(s).abs().max()) for s in range(STEPS))
    assert max(errors) <= 2e-5 * scale, errors
    assert predictor.forecasts == STEPS - len(ALPConfig(interval, order).model_steps(STEPS)) > 0
    assert predictor.windows_held == 0  # dropped after the last step


@pytest.mark.parametrize("adaptive", [False, True])
def test_forecast_is_not_exact_above_its_order(adaptive):
    """The exactness above is a property of the order: a cubic is not reproduced by order 2 (the test
    can fail)."""
    trajectory = _polynomial(3, seed=3)
    outputs = _run(AdaptiveLatentPredictor(ALPConfig(5, 2, adaptive=adaptive), STEPS), trajectory)
    error = max(float((out - trajectory(s)).abs().max()) for s, out in enumerate(outputs))
    assert error > 1e-2


def test_latent_variation_rate_damps_the_increment():
    """Order 1, linear trajectory: the forecast at a + h is v(a) + gamma * slope * h with gamma =
    min(1, (r(a) / r(s)) ** 1.5); faster latents than at the anchor shrink the increment."""
    slope = torch.full(SHAPE, 2.0)
    trajectory = lambda s: slope * s  # noqa: E731
    rates = {s: 0.1 for s in range(8)} | {4: 0.4, 6: 0.05}  # full passes at 0, 1, 3, 5, 7
    latents = [torch.ones(1, 16, 3, 2, 2)]
    for s in range(1, 8):
        latents.append(latents[-1] * (1 - rates[s]))
    predictor = AdaptiveLatentPredictor(ALPConfig(interval=2, order=1), 8)
    outputs = _run(predictor, trajectory, latents=lambda s: latents[s])
    gamma = (0.1 / 0.4) ** 1.5
    torch.testing.assert_close(outputs[4], trajectory(3) + gamma * slope, rtol=1e-6, atol=1e-6)
    # Slower latents than at the anchor are not amplified (gamma capped at 1): step 6 is exact.
    torch.testing.assert_close(outputs[6], trajectory(6), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outputs[2], trajectory(2), rtol=1e-6, atol=1e-5)


def test_derivative_magnitude_ratio_is_per_stream_and_order():
    """Order 1, K = 2 (full at 0, 1, 3, 5): at step 3 stream 0's slope jumps from 1 to 2 while stream 1
    stays linear; stream 0's first-order term is damped by 1/2, stream 1's is not."""
    values = {0: (0.0, 0.0), 1: (1.0, 3.0), 3: (5.0, 9.0)}

    def streams(a: float, b: float) -> torch.Tensor:
        return torch.stack([torch.full(SHAPE[1:], a), torch.full(SHAPE[1:], b)])

    def trajectory(s):
        return streams(*values[s])

    predictor = AdaptiveLatentPredictor(ALPConfig(interval=2, order=1), 5)
    outputs = [predictor(0, s, _latents(s), lambda s=s: trajectory(s)) for s in range(5)]
    torch.testing.assert_close(outputs[2], streams(2.0, 6.0))
    # Step 4 = 3 + 1: stream 0: 5 + (1/2) * 2 = 6 (plain Taylor: 7); stream 1: 9 + 3 = 12.
    torch.testing.assert_close(outputs[4], streams(6.0, 12.0), rtol=1e-6, atol=1e-6)
    plain = AdaptiveLatentPredictor(ALPConfig(interval=2, order=1, adaptive=False), 5)
    outputs = [plain(0, s, _latents(s), lambda s=s: trajectory(s)) for s in range(5)]
    assert float(outputs[4][0].mean()) == pytest.approx(7.0)


def _wiggly(seed: int):
    """A smooth non-polynomial trajectory (the adaptive factors all act)."""
    generator = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(SHAPE, generator=generator) for _ in range(3))
    return lambda s: a * torch.sin(0.3 * s + b) + c * math.exp(-s / 7)


def _wiggly_latents(seed: int):
    generator = torch.Generator().manual_seed(seed)
    base, drift = (torch.randn(1, 16, 3, 2, 2, generator=generator) for _ in range(2))
    return lambda s: base + drift * (s / 10) ** 2


def test_windows_interleaved_equal_windows_run_alone():
    config = ALPConfig()
    trajectories = {w: _wiggly(w) for w in range(3)}
    latents = {w: _wiggly_latents(10 + w) for w in range(3)}
    alone = {
        w: _run(AdaptiveLatentPredictor(config, STEPS), trajectories[w], w, latents[w]) for w in range(3)
    }
    # A wavefront-like interleaving: window w starts when window w-1 reached step 2w, deepest first.
    order = sorted(((w, s) for w in range(3) for s in range(STEPS)), key=lambda u: (u[1] + 2 * u[0], -u[0]))
    shared = AdaptiveLatentPredictor(config, STEPS)
    together: dict[int, list[torch.Tensor]] = {w: [] for w in range(3)}
    for w, s in order:
        together[w].append(shared(w, s, latents[w](s), lambda w=w, s=s: trajectories[w](s)))
    assert shared.windows_held == 0
    for w in range(3):
        assert all(torch.equal(a, b) for a, b in zip(alone[w], together[w], strict=True))


def test_streams_are_independent():
    """Two streams batched forecast each stream as it would be forecast alone."""
    trajectory, latents = _wiggly(5), _wiggly_latents(6)
    both = _run(AdaptiveLatentPredictor(ALPConfig(), STEPS), trajectory, latents=latents)
    for p in range(SHAPE[0]):
        alone = _run(
            AdaptiveLatentPredictor(ALPConfig(), STEPS),
            lambda s, p=p: trajectory(s)[p : p + 1],
            latents=latents,
        )
        for s in range(STEPS):
            torch.testing.assert_close(both[s][p : p + 1], alone[s], rtol=1e-6, atol=1e-6)


def test_steps_must_come_in_order():
    predictor = AdaptiveLatentPredictor(ALPConfig(), STEPS)
    predictor(0, 0, _latents(0), lambda: torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="window 0: step 2 after step 0"):
        predictor(0, 2, _latents(2), lambda: torch.zeros(SHAPE))
    predictor.release(0)
    assert predictor.windows_held == 0


# -- the sampler with ALP (tiny random models, quality mode: 30 Euler steps) -------------------------


@pytest.fixture(scope="module")
def sampler():
    return random_sampler(SamplerSizes.tiny(), mode="quality", seed=1)


def _request(**params) -> GenerationRequest:
    rng = np.random.default_rng(0)
    # 33 driving frames: 9 latent frames, windows of 5 overlapping by 2 start at 0, 3 and 4.
    values = dict(max_size=32, context_size=5, context_overlap=2, seed=3) | params
    return GenerationRequest(
        image=rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8),
        features=rng.standard_normal((33, 554)).astype(np.float32),
        prompt_embeds=torch.from_numpy(rng.standard_normal((6, 16)).astype(np.float32)),
        params=GenerationParams(**values),
    )


@pytest.fixture(scope="module")
def full_run(sampler) -> tuple[int, torch.Tensor]:
    """(DiT calls, final latents) of the full 30-step computation (ALP off)."""
    return _count_dit_calls(sampler, lambda: _final(sampler, sampler.prepare(_request())))


def _final(sampler, prepared) -> torch.Tensor:
    events = sampler.denoise(prepared)
    return torch.cat([e.latents for e in events if isinstance(e, FinalLatents)], dim=2)


def _count_dit_calls(sampler, run) -> tuple[int, torch.Tensor]:
    calls = []
    handle = sampler.dit.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = run()
    finally:
        handle.remove()
    return len(calls), result


def test_alp_off_is_the_plain_sampler_bit_for_bit(sampler, full_run):
    prepared = sampler.prepare(_request())
    assert prepared.alp is None and prepared.num_steps == STEPS and prepared.plan.starts == (0, 3, 4)
    plain = WindowDenoiser(sampler, prepared)
    noise = sampler.initial_noise(prepared)(0, prepared.plan.generated_length)
    expected = denoise_step_major(
        prepared.plan.windows(),
        lambda w, s, x: combine_batched(prepared.guidance, plain.predict_passes(w, s, x)),
        prepared.scheduler,
        noise,
    )
    calls, latents = full_run
    assert torch.equal(latents, expected) and calls == 3 * STEPS
    # ALP with K = 1 runs the DiT at every step: the same latents.
    every_step = sampler.prepare(_request(alp=True, alp_interval=1))
    assert torch.equal(_final(sampler, every_step), expected)


def test_alp_makes_the_expected_dit_calls_and_wavefront_order_does_not_matter(sampler):
    prepared = sampler.prepare(_request(alp=True))
    assert prepared.alp == ALPConfig(interval=5, order=3)
    calls, latents = _count_dit_calls(sampler, lambda: _final(sampler, prepared))
    assert calls == 3 * 9  # 3 windows x full passes at steps 0, 1, 2, 3, 8, 13, 18, 23, 28
    # Step-major order (every window at step 0, then step 1, ...) interleaves windows differently
    # from the wavefront; per-window state gives the same latents bit for bit.
    noise = sampler.initial_noise(prepared)(0, prepared.plan.generated_length)
    step_major = denoise_step_major(
        prepared.plan.windows(), WindowDenoiser(sampler, prepared), prepared.scheduler, noise
    )
    assert torch.equal(latents, step_major)


def test_error_against_full_computation_grows_with_the_interval(sampler, full_run):
    """Relative L2 error of the final latents vs the full 30-step computation, per K (order 3). The tiny
    random DiT is far from smooth in t (its outputs change ~40% per step), so these errors are large
    and say nothing about quality; they pin the behaviour (recorded in BENCHMARKS.md)."""
    _, full = full_run
    errors = {}
    for interval in (2, 3, 5):
        latents = _final(sampler, sampler.prepare(_request(alp=True, alp_interval=interval)))
        errors[interval] = float((latents - full).norm() / full.norm())
    print("ALP relative L2 error of the final latents per K (tiny, 30 steps):", errors)
    assert all(math.isfinite(e) and e > 0 for e in errors.values())
    assert errors[2] < errors[3] < errors[5] < 1.0


def test_alp_request_parameters():
    params = GenerationParams.from_mapping({"alp": "true", "alp_interval": "4", "alp_order": 2})
    assert (params.alp, params.alp_interval, params.alp_order) == (True, 4, 2)
    assert params.alp_config("quality") == ALPConfig(interval=4, order=2)
    assert GenerationParams.from_mapping({"alp": "0"}).alp_config("quality") is None
    for values, message in [
        ({"alp": "maybe"}, "alp must be true or false"),
        ({"alp_interval": 0}, "alp_interval must be between 1 and"),
        ({"alp_order": 4}, "alp_order must be between 0 and 3"),
    ]:
        with pytest.raises(GenerationError, match=message):
            GenerationParams.from_mapping(values)
    with pytest.raises(GenerationError, match="fast mode's 4 distilled steps"):
        GenerationParams(alp=True).alp_config("fast")


def test_fast_mode_request_with_alp_is_refused_before_any_work():
    fast = random_sampler(SamplerSizes.tiny(), mode="fast", seed=1)
    with pytest.raises(GenerationError, match="Adaptive Latent Prediction"):
        fast.prepare(_request(alp=True))
    # A many-step schedule on the same sampler is accepted.
    assert fast.prepare(_request(alp=True, scheduler="euler", steps=12)).alp == ALPConfig()


def test_benchmark_runs_on_the_cpu():
    """`bench/alp.py` gets one shot on the H200: keep its CPU mode working."""
    command = ["bench/alp.py", "--tiny", "--device", "cpu", "--intervals", "5", "--no-plain"]
    proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# command: ") and lines[0].endswith(" ".join(command))
    rows = {
        line.split(" | ")[0]: line.split(" | ") for line in lines if line.startswith("| full") or "K=" in line
    }
    assert set(rows) == {"| full computation", "| K=5, order 3"}
    assert rows["| full computation"][2] == "90" and rows["| K=5, order 3"][2] == "27"
    assert all(r[-1] == "yes |" for r in rows.values())
    assert 0 < float(rows["| K=5, order 3"][5]) < 1

"""Adaptive Latent Prediction (ALP): skip most DiT passes of the many-step mode by forecasting them.

FlashPortrait (arXiv 2512.16900) accelerates its 30-step sampling inside each context window: the DiT
runs in full only every K steps, and the skipped steps are predicted from higher-order finite-difference
derivatives of the earlier full passes (a Taylor expansion, the scheme of TaylorSeer, arXiv 2503.06923),
with the expansion modulated by the latent variation rate over time and by a derivative magnitude ratio.
The paper's equations are not available to us; what follows is our reading of its description (issue
9: K = 5, derivatives up to order 3, n + 1 warm-up passes, exponent 1.5), and every place where we had
to choose is marked "Choice".

What is forecast. Choice: the DiT OUTPUT (the flow prediction v of each guidance pass), not per-layer
features as the paper does. The paper caches features inside the DiT; at our size that is 40 layers x
52,224 tokens x 5,120 channels per pass and derivative order (about 21 GB in bf16 for ONE tensor per
order and pass), far beyond a GPU, while the output of a 51-frame 512x512 window is [16, 51, 64, 64]
float32 = 13.4 MB. Forecasting the output also leaves the DiT untouched (no hooks), and the solver
(Euler, UniPC, DPM++) consumes the forecast exactly as it would a computed prediction. Taylor forecasts
of the last block's output (arXiv 2508.02240) or of the model output (Modular MAX's TaylorSeer cache)
are the same move for the same memory reason.

Per window and per stream. One history per context window (windows interleave in wavefront order, so
nothing may be shared between them) holding, for each guidance pass ("stream": posi, no_emo, ...), the
last n + 1 full outputs; the passes are combined by `guidance.py` after the forecast. A window's
history is dropped after its last step. Cache: (n + 1) x P outputs plus one copy of the window latents,
about 120 MB per window in flight at 512x512 with 2 passes and n = 3; a long 30-step video with the
default windows (51, overlap 30) has up to 59 windows in flight in wavefront order, about 7 GB.

Schedule. Steps 0..n always run the DiT (the n + 1 warm-up passes that make every derivative up to
order n available); afterwards the DiT runs at steps n + K, n + 2K, ... and every other step is
forecast. 30 steps, K = 5, n = 3: full passes at 0, 1, 2, 3, 8, 13, 18, 23, 28 (9 of 30). Choice: the
last step is not forced to run in full (the schedule is exactly "every K steps").

Derivatives. Choice: the derivatives at the newest full step a are those of the polynomial through the
last n + 1 full passes (divided differences at their actual steps, so the warm-up's spacing 1 and the
later spacing K mix correctly), in units of steps. A degree-n Taylor expansion with them reproduces any
trajectory that is a polynomial of degree <= n exactly; TaylorSeer's recursive differences
((D_i(a) - D_i(a-K)) / K) lag by half an interval per order and are not exact.

Forecast of stream p at step s = a + h (0 < h < K), with T_i the Taylor coefficients D_i / i!:

    v_p(s) = T_0 + sum_{i=1..n} gamma(s) * lambda_{p,i} * T_{p,i} * h^i

- gamma, latent variation rate over time (shared by the streams of a window): r(s) = |x_s - x_{s-1}| /
  |x_{s-1}| is how fast the window's latents moved into step s, and gamma(s) = min(1, (r(a) / r(s)) ^
  1.5). The derivatives describe the trajectory at the pace it had around a; when the latents now
  move faster, their extrapolation is trusted less and the forecast shrinks toward the last computed
  output. Choice: a damping factor, never an amplification. The amplifying reading (r(s)/r(a))^1.5
  double counts the acceleration that the higher-order terms already extrapolate: on an analytic flow
  (Gaussian-mixture data whose exact velocity is known; `bench/alp.py --analytic`, BENCHMARKS.md) it
  raised the final-latent error at K = 5 by 13% over plain Taylor, while this damping lowered it by 10%.
- lambda, derivative magnitude ratio (per stream and order): at each full step, the i-th derivative
  the previous fit predicts at a, divided by the one the new fit measures there, capped at 1. Equal on
  a smooth trajectory (exactly 1 on a polynomial of degree <= n); when a newly measured derivative
  jumps above what the history predicted, that order is noise-dominated and is damped by the ratio.
  Choice: the paper takes the ratio among DiT layers; forecasting one output per stream there are no
  layers, so the ratio is taken between consecutive estimates of the same stream's derivative. It is
  1 until the previous fit had all n + 1 passes (no earlier estimate of full order to compare with).

Both factors are 1 on a polynomial trajectory of degree <= n whose latents move at a constant relative
rate, so the adaptive forecast is exact there too (`tests/sampling/test_alp.py`). `adaptive=False`
gives the plain Taylor forecast. The factors are computed on the device; nothing is read back to the
host, so forecasts queue behind the DiT work without waiting for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_ORDER = 3  # the paper's highest derivative order
RATE_EXPONENT = 1.5  # the paper's exponent on the latent variation rate


@dataclass(frozen=True)
class ALPConfig:
    """interval: K, the DiT runs every K steps after the warm-up (1 = every step: no forecast).
    order: n, the highest derivative order (0 = reuse the last output); also n + 1 warm-up passes.
    rate_exponent: the exponent on the latent variation rate ratio (gamma).
    adaptive: apply gamma and lambda (False: the plain Taylor forecast)."""

    interval: int = 5
    order: int = 3
    rate_exponent: float = RATE_EXPONENT
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"ALP interval must be an integer >= 1, got {self.interval!r}")
        if not _is_int(self.order) or not 0 <= self.order <= MAX_ORDER:
            raise ValueError(f"ALP order must be an integer from 0 to {MAX_ORDER}, got {self.order!r}")
        if not math.isfinite(self.rate_exponent) or self.rate_exponent < 0:
            raise ValueError(f"ALP rate_exponent must be a finite number >= 0, got {self.rate_exponent!r}")

    def runs_model(self, step: int) -> bool:
        """Whether the DiT runs at `step` (the warm-up, then every `interval` steps)."""
        return step <= self.order or (step - self.order) % self.interval == 0

    def model_steps(self, num_steps: int) -> list[int]:
        return [s for s in range(num_steps) if self.runs_model(s)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def taylor_matrix(steps: Sequence[int], anchor: int) -> np.ndarray:
    """[m, m] float64 W with T_i = sum_j W[i, j] * values[j]: the Taylor coefficients at `anchor` (in
    step units) of the polynomial of degree m - 1 through the m points (steps[j], values[j])."""
    offsets = np.asarray(steps, dtype=np.float64) - anchor
    if len(set(offsets.tolist())) != len(offsets):
        raise ValueError(f"steps {list(steps)} must be distinct")
    vandermonde = offsets[:, None] ** np.arange(len(offsets))[None, :]  # [j, i] = offset_j ** i
    return np.linalg.inv(vandermonde)


def _combine(values: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sum_j weights[j] * values[j]; values: [P, ...] float32; weights: [m] floats or [m, P] tensor."""
    out = None
    for j, value in enumerate(values):
        w = weights[j]
        if isinstance(w, torch.Tensor):
            term = value * w.view(-1, *([1] * (value.dim() - 1)))
            out = term if out is None else out.add_(term)
        else:
            out = value * float(w) if out is None else out.add_(value, alpha=float(w))
    if out is None:
        raise ValueError("no values to combine")
    return out


def _stream_norms(value: torch.Tensor) -> torch.Tensor:
    """[P, ...] -> [P] float32 L2 norm per stream."""
    return torch.linalg.vector_norm(value.flatten(1).float(), dim=1)


def _capped_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """min(1, numerator / denominator), and 1 where the denominator is 0 (nothing to damp)."""
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ratio.clamp(max=1.0), torch.ones_like(ratio))


@dataclass
class _WindowHistory:
    """ALP state of one context window (see the module docstring)."""

    next_step: int = 0
    steps: list[int] = field(default_factory=list)  # full-pass steps, oldest first (<= n + 1)
    values: list[torch.Tensor] = field(default_factory=list)  # [P, 16, C, h, w] float32 each
    taylor: np.ndarray | None = None  # taylor_matrix(steps, steps[-1])
    trust: torch.Tensor | None = None  # [m, P] float32 lambda per order and stream (row 0 = 1)
    previous: torch.Tensor | None = None  # the window latents of the previous step
    rate: torch.Tensor | None = None  # r(s) at the current step, 0-dim float32
    anchor_rate: torch.Tensor | None = None  # r(a) at the newest full step


class AdaptiveLatentPredictor:
    """Decides per (window, step) whether the DiT runs, keeps each window's history, and forecasts.

    predictor(window, step, x, evaluate) -> [P, 16, C, h, w] float32 per-pass predictions: calls
    `evaluate()` (the batched DiT call) at the steps where the model runs, forecasts otherwise. Each
    window's steps must come in order 0, 1, ..., num_steps - 1; windows may interleave freely.
    """

    def __init__(self, config: ALPConfig, num_steps: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self._windows: dict[int, _WindowHistory] = {}
        self.model_calls = 0
        self.forecasts = 0

    @property
    def windows_held(self) -> int:
        return len(self._windows)

    def __call__(
        self, window: int, step: int, x: torch.Tensor, evaluate: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        history = self._windows.setdefault(window, _WindowHistory())
        if step != history.next_step:
            raise ValueError(f"window {window}: step {step} after step {history.next_step - 1}")
        history.next_step = step + 1
        if self.config.adaptive:
            self._observe(history, x)
        if self.config.runs_model(step):
            predictions = evaluate().float()
            self._record(history, step, predictions)
            self.model_calls += 1
        else:
            predictions = self._forecast(history, step)
            self.forecasts += 1
        if step == self.num_steps - 1:
            del self._windows[window]
        return predictions

    def release(self, window: int) -> None:
        """Drop a window's history (e.g. after cancellation); finished windows are dropped already."""
        self._windows.pop(window, None)

    # -- internals -----------------------------------------------------------------------------------

    def _observe(self, history: _WindowHistory, x: torch.Tensor) -> None:
        """r(s) = |x_s - x_{s-1}| / |x_{s-1}|, the relative latent change over the last step."""
        x = x.detach().float()
        if history.previous is not None:
            if history.previous.device != x.device:
                history.previous = history.previous.to(x.device)
            change = torch.linalg.vector_norm(x - history.previous)
            size = torch.linalg.vector_norm(history.previous)
            history.rate = change / torch.where(size > 0, size, torch.ones_like(size))
        history.previous = x.clone()

    def _record(self, history: _WindowHistory, step: int, predictions: torch.Tensor) -> None:
        order = self.config.order
        previous_fit = None
        if self.config.adaptive and len(history.steps) == order + 1 and order > 0:
            # The previous fit's Taylor coefficients at the new anchor (before its oldest pass goes).
            weights = taylor_matrix(history.steps, step)
            previous_fit = [_stream_norms(_combine(history.values, weights[i])) for i in range(order + 1)]
        history.steps.append(step)
        history.values.append(predictions)
        del history.steps[: -order - 1], history.values[: -order - 1]
        history.taylor = taylor_matrix(history.steps, step)
        history.anchor_rate = history.rate
        if not self.config.adaptive:
            return
        streams = predictions.shape[0]
        trust = torch.ones(len(history.steps), streams, dtype=torch.float32, device=predictions.device)
        if previous_fit is not None:
            for i in range(1, len(history.steps)):
                measured = _stream_norms(_combine(history.values, history.taylor[i]))
                trust[i] = _capped_ratio(previous_fit[i], measured)
        history.trust = trust

    def _forecast(self, history: _WindowHistory, step: int) -> torch.Tensor:
        if history.taylor is None:
            raise AssertionError("a forecast before any full pass")
        h = float(step - history.steps[-1])
        m = len(history.steps)
        powers = h ** np.arange(m, dtype=np.float64)
        if not self.config.adaptive or history.trust is None:
            # weights[j] = sum_i W[i, j] h^i: the forecast is one combination of the stored passes.
            return _combine(history.values, (history.taylor * powers[:, None]).sum(axis=0).tolist())
        device = history.values[0].device
        scale = history.trust.clone()  # [m, P]
        scale[1:] *= self._gamma(history).to(device)
        base = torch.as_tensor(history.taylor * powers[:, None], dtype=torch.float32, device=device)
        weights = torch.einsum("ij,ip->jp", base, scale)  # [m passes, P streams]
        return _combine(history.values, weights)

    def _gamma(self, history: _WindowHistory) -> torch.Tensor:
        """min(1, (r(a) / r(s)) ** exponent), 1 when either rate is unknown or r(s) = 0."""
        if history.rate is None or history.anchor_rate is None:
            return torch.ones(())
        rate, anchor = history.rate, history.anchor_rate.to(history.rate.device)
        ratio = anchor / torch.where(rate > 0, rate, torch.ones_like(rate))
        gamma = ratio.pow(self.config.rate_exponent).clamp(max=1.0)
        return torch.where(rate > 0, gamma, torch.ones_like(gamma))


__all__ = ["MAX_ORDER", "ALPConfig", "AdaptiveLatentPredictor", "taylor_matrix"]

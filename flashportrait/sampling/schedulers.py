"""Flow-matching noise schedulers, exactly as the reference builds them (REFERENCE.md 2.2, quirks 5, 15).

Every scheduler is a small object holding its schedule and nothing that changes while sampling:

    timesteps: [N] what the transformer is given (float32 for Euler/StepDistill, int64 for UniPC/DPM++)
    sigmas:    [N + 1] float32, the noise level before each step and a trailing 0
    state = scheduler.init_state()
    prev_sample, state = scheduler.step(model_output, step_index, sample, state)

`model_output` is the transformer's flow (velocity) prediction `v`, with `x = (1 - sigma) x0 + sigma
noise` and `v = noise - x0`. `step_index` is explicit: the reference re-derives it from the timestep
value, which is the same index for every schedule here (their timesteps are distinct). Arithmetic is
float32; the result has the sample's dtype (our pipeline keeps latents in float32: golden README,
"Latent precision").

The multistep solvers (UniPC, DPM++) carry a history of x0 predictions. It lives in an explicit,
immutable `MultistepState` that the caller keeps ONE PER CONTEXT WINDOW. Deviation: the reference uses
one solver object for all windows and only resets its step index, so window w's history is window
w-1's (quirk 5; with DPM++ it even turns the second window into NaN, because the history then looks
back from sigma = 1). `MultistepState.at_step` reproduces that sharing for the golden runner only.
Euler and StepDistill are memoryless (`state` is None), so they are unaffected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from flashportrait.config import ConfigError

KINDS = ("euler", "step_distill", "unipc", "dpmpp")


@dataclass(frozen=True)
class SchedulerConfig:
    """Which sampler, how many steps, and the shift.

    kind: `euler` (the reference's "Flow", 30 steps), `step_distill` (the fast path: 4 fixed steps),
        `unipc` ("Flow_Unipc"), `dpmpp` ("Flow_DPM++").
    shift: the script's/YAML's shift (5). Euler applies it twice, as diffusers does with the YAML
        scheduler_kwargs; UniPC and DPM++ apply it once (the script builds them with shift 1 and passes
        the real shift to `set_timesteps`); StepDistill uses it in its own formula.
    num_steps: ignored by `step_distill`, whose steps are `denoising_step_list`.
    """

    kind: str = "step_distill"
    num_steps: int = 4
    shift: float = 5.0
    num_train_timesteps: int = 1000
    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"scheduler kind {self.kind!r} is not one of {list(KINDS)}")
        if self.kind != "step_distill" and self.num_steps < 1:
            raise ConfigError(f"num_steps must be at least 1, got {self.num_steps}")
        if self.shift <= 0:
            raise ConfigError(f"shift must be positive, got {self.shift}")


def _shift(sigmas, shift: float):
    """The flow-matching time shift `shift * s / (1 + (shift - 1) * s)` (SD3 / Wan)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class Scheduler:
    """Common interface; see the module docstring. Subclasses set `timesteps` and `sigmas`."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init_state(self) -> MultistepState | None:
        return None

    def step(
        self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor, state: MultistepState | None
    ) -> tuple[torch.Tensor, MultistepState | None]:
        raise NotImplementedError

    def _check_index(self, step_index: int) -> None:
        if not 0 <= step_index < self.num_steps:
            raise IndexError(f"step {step_index} is outside this {self.num_steps}-step schedule")


class FlowMatchEulerScheduler(Scheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler as the reference configures it (shift applied twice).

    The training sigmas are shifted once, so the schedule ends at `sigma_min = shift(1/1000)`; then
    `linspace(1000, 1000 * sigma_min, N) / 1000` is shifted again (quirk 15). N=4, shift 5 gives
    timesteps 1000, 909.71, 717.32, 24.41. The pipeline's `mu=1` is ignored (no dynamic shifting).
    """

    def __init__(self, num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000):
        train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        train_sigmas = _shift(torch.from_numpy(train) / num_train_timesteps, shift)
        # Python floats of the float32 ends, as the reference's `.item()`; the rest runs in float64 numpy.
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        grid = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        sigmas = torch.from_numpy(_shift(grid / num_train_timesteps, shift)).to(torch.float32)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])

    def step(self, model_output, step_index, sample, state=None):
        self._check_index(step_index)
        sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        prev = sample.float() + (sigma_next - sigma) * model_output.float()
        return prev.to(sample.dtype), state


class StepDistillScheduler(Scheduler):
    """The 4-step distillation schedule of the fast path (reference `StepDistillScheduler`).

    `sigma(t) = shift * s / (1 + (shift - 1) * s)` on the float32 grid `s = linspace(1, 0, 1001)[:-1]`,
    at index `1000 - t` for each t of `denoising_step_list`; timesteps are `1000 * sigma`, so with
    shift 5 they are 1000, 937.5, 833.33, 625 (floats, not the listed integers). Step: predict
    `x0 = x - sigma * v`, then re-noise to the next sigma (`x0` itself at the last step).
    """

    def __init__(
        self,
        shift: float = 5.0,
        denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250),
        num_train_timesteps: int = 1000,
    ):
        grid = torch.linspace(1, 0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        all_sigmas = _shift(grid, shift)
        index = torch.tensor([num_train_timesteps - t for t in denoising_step_list], dtype=torch.int64)
        if (index < 0).any() or (index >= num_train_timesteps).any():
            raise ConfigError(
                f"denoising_step_list {denoising_step_list} must lie in (0, {num_train_timesteps}]"
            )
        sigmas = all_sigmas[index]
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])

    def step(self, model_output, step_index, sample, state=None):
        self._check_index(step_index)
        v = model_output.float()
        x0 = sample.float() - self.sigmas[step_index] * v
        if step_index + 1 < self.num_steps:
            x0 = x0 + self.sigmas[step_index + 1] * v
        return x0.to(sample.dtype), state


@dataclass(frozen=True)
class MultistepState:
    """History of a multistep solver for ONE context window (immutable; `step` returns a new one).

    model_outputs: the last `SOLVER_ORDER` x0 predictions, oldest first (None before they exist).
    lower_order_nums: how many steps have run, capped at the order (the warm-up counter).
    last_sample: UniPC only: the sample the previous step started from (after its correction).
    this_order: UniPC only: the order the previous predictor used (the corrector reuses it).
    next_step: the step index this history expects next.
    """

    model_outputs: tuple[torch.Tensor | None, ...]
    lower_order_nums: int = 0
    last_sample: torch.Tensor | None = None
    this_order: int = 0
    next_step: int = 0

    def at_step(self, step_index: int) -> MultistepState:
        """This history relabelled as if it preceded `step_index`.

        Only for reproducing the reference's history sharing across windows (quirk 5) in the golden
        runner; a sampler keeps one state per window and never needs this.
        """
        return dataclasses.replace(self, next_step=step_index)


SOLVER_ORDER = 2  # the reference's solvers run with their default solver_order=2


def _alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow matching: alpha = 1 - sigma; lambda = log(alpha) - log(sigma) (the half log-SNR)."""
    alpha = 1 - sigma
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


class _MultistepScheduler(Scheduler):
    """Shared schedule construction of the reference's flow-matching UniPC and DPM++ solvers."""

    def _set_sigmas(self, sigmas: np.ndarray, num_train_timesteps: int) -> None:
        """sigmas: [N] float64, already shifted. Timesteps are truncated to int64 (quirk 15)."""
        self.timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))

    def init_state(self) -> MultistepState:
        return MultistepState(model_outputs=(None,) * SOLVER_ORDER)

    def _begin(self, step_index: int, state: MultistepState | None) -> MultistepState:
        self._check_index(step_index)
        if not isinstance(state, MultistepState):
            raise TypeError(f"{type(self).__name__}.step needs the window's MultistepState (init_state())")
        if state.next_step != step_index:
            raise ValueError(
                f"this solver history is at step {state.next_step}, not {step_index}: keep one state per "
                "context window and pass it back in step order"
            )
        return state

    def _x0(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """The data prediction `x0 = x - sigma * v` both solvers work with, float32."""
        return sample.float() - self.sigmas[step_index] * model_output.float()


class FlowUniPCScheduler(_MultistepScheduler):
    """Flow-matching UniPC (bh2, predict-x0, order 2, corrector on every step but the first).

    Schedule: a solver built with shift 1 and then `set_timesteps(N, shift=shift)`, so sigmas are
    `shift(linspace(0.999, 0, N + 1)[:N])` (the training grid starts at 1 - 1/1000, so the first
    timestep is 999) and timesteps are int64. UniPC: Zhao et al. 2023, arXiv 2302.04867 (variant bh2,
    B(h) = expm1(-h)).
    """

    def __init__(self, num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000):
        alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
        train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        grid = np.linspace(sigma_max, sigma_min, num_steps + 1).copy()[:-1]
        self._set_sigmas(_shift(grid, shift), num_train_timesteps)

    @staticmethod
    def _phi(h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """hh = -h (predict-x0), h*phi_1 = expm1(hh), B(h) = expm1(hh), and the order conditions b_i."""
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial, b = 1, []
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, b_h, b

    def _predict(
        self, state: MultistepState, step_index: int, sample: torch.Tensor, order: int
    ) -> torch.Tensor:
        """UniP: x_t from the history (m0 = newest x0 prediction), order 1 or 2."""
        m0 = state.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self.sigmas[step_index + 1])
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(self.sigmas[step_index])
        h = lambda_t - lambda_s0
        h_phi_1, b_h, _ = self._phi(h, order)
        x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if order == 2:
            # Python indexing: at step 0 (reachable only with a shared history) this reads sigmas[-1] = 0
            # exactly as the reference does.
            _, _, lambda_s1 = _alpha_sigma_lambda(self.sigmas[step_index - 1])
            rk = (lambda_s1 - lambda_s0) / h
            d1 = (state.model_outputs[-2] - m0) / rk
            # The reference's simplified order-2 predictor: rho = 0.5.
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        return x_t

    def _correct(self, state: MultistepState, step_index: int, x0_now: torch.Tensor) -> torch.Tensor:
        """UniC: refine the sample of `step_index` with the new x0 prediction, at the previous order."""
        order = state.this_order
        m0 = state.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self.sigmas[step_index])
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(self.sigmas[step_index - 1])
        h = lambda_t - lambda_s0
        h_phi_1, b_h, b = self._phi(h, order)
        x_t = sigma_t / sigma_s0 * state.last_sample - alpha_t * h_phi_1 * m0
        d1_t = x0_now - m0
        if order == 1:
            return x_t - alpha_t * b_h * (0.5 * d1_t)
        _, _, lambda_s1 = _alpha_sigma_lambda(self.sigmas[step_index - 2])
        rk = (lambda_s1 - lambda_s0) / h
        d1 = (state.model_outputs[-2] - m0) / rk
        rks = torch.stack([rk, torch.ones_like(rk)])
        # R = [rks^0; rks^1], rhos = R^-1 b (LAPACK, as the reference; with a shared history rk can be
        # inf, which partial pivoting turns into rho_1 = 0 rather than NaN).
        rhos = torch.linalg.solve(torch.stack([torch.ones_like(rks), rks]), torch.stack(b))
        return x_t - alpha_t * b_h * (rhos[0] * d1 + rhos[-1] * d1_t)

    def step(self, model_output, step_index, sample, state):
        state = self._begin(step_index, state)
        x0 = self._x0(model_output, step_index, sample)
        dtype = sample.dtype
        sample = sample.float()
        if step_index > 0 and state.last_sample is not None:
            sample = self._correct(state, step_index, x0)
        history = (*state.model_outputs[1:], x0)
        # Lower order at the end (lower_order_final) and during warm-up.
        order = min(SOLVER_ORDER, self.num_steps - step_index, state.lower_order_nums + 1)
        state = MultistepState(
            model_outputs=history,
            lower_order_nums=min(state.lower_order_nums + 1, SOLVER_ORDER),
            last_sample=sample,
            this_order=order,
            next_step=step_index + 1,
        )
        return self._predict(state, step_index, sample, order).to(dtype), state


class FlowDPMPPScheduler(_MultistepScheduler):
    """Flow-matching DPM-Solver++ (2M, midpoint, data prediction; Lu et al. 2022, arXiv 2211.01095).

    Schedule: the pipeline passes `sigmas = shift(linspace(1, 0, N + 1)[:N])` (float64) to a solver
    built with shift 1, so the first timestep is 1000; timesteps are int64. First order at the first
    step and at the last one (final sigma 0); second order otherwise.
    """

    def __init__(self, num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000):
        grid = np.linspace(1, 0, num_steps + 1)[:num_steps]
        # `set_timesteps(sigmas=...)` re-applies the solver's own shift of 1: an exact identity.
        self._set_sigmas(_shift(_shift(grid, shift), 1.0), num_train_timesteps)

    def step(self, model_output, step_index, sample, state):
        state = self._begin(step_index, state)
        x0 = self._x0(model_output, step_index, sample)
        history = (*state.model_outputs[1:], x0)
        last = step_index == self.num_steps - 1
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self.sigmas[step_index + 1])
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(self.sigmas[step_index])
        h = lambda_t - lambda_s0
        decay = alpha_t * (torch.exp(-h) - 1.0)
        prev = (sigma_t / sigma_s0) * sample.float() - decay * x0
        if state.lower_order_nums >= 1 and not last:
            # Python indexing: at step 0 (only with a shared history) this reads sigmas[-1] = 0, and
            # with sigma_0 = 1 the ratio below is NaN, exactly as in the reference (quirk 5).
            _, _, lambda_s1 = _alpha_sigma_lambda(self.sigmas[step_index - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (1.0 / r0) * (x0 - history[-2])
            prev = prev - 0.5 * decay * d1
        state = MultistepState(
            model_outputs=history,
            lower_order_nums=min(state.lower_order_nums + 1, SOLVER_ORDER),
            next_step=step_index + 1,
        )
        return prev.to(sample.dtype), state


def build_scheduler(cfg: SchedulerConfig) -> Scheduler:
    """The scheduler a generation uses, from its config."""
    if cfg.kind == "euler":
        return FlowMatchEulerScheduler(cfg.num_steps, cfg.shift, cfg.num_train_timesteps)
    if cfg.kind == "step_distill":
        return StepDistillScheduler(cfg.shift, cfg.denoising_step_list, cfg.num_train_timesteps)
    if cfg.kind == "unipc":
        return FlowUniPCScheduler(cfg.num_steps, cfg.shift, cfg.num_train_timesteps)
    return FlowDPMPPScheduler(cfg.num_steps, cfg.shift, cfg.num_train_timesteps)

"""Golden kind `schedulers`: the flow-matching schedulers of `sampling/schedulers.py`.

Driven by the case's `config` (constructor arguments) and `cases` (steps, shifts, tensors as nested
lists). `multistep_windowed_pipeline_usage` is the reference's history sharing across windows
(quirk 5); our sampler keeps one state per window, so that entry is reproduced here on purpose by
passing ONE state through every window (`MultistepState.at_step`).
"""

from __future__ import annotations

from typing import Any

import torch

from flashportrait.golden import Comparison, GoldenCase, compare, compare_exact, failure
from flashportrait.sampling.schedulers import (
    FlowDPMPPScheduler,
    FlowMatchEulerScheduler,
    FlowUniPCScheduler,
    Scheduler,
    StepDistillScheduler,
)

_DTYPES = {torch.float32: "torch.float32", torch.int64: "torch.int64"}


def _t(value: Any) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


class _Checks:
    def __init__(self, case: GoldenCase):
        tol = case.tolerance
        self.schedule_tol = (float(tol["timesteps_sigmas"]["rtol"]), float(tol["timesteps_sigmas"]["atol"]))
        self.step_tol = (float(tol["step_outputs"]["rtol"]), float(tol["step_outputs"]["atol"]))
        self.results: list[Comparison] = []

    def schedule(self, name: str, scheduler: Scheduler, spec: dict) -> None:
        rtol, atol = self.schedule_tol
        ours_dtype = _DTYPES.get(scheduler.timesteps.dtype, str(scheduler.timesteps.dtype))
        self.results.append(compare_exact(f"{name}/timesteps_dtype", ours_dtype, spec["timesteps_dtype"]))
        if scheduler.timesteps.dtype == torch.int64:
            golden = torch.tensor(spec["timesteps"], dtype=torch.int64)
            self.results.append(compare_exact(f"{name}/timesteps", scheduler.timesteps, golden))
        else:
            self.results.append(
                compare(f"{name}/timesteps", scheduler.timesteps, _t(spec["timesteps"]), rtol=rtol, atol=atol)
            )
        self.results.append(
            compare(f"{name}/sigmas", scheduler.sigmas, _t(spec["sigmas"]), rtol=rtol, atol=atol)
        )

    def sample(self, name: str, ours: torch.Tensor, golden: Any) -> None:
        rtol, atol = self.step_tol
        self.results.append(compare(name, ours, _t(golden), rtol=rtol, atol=atol))

    def trajectory(self, name: str, scheduler: Scheduler, trajectory: dict) -> None:
        """x_{k+1} = step(model_outputs[k], k, x_k) from x0, one state (a single window)."""
        x = _t(trajectory["x0"])
        state = scheduler.init_state()
        for k, (model_output, expected) in enumerate(
            zip(trajectory["model_outputs"], trajectory["samples_after_step"], strict=True)
        ):
            x, state = scheduler.step(_t(model_output), k, x, state)
            self.sample(f"{name}/step{k}", x, expected)


def _multistep(kind: str, num_steps: int, shift: float, train: int) -> Scheduler:
    if kind == "unipc":
        return FlowUniPCScheduler(num_steps, shift, train)
    if kind == "dpmpp":
        return FlowDPMPPScheduler(num_steps, shift, train)
    raise ValueError(f"unknown multistep solver {kind!r}")


def run(case: GoldenCase) -> list[Comparison]:
    checks = _Checks(case)
    cases = case.meta["cases"]
    config = case.config

    euler_kwargs = config["flow_match_euler"]["constructor_kwargs_after_filter_kwargs"]
    if euler_kwargs.get("use_dynamic_shifting"):
        checks.results.append(failure("flow_match_euler", "dynamic shifting is not used by the reference"))
    for name, spec in cases.get("flow_match_euler", {}).items():
        scheduler = FlowMatchEulerScheduler(
            int(spec["num_inference_steps"]),
            float(euler_kwargs["shift"]),
            int(euler_kwargs["num_train_timesteps"]),
        )
        checks.schedule(f"euler{name}", scheduler, spec)
        rtol, atol = checks.schedule_tol
        for step in spec["steps"]:
            k = int(step["timestep_index"])
            where = f"euler{name}/step{k}"
            checks.results.append(
                compare(
                    f"{where}/timestep", scheduler.timesteps[k], _t(step["timestep"]), rtol=rtol, atol=atol
                )
            )
            for key, index in (("sigma", k), ("sigma_next", k + 1)):
                checks.results.append(
                    compare(f"{where}/{key}", scheduler.sigmas[index], _t(step[key]), rtol=rtol, atol=atol)
                )
            prev, _ = scheduler.step(_t(step["model_output"]), k, _t(step["sample"]), scheduler.init_state())
            checks.sample(f"{where}/prev_sample", prev, step["prev_sample"])

    for name, spec in cases.get("step_distill", {}).items():
        ctor = spec["constructor"]
        scheduler = StepDistillScheduler(
            float(ctor["shift"]),
            tuple(int(t) for t in ctor["denoising_step_list"]),
            int(ctor["num_train_timesteps"]),
        )
        checks.schedule(f"step_distill_{name}", scheduler, spec)
        checks.trajectory(f"step_distill_{name}", scheduler, spec["trajectory"])

    train = int(
        config.get("flow_unipc", {})
        .get("constructor_kwargs_after_filter_kwargs", {})
        .get("num_train_timesteps", 1000)
    )
    for name, spec in cases.get("multistep", {}).items():
        scheduler = _multistep(spec["kind"], int(spec["num_inference_steps"]), float(spec["shift"]), train)
        checks.schedule(name, scheduler, spec)
        if spec.get("timesteps_unique") is not None:
            unique = len(set(scheduler.timesteps.tolist())) == scheduler.num_steps
            checks.results.append(
                compare_exact(f"{name}/timesteps_unique", unique, bool(spec["timesteps_unique"]))
            )
        checks.trajectory(name, scheduler, spec["trajectory"])

    for name, spec in cases.get("multistep_windowed_pipeline_usage", {}).items():
        scheduler = _multistep(spec["kind"], int(spec["num_inference_steps"]), float(spec["shift"]), train)
        windows = [_t(x) for x in spec["x0_per_window"]]
        # The reference's bug, reproduced deliberately: one history for all windows.
        shared = scheduler.init_state()
        for i, step in enumerate(spec["steps"]):
            rtol, atol = checks.schedule_tol
            checks.results.append(
                compare(
                    f"shared_{name}/step{i}/timestep",
                    scheduler.timesteps[i].float(),
                    _t(step["timestep"]),
                    rtol=rtol,
                    atol=atol,
                )
            )
            for w, window in enumerate(step["windows"]):
                windows[w], shared = scheduler.step(
                    _t(window["model_output"]), i, windows[w], shared.at_step(i)
                )
                checks.sample(f"shared_{name}/step{i}/window{w}", windows[w], window["prev_sample"])
    return checks.results

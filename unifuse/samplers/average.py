"""Few-step sampling with an average-velocity model (MeanFlow, Geng et al. 2025; shortcut models, Frans et al. 2024).

A two-time model predicts the average velocity u(x_t, r, t) = (x_t - x_r) / (t - r) of the probability-flow ODE
over [r, t] (`objectives.meanflow`), so each grid step is one jump

    x_{t_{i+1}} = x_{t_i} - (t_i - t_{i+1}) u(x_{t_i}, t_{i+1}, t_i)            one network evaluation per step

on a uniform grid from t_max to 0 by default (one step: x_0 = x_1 - u(x_1, 0, 1)). u is read from the model's
evaluation as the velocity alpha' x0_hat + sigma' eps_hat at t_i (an exact inversion of the network output for a
"velocity" model), the network receiving the end time through the cond entry r = time_input(t_{i+1})
(`objectives.meanflow.end_time`): the sampler sets the evaluator's cond per step, so the plan's prepared network
inputs and the evaluator's checks are those of every other sampler. The step to the data end returns the
denoised estimate, which for u(x_t, 0, t) is the same jump.

A one-time model (a network without `two_times`) has only the instantaneous velocity, u(x, r, t) ~ v(x, t) (the
r = t limit): the step is then Euler's, exactly `sample_euler` on the same grid. This fallback keeps "average"
usable with every model like every other sampler (and keeps `uf.sample`'s grid check, run on an exact one-time
model, meaningful); it is a first-order ODE solver there, not a few-step model.
"""
from __future__ import annotations

import torch

from ..objectives.meanflow import end_time, is_two_time, owner
from .base import F64, linear, setup


def end_times(model, ts: list, like: torch.Tensor) -> list:
    """The network's r input [B] for the end of each step (time-only work, done before the loop)."""
    owner(model)  # a two-time model re-expressed on another path is refused here
    B = like.shape[0]
    return [end_time(model, torch.full((B,), float(t), dtype=F64, device=like.device))["r"] for t in ts[1:]]


def sample_average(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None):
    """Average-velocity jumps x <- x - (t_i - t_{i+1}) u(x, t_{i+1}, t_i) over the grid (Euler for a one-time
    model); NFE = number of steps."""
    ev, sch, x, _ = setup("average", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    ends = end_times(model, sch.t, x) if is_two_time(model) else None
    base = dict(ev.cond)
    last = len(sch.t) - 2
    for i in ev.steps(len(sch.t) - 1):
        if ends is not None:
            ev.cond = {**base, "r": ends[i]}
        e = ev(x, sch.t[i])
        if i == last and sch.ends_on_data:
            x = e.x0
        else:
            dt = sch.t[i + 1] - sch.t[i]
            x = linear(x, 1.0, [(dt * sch.d_alpha[i], e.x0), (dt * sch.d_sigma[i], e.eps)])
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


__all__ = ["sample_average", "end_times"]

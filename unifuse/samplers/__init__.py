"""Samplers: plain functions over an explicit time grid, one shared signature (DESIGN rules 5-6).

    x = uf.samplers.sample_dpmpp_2m(model, x_T, ts, cond=None, noise=None, callback=None, progress=False)

`ts` is a float64 grid t_0 > ... > t_K in the model path's native time (`uf.paths.time_grid`), `x_T` the
state at t_0. Every sampler works with every path and every prediction kind: it only reads the pair
(x0_hat, eps_hat) from `model.evaluate` (one call = one network evaluation). `SAMPLERS` maps each public
name to its function and its cost rule (how an NFE budget becomes a grid); `uf.sample` is the convenience
that builds the grid from `nfe` and `spacing`. Every sampler and `uf.sample` take `plan=`, a `Plan` the caller
keeps so that repeated calls do their time-only set-up once (`plan`). The one-step functions `step_*` (`steps`)
take one step from s to t, with a time per sample if wanted (e.g. a distillation teacher's step).
`default_grid(sampler, nfe)` is the grid (spacing, sigma range) `uf.sample` uses when given no spacing, and
`optimize_grid(model, noise, nfe, sampler=...)` fits a grid to a model (`grids`).
`generators(seed, start, count)` are the per-sample noise streams of samples start..start+count-1 (what an int
seed gives a batch), so that sample i depends only on (seed, i) however a run is batched.
"average" (`average`) jumps with a two-time average-velocity model (MeanFlow, shortcut models) and is Euler's
method for any other model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ..errors import choose
from .ancestral import sample_ddim, sample_ddpm
from .average import sample_average
from .base import NoiseSource, generators, randn
from .consistency import sample_consistency
from .grids import default_grid, optimize_grid
from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m, sample_ipndm, sample_unipc
from .ode import sample_adaptive, sample_edm_stochastic, sample_euler, sample_heun, sample_midpoint
from .plan import Plan, Schedule, schedule
from .sde import sample_euler_maruyama, sample_pc
from .singlestep import sample_dpm_solver_1, sample_dpm_solver_2, sample_dpm_solver_3, sample_dpmpp_2s
from .steps import (
    GaussianStep,
    step_ddim,
    step_ddpm,
    step_dpmpp_2m,
    step_dpmpp_sde,
    step_euler,
    step_euler_maruyama,
    step_flow_sde,
    step_heun,
    step_langevin,
)


class Sampler(NamedTuple):
    """A sampler function and how `uf.sample` plans its grid.

    cost: "step" (one evaluation per grid step), "stage" (single-step method: a step of order p costs p
    evaluations; `max_order`), "pc" (corrector + predictor evaluations per grid time), "renoise" (one
    evaluation per noisy grid time, consistency sampling) or "adaptive" (nfe is an upper bound).
    zero_snr_first_order: a step from alpha = 0 is first order (exponential integrators). The final step to
    the data always costs one evaluation (the denoised estimate)."""

    fn: Callable
    cost: str
    max_order: int
    spacing: str
    options: tuple
    stochastic: bool = False
    zero_snr_first_order: bool = False
    default_nfe: int = 25


_EXP = dict(zero_snr_first_order=True)
SAMPLERS = {
    "ddpm": Sampler(sample_ddpm, "step", 1, "uniform", ("variance",), True, default_nfe=1000),
    "ddim": Sampler(sample_ddim, "step", 1, "karras", ("eta",), True),
    "euler": Sampler(sample_euler, "step", 1, "karras", ()),
    "heun": Sampler(sample_heun, "stage", 2, "karras", ()),
    "edm_stochastic": Sampler(sample_edm_stochastic, "stage", 2, "karras", ("S_churn", "S_tmin", "S_tmax", "S_noise"),
                              True),
    "dpm_solver_1": Sampler(sample_dpm_solver_1, "step", 1, "logsnr", (), **_EXP),
    "dpm_solver_2": Sampler(sample_dpm_solver_2, "stage", 2, "logsnr", (), **_EXP),
    "dpm_solver_3": Sampler(sample_dpm_solver_3, "stage", 3, "logsnr", (), **_EXP),
    "dpmpp_2s": Sampler(sample_dpmpp_2s, "stage", 2, "logsnr", ("r1",), **_EXP),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, "step", 2, "logsnr", ("variant", "lower_order_final")),
    "dpmpp_3m": Sampler(sample_dpmpp_3m, "step", 3, "logsnr", ("lower_order_final",)),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, "step", 2, "logsnr", ("variant", "lower_order_final"), True),
    "unipc": Sampler(sample_unipc, "step", 3, "logsnr", ("order", "variant", "lower_order_final", "corrector",
                                                          "denoise_corrected")),
    "ipndm": Sampler(sample_ipndm, "step", 4, "karras", ("order", "lower_order_final", "variable")),
    "euler_maruyama": Sampler(sample_euler_maruyama, "step", 1, "logsnr", (), True, default_nfe=1000),
    "pc": Sampler(sample_pc, "pc", 1, "logsnr", ("predictor", "snr", "n_corrector", "step_rule"), True,
                  default_nfe=1000),
    "midpoint": Sampler(sample_midpoint, "stage", 2, "karras", ()),
    "consistency": Sampler(sample_consistency, "renoise", 1, "karras", (), True, default_nfe=2),
    "adaptive": Sampler(sample_adaptive, "adaptive", 5, "uniform", ("rtol", "atol", "sigma_stop", "h_init"),
                        default_nfe=10000),
    "average": Sampler(sample_average, "step", 1, "uniform", (), default_nfe=1),
}


def available() -> list:
    """Every sampler name (each works with every path and every prediction kind)."""
    return list(SAMPLERS)


def get(name: str) -> Sampler:
    """The `Sampler` entry for a name (one clear error listing the valid names)."""
    return SAMPLERS[choose("sampler", name, SAMPLERS)]


__all__ = ["SAMPLERS", "Sampler", "available", "get", "Plan", "GaussianStep", "NoiseSource", "Schedule", "schedule",
           "randn", "generators", "optimize_grid", "default_grid",
           "sample_ddpm", "sample_ddim", "sample_euler", "sample_heun", "sample_edm_stochastic", "sample_dpm_solver_1",
           "sample_dpm_solver_2", "sample_dpm_solver_3", "sample_dpmpp_2s", "sample_dpmpp_2m", "sample_dpmpp_3m",
           "sample_dpmpp_2m_sde", "sample_unipc", "sample_ipndm", "sample_euler_maruyama", "sample_pc",
           "sample_midpoint", "sample_consistency", "sample_adaptive", "sample_average",
           "step_euler", "step_heun", "step_ddim", "step_dpmpp_2m", "step_ddpm", "step_dpmpp_sde",
           "step_euler_maruyama", "step_langevin", "step_flow_sde"]

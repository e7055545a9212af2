"""`uf.sample`: a model, noise, a sampler name and an exact NFE budget in; samples out (API.md "Sampling").

A thin convenience over `uf.samplers`: it turns `nfe` into a grid of `uf.paths.time_grid` (spacing, rho,
shift, sigma range) that starts at the model's noise end (`noise_end_grid`), scales the noise by the path's
prior there, and calls the sampler function. With first_step="analytic" (the default grids' choice at few
NFE) the jump from the noise end down to sigma_max costs no evaluation: the denoiser there is taken as 0, the
data mean of normalised data (Zhou et al. 2024's analytical first step), so the noise is read at sigma_max.
`nfe` is the exact number of network evaluations (a second-order single step costs two; the final step to the data
costs one). Budgets are met by these documented rules, never exceeded:
  one evaluation per step (ddim, ddpm, euler, multistep, SDE): nfe steps;
  single-step methods of order p (heun, midpoint, edm_stochastic, dpm_solver_2/3, dpmpp_2s): 1 evaluation for
    the final step, then as many order-p steps as fit and one lower-order step for the remainder
    (DPM-Solver-fast's rule); a step from zero SNR is first order for the exponential integrators; at low
    budgets first-order steps instead of a few huge order-p ones (`singlestep_plan`);
  pc: levels of (n_corrector + 1) evaluations; a remainder removes correctors from the first levels;
  consistency: the first nfe noisy times of the spacing's (nfe + 1)-step grid (the least noisy one, where
    re-noising would change almost nothing, is skipped);
  adaptive: nfe is an upper bound; exceeding it raises.
A planned grid on which the sampler cannot reach the data (tried first on an exact data-like model on the
model's path: `samplers.checks`) is refused in one line naming an NFE that works, before any network call.
Sampling runs under `torch.no_grad()` unless `grad=True`.
The grid and every quantity that depends on time alone (schedule, prepared evaluations, step coefficients) are
computed before the loop into a `uf.samplers.Plan`; pass the same `plan=` to repeated calls and those with the
same settings, batch size, dtype and device do no set-up work (without one, each call makes its own).
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch

from . import samplers as _samplers
from .errors import UnifuseError, choose
from .parameterization.kinds import defined_at_zero_snr
from .paths import time_grid
from .samplers import checks as _checks
from .samplers import grids as _grids
from .samplers.plan import Plan, as_plan

F64 = torch.float64
FIRST_STEPS = ("evaluated", "analytic")  # how a named grid leaves the noise end (`sample`)


class Trajectory(NamedTuple):
    """Grid times [K+1], states (K+1 tensors: the start and after each step) and denoised estimates (K)."""

    times: list
    states: list
    denoised: list


LOW_NFE = 20  # budgets up to here end a single-step plan with first-order steps (see `singlestep_plan`)


def singlestep_plan(nfe: int, max_order: int, zero_start: bool, remainder: str = "last") -> list:
    """Orders of the non-final steps of a single-step method so that sum(orders) + 1 == nfe.

    At low budgets the evaluations go to more first-order steps rather than a few huge high-order ones:
    with fewer than three order-p steps every step is first order, and up to LOW_NFE the step onto the
    least noisy time is first order (a Heun corrector evaluated there, after a long step, sees a slope of
    almost zero and halves the move). Above LOW_NFE the plan is DPM-Solver-fast's, e.g. EDM's Heun at 35."""
    budget, orders = nfe - 1, []
    if zero_start and budget > 0:
        orders, budget = [1], budget - 1
    if budget < 3 * max_order:
        return orders + [1] * budget
    if nfe <= LOW_NFE:
        q = (budget - 1) // max_order
        return orders + [max_order] * q + [1] * (budget - max_order * q)
    q, r = divmod(budget, max_order)
    body = [max_order] * q
    if r:
        body = body + [r] if remainder == "last" else [r] + body
    return orders + body


def pc_plan(nfe: int, n_corrector: int) -> list:
    """Corrector counts per grid time so that sum(counts) + levels == nfe (fewer correctors first)."""
    levels = math.ceil(nfe / (n_corrector + 1))
    counts = [n_corrector] * levels
    excess, j = levels * (n_corrector + 1) - nfe, 0
    while excess > 0:
        if counts[j] > 0:
            counts[j] -= 1
            excess -= 1
        else:
            j += 1
    return counts


def nfe_budget(name: str, nfe: int, zero_start: bool = False, options: dict | None = None):
    """(grid steps, extra keyword arguments) that make sampler `name` use exactly `nfe` evaluations."""
    spec = _samplers.get(name)
    options = options or {}
    if spec.cost == "stage":
        orders = singlestep_plan(nfe, spec.max_order, zero_start and spec.zero_snr_first_order)
        return len(orders) + 1, {"orders": orders}
    if spec.cost == "pc":
        counts = pc_plan(nfe, int(options.get("n_corrector", 1)))
        return len(counts), {"correctors": counts}
    if spec.cost == "adaptive":
        return 1, {"max_nfe": nfe}
    if spec.cost == "renoise":  # nfe + 1 steps, the least noisy time then dropped (see `sample`)
        return nfe + 1, {}
    return nfe, {}


def grid_cost(name: str, ts: torch.Tensor, path, options: dict | None = None) -> tuple:
    """(nfe, extra) for sampler `name` on a given grid (used for user grids)."""
    spec = _samplers.get(name)
    K = ts.numel() - 1
    ends = float(path.sigma(ts[-1:])[0]) == 0.0
    n = K - 1 if ends else K
    if spec.cost == "stage":
        zero = float(path.alpha(ts[:1])[0]) == 0.0 and spec.zero_snr_first_order
        orders = [spec.max_order] * n
        if zero and n:
            orders[0] = 1
        return sum(orders) + (1 if ends else 0), {"orders": orders}
    if spec.cost == "pc":
        m = int((options or {}).get("n_corrector", 1))
        return K * (m + 1), {"correctors": [m] * K}
    if spec.cost == "adaptive":
        return None, {}
    return K, {}


def noise_end_grid(path, steps: int, spacing, grid_kw: dict, zero_snr_ok: bool = True) -> torch.Tensor:
    """`time_grid`, starting at the model's noise end: where a spacing stops below it (karras, logsnr and
    shift clip sigma/alpha at sigma_max, 80 where the path reaches zero SNR), t_max is prepended and the
    first step goes from there, so the noise is always read as a draw from the prior at the noise end.
    grid_kw["first_step"] == "analytic": no t_max is prepended; the grid starts at sigma_max and the noise is
    read there (the first jump with the denoiser taken as 0, no evaluation).
    zero_snr_ok=False (eps and score models, undefined at alpha = 0) never prepends a zero-SNR t_max."""
    kw = {k: v for k, v in grid_kw.items() if k != "first_step"}
    ts = time_grid(path, steps, spacing, **kw)
    t_max = grid_kw["t_max"]
    if grid_kw.get("first_step") == "analytic":  # the jump to sigma_max is the DDIM step with x0-hat = 0: free
        return ts
    if isinstance(spacing, str) and spacing in ("karras", "logsnr", "shift") \
            and float(ts[0]) < t_max - 1e-9 * max(1.0, abs(t_max)) \
            and (zero_snr_ok or float(path.alpha(torch.tensor(t_max, dtype=F64))) > 0.0):
        rest = time_grid(path, steps - 1, spacing, **kw) if steps >= 2 else ts[-1:]
        ts = torch.cat([torch.tensor([t_max], dtype=F64), rest])
    return ts


def planned_grid(path, sampler: str, nfe: int, spacing, grid_kw: dict, zero_ok: bool, options: dict) -> tuple:
    """(grid, extra sampler arguments, sigma at the grid's start) that spend exactly `nfe` evaluations;
    `sample` keeps the result in its plan, so a repeated call with that plan recomputes none of it."""
    spec = _samplers.get(sampler)
    steps, extra = nfe_budget(sampler, nfe, False, options)
    ts = noise_end_grid(path, steps, spacing, grid_kw, zero_ok)
    if spec.zero_snr_first_order and float(path.alpha(ts[:1])[0]) == 0.0:
        steps, extra = nfe_budget(sampler, nfe, True, options)
        ts = noise_end_grid(path, steps, spacing, grid_kw, zero_ok)
    if spec.cost == "renoise":  # multistep consistency sampling never lands on the grid's least noisy time
        ts = torch.cat([ts[:-2], ts[-1:]])
    return ts, extra, float(path.sigma(ts[:1])[0])


def _check_nfe(nfe):
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise UnifuseError(f"nfe must be a positive integer (the exact number of network evaluations), got {nfe!r}")
    return nfe


def _user_grid(path, sampler: str, spacing, nfe, options: dict) -> tuple:
    """(grid, extra sampler arguments, nfe, sigma at the grid's start) for a grid the user gives."""
    ts = time_grid(path, 1, spacing)
    cost, extra = grid_cost(sampler, ts, path, options)
    if nfe is not None and cost is not None and _check_nfe(nfe) != cost:
        raise UnifuseError(f"this grid of {ts.numel() - 1} steps costs {cost} evaluations with sampler "
                           f"{sampler!r}, not nfe={nfe}; pass nfe={cost} (or nfe=None) or another grid")
    if _samplers.get(sampler).cost == "adaptive":
        extra = {"max_nfe": nfe} if nfe is not None else {}
    return ts, extra, cost if cost is not None else nfe, float(path.sigma(ts[:1])[0])


def _planned(model, sampler: str, nfe: int, spacing, grid_kw: dict, options: dict, plan: Plan) -> tuple:
    """`planned_grid` for the model (kept in `plan`), refused in one line where the sampler's discretisation
    on that grid cannot reach the data (`samplers.checks`), naming an NFE that works."""
    path, spec = model.path, _samplers.get(sampler)
    zero_ok = defined_at_zero_snr(getattr(model, "prediction", None))  # eps and score are not (alpha = 0)
    n_corrector = options.get("n_corrector", 1) if spec.cost == "pc" else None
    key = ("uf.sample grid", path, sampler, nfe, spacing, *grid_kw.values(), zero_ok, n_corrector)
    ts, extra, prior = plan.remember(key, lambda: planned_grid(path, sampler, nfe, spacing, grid_kw, zero_ok, options))
    extra = {k: list(v) if isinstance(v, list) else v for k, v in extra.items()}  # own copies per call

    def score(n):
        if spec.cost == "adaptive" or n > _checks.PROBE_MAX_NFE:
            return None
        grid, more, _ = planned_grid(path, sampler, n, spacing, grid_kw, zero_ok, options) if n != nfe else (ts, extra, 0)
        pred = getattr(model, "prediction", None)
        return plan.remember(("probe",) + key[1:3] + (n,) + key[4:] + (pred, tuple(sorted(options.items()))),
                             lambda: _checks.probe(spec.fn, path, pred, grid, more, options))

    bad = lambda n: (score(n) or 0.0) > _checks.SENSIBLE
    if bad(nfe):
        works = next((n for n in range(nfe + 1, _checks.PROBE_MAX_NFE + 1) if not bad(n)), None)
        fix = f"use nfe >= {works}" if works else "use another sampler, such as 'dpmpp_2m'"
        if spacing != spec.spacing and works is None:
            fix = f"use spacing={spec.spacing!r} (the sampler's default) or another sampler, such as 'dpmpp_2m'"
        raise UnifuseError(f"sampler {sampler!r} at nfe={nfe} on the {spacing!r} grid of this path does not reach "
                           f"the data (its steps are too large: checked on an exact data-like model); {fix}")
    return ts, extra, prior


def _grid_options(model, sampler: str, nfe: int, spacing, kw: dict, first_step) -> tuple:
    """(spacing, grid keywords) of a named grid: the sampler's measured default grid (`default_grid`) when neither
    spacing nor sigma range is given, else what was given (first_step "evaluated" unless asked)."""
    if spacing is None and kw["sigma_min"] is None and kw["sigma_max"] is None:
        default = _grids.default_grid(sampler, nfe)
        spacing = default.get("spacing")
        kw = dict(kw, sigma_min=default.get("sigma_min"), sigma_max=default.get("sigma_max"))
        first_step = first_step or default.get("first_step")
    t_max = float(getattr(model, "t_max", model.path.t_max))
    kw = dict(kw, t_max=t_max, first_step=choose("first_step", first_step or "evaluated", FIRST_STEPS))
    return _samplers.get(sampler).spacing if spacing is None else spacing, kw


def sample(model, noise: torch.Tensor, sampler: str = "dpmpp_2m", nfe: int | None = None, *, spacing=None,
           generator=None, cond: dict | None = None, guidance=None, guidance_options: dict | None = None,
           return_trajectory: bool = False, return_info: bool = False, progress: bool | None = None,
           rho: float = 7.0, shift: float = 3.0, sigma_min: float | None = None, sigma_max: float | None = None,
           first_step: str | None = None, plan: Plan | None = None, grad: bool = False, **options):
    """Sample from `model` starting at standard normal `noise` with exactly `nfe` network evaluations.

    spacing: a name of `uf.paths.SPACINGS` or a tensor of native times (a user grid, e.g. from
    `uf.samplers.optimize_grid`; nfe then must match the grid's cost or be None). Default: the spacing and
    sigma range that `uf.samplers.default_grid` gives for this sampler and NFE (a first jump from the noise end
    to sigma_max, a final denoise at sigma_min), unless sigma_min or sigma_max is given; with either, the
    sampler's own spacing (e.g. "logsnr" for DPM-Solver).
    first_step: from the noise end to sigma_max by one network step ("evaluated") or for free ("analytic": the
    denoiser at sigma >> 1 taken as 0, the mean of normalised data, so the noise is read at sigma_max; Zhou et al.
    2024). Default: the default grid's choice when no spacing or sigma range is given, else "evaluated". A user
    grid that starts below the noise end is read the analytic way.
    generator: None, a torch.Generator, an int seed or a list of generators / seeds (one per sample: sample i
    then depends only on its own seed, whatever the batch size). cond: keyword arguments for the network.
    guidance: a classifier-free guidance scale (the model is wrapped by `uf.guidance.classifier_free`).
    progress: a tqdm bar over the steps (default: on for nfe >= 100 in a terminal).
    plan: a `uf.samplers.Plan` kept between calls (the grid and all time-only work are then made once).
    grad: False (default) samples under `torch.no_grad()`: no graph, the memory of one step. True keeps the
    graph through every step, so a loss on the samples reaches the network's parameters (reward fine-tuning
    by backpropagation). no_grad rather than inference_mode: inference tensors can never enter autograd
    later, which would break a user who trains on the samples; the saving of inference_mode is negligible here.
    Returns x, plus a `Trajectory` if return_trajectory, plus an info dict (nfe, steps, grid, guidance
    evaluation counts) if return_info."""
    spec = _samplers.get(sampler)
    bad = [k for k in options if k not in spec.options]
    if bad:
        valid = ", ".join(sorted(spec.options)) or "none"
        raise UnifuseError(f"sampler {sampler!r} does not take option(s) {', '.join(map(repr, bad))} "
                           f"(value {options[bad[0]]!r}); its options: {valid}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise UnifuseError(f"noise must be a floating-point tensor [batch, ...] of standard normal values, got "
                           f"{type(noise).__name__ if not isinstance(noise, torch.Tensor) else tuple(noise.shape)}")
    if guidance is not None:
        from .guidance import classifier_free  # lazy: guidance is optional

        model = classifier_free(model, guidance, **(guidance_options or {}))
    source = _samplers.NoiseSource(generator, noise.shape[0])  # a bad generator is refused before any work
    if isinstance(spacing, (torch.Tensor, list, tuple)):
        if first_step is not None:
            raise UnifuseError(f"first_step={first_step!r} applies to named spacings; a grid of times starts where "
                               "its first time is (below the noise end: the analytic first step); drop first_step")
        ts, extra, nfe, prior = _user_grid(model.path, sampler, spacing, nfe, options)
    else:
        nfe = _check_nfe(spec.default_nfe if nfe is None else nfe)
        plan = as_plan(plan, "uf.sample")
        spacing, grid_kw = _grid_options(model, sampler, nfe, spacing, dict(rho=rho, shift=shift, sigma_min=sigma_min,
                                                                              sigma_max=sigma_max), first_step)
        ts, extra, prior = _planned(model, sampler, nfe, spacing, grid_kw, options, plan)
    if progress is None:  # a bar for long runs in a terminal
        progress = (nfe or 0) >= 100 and sys.stderr.isatty()
    x = noise * prior
    records = Trajectory(ts.tolist(), [x.detach().clone()], []) if return_trajectory else None

    def record(i, t, state, denoised):
        records.states.append(state.detach().clone())
        records.denoised.append(None if denoised is None else denoised.detach().clone())

    info = {}
    if hasattr(model, "reset_counts"):
        model.reset_counts()
    with torch.set_grad_enabled(bool(grad)):
        out = spec.fn(model, x, ts, cond=cond, noise=source, callback=record if return_trajectory else None,
                      progress=progress, info=info, plan=plan, **extra, **options)
    if spec.cost != "adaptive" and nfe is not None and info.get("nfe") != nfe:
        raise RuntimeError(f"internal error: sampler {sampler!r} used {info.get('nfe')} evaluations for nfe={nfe}")
    out = out.to(noise.dtype) if out.dtype != noise.dtype else out
    result = (out,)
    if return_trajectory:
        result += (records,)
    if return_info:
        info.update(sampler=sampler, grid=ts.tolist())
        if hasattr(model, "counts"):
            info["guidance"] = model.counts()
        result += (info,)
    return result[0] if len(result) == 1 else result

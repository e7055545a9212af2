"""Time grids for few-step sampling: the default grid of each sampler per NFE, and grids fitted to a model.

Default grids (`default_grid`). With K evaluations the error of an ODE sampler comes from three places: the
first jump from the prior (at sigma >> data scale the denoiser is almost the data mean, so one step can go
from the noise end down to sigma_max ~ 1-10 almost for free; at the fewest NFE for nothing: the analytic first
step of Zhou et al. 2024 takes that denoiser as 0, the mean of normalised data, and spends the saved
evaluation below sigma_max), the steps in between, and the final denoise,
which returns E[x0 | x_t] at the last noisy level sigma_min instead of integrating on to sigma = 0. Few
evaluations cannot resolve low noise levels, so sigma_min rises as K falls, and the steps in between are
spaced evenly in log-SNR (the variable in which the exponential integrators are exact for a linear
denoiser; Lu et al. 2022). The table below (sigma = sigma/alpha, EDM units, data of scale ~1, e.g. images
in [-1, 1]) was chosen once from measurements over a family of exact problems (docs/benchmarks/samplers.md:
a 2-D ring, a 64-D mixture of anisotropic Gaussians and a heavy-tailed, nearly low-rank scale mixture) and,
for NFE 3-6, two trained networks as well (digits, latent MNIST: FD), never per problem; every path reads it
through its own sigma/alpha, so it is the same grid on every path.

Fitted grids (`optimize_grid`): the grid is fitted to the model from a small batch of its own noise.
1. A reference: the PF-ODE solved on a fine log-SNR grid (`reference_nfe` evaluations per sample).
2. GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling"): dynamic
   programming over candidate times on that reference trajectory. The cost of a jump c_i -> c_j is the
   distance between one first-order (DDIM) step from the reference state at c_i and the reference state at
   c_j (states measured in x_t / sqrt(alpha^2 + sigma^2), so that every path gives the same cost); the cost
   of the final denoise from c_i is the distance of its x0 estimate to the reference sample. The cheapest
   path with the sampler's number of steps is one starting grid; the cheapest path whose first jump is the
   free analytic one (x0-hat = 0 from the noise end, `uf.sample`'s first_step="analytic") is another.
3. Local refinement: coordinate descent on the log-SNR positions of the grid's times (the first time stays
   where it is the noise end; below it, where the analytic first step reaches it, it moves too), minimising
   the RMS distance of the sampler's own samples on the grid to the reference samples (the error the benchmarks
   report; where a few samples switch modes they dominate it, so fit on a batch large enough to hold several: 64
   images, 256 points), started from the best of the default grid,
   the GITS grid and the named spacings; a move of +-delta is kept when it lowers the error, delta halves
   when a sweep keeps none.
Cost (network evaluations per noise sample): reference_nfe + candidates (the denoiser at each candidate
state) + nfe x (starting grids + evaluations of the descent, at most 8 + max_evals), e.g. 192 + 48 + 10 x 168
~ 1920 at NFE 10 with the defaults. The result only ever lowers the error on the fitting batch below that of the default grid.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import UnifuseError, choose
from .ancestral import ddim_coefficients
from .plan import schedule

F64 = torch.float64

# sampler -> rows (nfe, spacing, sigma_min, sigma_max[, "analytic"]), chosen at nfe = 3, 4, 5, 6, 8, 10, 12, 15, 20
# as the configuration (spacing logsnr or karras, sigma_min in {path, 0.02, 0.03, 0.05, 0.1, 0.2}, sigma_max in
# {path, 80, 20, 10, 5, 2, 1}) of least geometric-mean error ratio to the best over three exact problems (`python
# bench/samplers.py`, docs/benchmarks/samplers.md). Rows at nfe 3-6 of unipc, dpmpp_2m/3m, euler and ipndm were
# chosen again with the analytic first step as a candidate ("analytic": spacing logsnr or karras, sigma_min in
# {0.05, 0.1, 0.2, 0.3, 0.5}, sigma_max in {5, 10, 20, 40}; 2 was measured too and left out: it won on the exact
# problems and lost on latent MNIST, whose latents are not small against it) over those problems and two
# trained networks (the 5-minute digits model, the 20-minute latent MNIST model: FD of 1,000 samples, validation seed
# 0); among scores within 3% of the best the row kept the evaluated first step if it was among them, else took the
# larger sigma_max (the analytic step's error on
# data of scale s is ~ s^2 / (2 sigma_max^2)). It won at 3-5 NFE (digits FD 2.28 -> 0.83 at NFE 3, latent MNIST
# 7.4 -> 2.2), lost from 8 on (`python bench/default_grids.py`, docs/benchmarks/default-grids.json).
# A budget takes the row of the smallest listed nfe >= it;
# LATE_ROW covers 21..50 (measured at 25, 35, 50: 1.0-1.5x the best, against 1.2-3.5x for the path's whole
# range). Only rows up to FEW_STEP_MAX are used (below). None: the path's end.
DEFAULT_TABLE = {
    "dpm_solver_1": ((3, "logsnr", 0.2, 1.0), (4, "karras", 0.2, 2.0), (6, "logsnr", 0.1, 2.0),
                     (10, "logsnr", 0.1, 5.0), (12, "karras", 0.1, 5.0), (15, "karras", 0.05, 10.0),
                     (20, "logsnr", 0.05, 10.0)),  # measured as "ddim", the same method
    "dpm_solver_3": ((3, "logsnr", 0.2, 1.0), (4, "karras", 0.2, 2.0), (6, "logsnr", 0.1, 2.0), (8, "logsnr", 0.1, 5.0),
                     (10, "logsnr", 0.1, 2.0), (12, "logsnr", None, 2.0), (20, "logsnr", None, 5.0)),
    "dpmpp_2m": ((3, "karras", 0.3, 5.0, "analytic"), (4, "karras", 0.1, 5.0, "analytic"),
                 (5, "logsnr", 0.1, 10.0, "analytic"), (6, "logsnr", 0.1, 20.0, "analytic"), (8, "logsnr", 0.1, 10.0),
                 (10, "logsnr", 0.05, 10.0), (15, "logsnr", 0.03, 10.0), (20, "logsnr", 0.02, 10.0)),
    "dpmpp_2s": ((3, "logsnr", 0.2, 1.0), (4, "karras", 0.2, 2.0), (6, "logsnr", 0.1, 2.0), (8, "logsnr", 0.03, 2.0),
                 (10, "logsnr", 0.03, 5.0), (12, "logsnr", 0.03, 10.0), (15, "logsnr", None, 10.0),
                 (20, "logsnr", 0.03, 10.0)),
    "dpmpp_3m": ((3, "karras", 0.3, 5.0, "analytic"), (4, "karras", 0.1, 5.0, "analytic"),
                 (5, "logsnr", 0.2, 20.0, "analytic"), (6, "logsnr", 0.1, 5.0), (8, "logsnr", 0.1, 10.0),
                 (10, "logsnr", 0.05, 10.0), (15, "logsnr", 0.03, 10.0), (20, "logsnr", None, 10.0)),
    "euler": ((3, "logsnr", 0.3, 10.0, "analytic"), (4, "karras", 0.2, 5.0, "analytic"), (5, "karras", 0.2, 10.0, "analytic"),
              (6, "logsnr", 0.1, 10.0, "analytic"), (8, "logsnr", 0.1, 5.0), (10, "logsnr", 0.1, 20.0),
              (15, "logsnr", 0.05, 5.0), (50, "karras", 0.05, 20.0)),
    "heun": ((3, "logsnr", 0.2, 1.0), (4, "karras", 0.2, 2.0), (5, "logsnr", 0.1, 2.0), (8, "logsnr", 0.1, 5.0),
             (10, "logsnr", 0.05, 5.0), (12, "logsnr", 0.03, 5.0), (15, "logsnr", 0.02, 10.0),
             (20, "karras", None, 10.0)),
    "ipndm": ((3, "logsnr", 0.3, 10.0, "analytic"), (4, "karras", 0.2, 5.0, "analytic"), (5, "karras", 0.2, 10.0, "analytic"),
              (6, "logsnr", 0.1, 10.0, "analytic"), (8, "karras", 0.05, 5.0), (10, "karras", 0.05, 10.0),
              (15, "karras", 0.03, 10.0), (20, "karras", 0.02, 10.0)),
    "unipc": ((3, "karras", 0.3, 5.0, "analytic"), (4, "karras", 0.1, 5.0, "analytic"), (5, "karras", 0.1, 20.0, "analytic"),
              (6, "logsnr", 0.1, 5.0), (8, "logsnr", 0.05, 5.0), (12, "logsnr", 0.03, 5.0), (15, "logsnr", 0.02, 5.0),
              (20, "karras", None, 5.0)),
}
# unmeasured samplers take the rows of their closest relative (the same steps at these budgets). "ddim" keeps its
# Karras grid over the path's whole range: progressive distillation trains its students on that grid
# (distill/progressive.py `ddim_grid`) and they are sampled with uf.sample's ddim defaults.
DEFAULT_TABLE.update(dpm_solver_2=DEFAULT_TABLE["dpm_solver_3"],
                     midpoint=DEFAULT_TABLE["heun"], edm_stochastic=DEFAULT_TABLE["heun"])  # EDM's: Heun + churn
LATE_ROW = (50, None, None, 10.0)  # 21..50 (measured, not used: FEW_STEP_MAX): a jump to sigma 10, then own spacing
# Above 12 NFE the table is not used: every sampler keeps its own spacing over the path's whole range. The rows'
# truncated ranges win on exact denoisers (ODE error), but a trained network is not one: the 20-CPU-minute latent
# MNIST model (bench/latent.py) sampled by heun at 20 NFE scores 3.11x the real floor on the row (karras, sigma_max
# 10) against 2.45x on Karras' whole range (same noise, 3 draws), and at 15-20 NFE the rows already lost to the peers
# on the 64-D mixture (docs/benchmarks/samplers.md).
FEW_STEP_MAX = 12


def default_grid(sampler: str, nfe: int) -> dict:
    """The grid keywords (spacing, sigma_min, sigma_max, first_step) `uf.sample` uses for `sampler` at `nfe`
    when the caller gives no spacing; {} for samplers that keep their own spacing over the path's whole range
    (stochastic ones, consistency, adaptive, average)."""
    from . import get

    spacing = get(sampler).spacing
    rows = DEFAULT_TABLE.get(sampler)
    if rows is None:
        return {}
    if nfe > FEW_STEP_MAX:
        return {"spacing": spacing}
    for max_nfe, sp, lo, hi, *first in (*rows, LATE_ROW):
        if nfe <= max_nfe:
            return {"spacing": sp or spacing, "sigma_min": lo, "sigma_max": hi,
                    "first_step": first[0] if first else "evaluated"}
    return {"spacing": spacing}


# --- optimize_grid ------------------------------------------------------------------------------------------
FITTABLE = ("step", "stage")
NAMED = ("logsnr", "karras", "uniform", "shift")  # starting grids besides the default and GITS


def _steps_for(path, sampler: str, nfe: int, start: float, options: dict) -> int:
    """Number of grid steps (ending on the data) on which sampler costs exactly nfe (a user grid's rule)."""
    from ..sampling import grid_cost

    for k in range(1, nfe + 2):
        lam = torch.linspace(-10.0, 10.0, k, dtype=F64)[1:] if k > 1 else torch.zeros(0, dtype=F64)
        ts = torch.cat([torch.tensor([start], dtype=F64), path.t_from_log_snr(lam).clamp(max=start * (1 - 1e-9)),
                        torch.tensor([path.t_min], dtype=F64)])
        cost, _ = grid_cost(sampler, ts, path, options)
        if cost == nfe:
            return k
        if cost > nfe:
            break
    costs = sorted({grid_cost(sampler, torch.linspace(start, path.t_min, k + 1, dtype=F64), path, options)[0]
                    for k in range(1, nfe + 2)})
    raise UnifuseError(f"sampler {sampler!r} cannot spend exactly nfe={nfe} on a grid of its own steps; "
                       f"use nfe in {[c for c in costs if c <= nfe + 4]}")


def _reference_trajectory(model, noise, ts_fine, every: int, cond):
    """Reference states at every `every`-th time of the fine grid, and the reference samples (unipc)."""
    from ..sampling import sample

    x, traj = sample(model, noise, "unipc", spacing=ts_fine, cond=cond, return_trajectory=True)
    states = [traj.states[i].to(F64) for i in range(0, len(ts_fine) - 1, every)]
    return states, x.to(F64)


class GitsTable(NamedTuple):
    """Candidate times (the first one the noise end), jump costs between them (the last column: the final
    denoise), the cost of the free analytic jump from the noise end to each, and the reference samples."""

    cand: torch.Tensor
    cost: list
    free: list
    x_ref: torch.Tensor
    t_min: float


def gits_table(model, noise, candidates: int = 48, refine: int = 4, cond=None, start=None) -> GitsTable:
    """GITS's costs (Chen et al. 2024) on a reference trajectory from the noise end (`start`): `candidates`
    times evenly spaced in log-SNR; the cost of a jump c_i -> c_j is the distance between one first-order (DDIM)
    step from the reference state at c_i and the reference state at c_j; the free jump from the noise end is
    the same DDIM step with x0-hat = 0 (`uf.sample`'s first_step="analytic")."""
    path = model.path
    t0 = float(path.t_max if start is None else start)
    lam_top = float(path.log_snr(torch.tensor(t0, dtype=F64)))
    lam_lo = max(lam_top, -2 * math.log(80.0))  # candidates start at sigma = 80 at most (or at t0)
    lam_hi = min(float(path.log_snr(torch.tensor(path.t_eps, dtype=F64))), -2 * math.log(0.002))
    lam = torch.linspace(lam_lo, lam_hi, candidates * refine + 1, dtype=F64)[1:]
    fine = torch.cat([torch.tensor([t0], dtype=F64), path.t_from_log_snr(lam), torch.tensor([path.t_min], dtype=F64)])
    if not bool((fine[1:] < fine[:-1]).all()):
        raise UnifuseError(f"cannot build a candidate grid on {path!r} from t = {t0}; use fewer candidates")
    states, x_ref = _reference_trajectory(model, noise, fine, refine, cond)
    cand = fine[:-1:refine][: len(states)]
    n = len(cand)
    sch = schedule(path, cand.tolist())
    a, s, lam_c = sch.alpha, sch.sigma, sch.lam
    with torch.no_grad():
        x0 = [model.denoise(states[i].to(noise.dtype), cand[i].expand(noise.shape[0]).to(noise.dtype), **(cond or {}))
              .to(F64) for i in range(n)]
    rms = lambda d: float(d.square().mean().sqrt())

    def jump(i, j, guess):  # one DDIM step c_i -> c_j against the reference, in x_t / sqrt(alpha^2 + sigma^2)
        c_x, c_0, _ = ddim_coefficients(a[i], s[i], lam_c[i], a[j], s[j], lam_c[j])
        return rms(c_x * states[i] + c_0 * guess - states[j]) / math.hypot(a[j], s[j])

    cost = [[jump(i, j, x0[i]) if j > i else math.inf for j in range(n)] + [rms(x0[i] - x_ref)] for i in range(n)]
    free = [jump(0, j, torch.zeros_like(x0[0])) if j > 0 else math.inf for j in range(n)] + [math.inf]
    return GitsTable(cand, cost, free, x_ref, float(path.t_min))


def gits_path(table: GitsTable, steps: int, analytic_first: bool = False) -> torch.Tensor:
    """The `steps`-step grid that minimises the summed jump costs of `table`, by dynamic programming; with
    analytic_first the path takes the free jump from the noise end first and the grid starts where it lands."""
    n, INF = len(table.cand), math.inf
    total = steps + int(analytic_first)
    best = [[INF] * (n + 1) for _ in range(total + 1)]  # best[k][j]: cheapest k-jump path from candidate 0 to j
    back = [[-1] * (n + 1) for _ in range(total + 1)]
    best[0][0] = 0.0
    for k in range(1, total + 1):
        row = table.free if analytic_first and k == 1 else None
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + (row[j] if row is not None else table.cost[i][j]) if i < n else INF
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    if not math.isfinite(best[total][n]):
        raise UnifuseError(f"{steps} steps do not fit between {n} candidate times; raise candidates")
    idx, j = [], n
    for k in range(total, 0, -1):
        j = back[k][j]
        idx.append(j)
    idx = list(reversed(idx))[int(analytic_first):]  # an analytic grid starts where the free jump lands
    return torch.cat([table.cand[idx], torch.tensor([table.t_min], dtype=F64)])


def _error(model, noise, sampler, grid, x_ref, cond, options) -> float:
    from ..sampling import sample

    try:
        x = sample(model, noise, sampler, spacing=grid, cond=cond, **options)
    except UnifuseError:
        return math.inf
    err = float((x.to(F64) - x_ref).square().mean().sqrt())
    return err if math.isfinite(err) else math.inf


def refine_grid(model, noise, sampler, grid, x_ref, *, delta: float = 1.0, delta_min: float = 0.05,
                max_evals: int = 160, cond=None, options=None, err0: float | None = None, start_above=None):
    """Coordinate descent on the log-SNR positions of grid[1:-1] (grid[0], the start, and the data end stay):
    each time moves by +-delta in full log-SNR within its neighbours while that lowers the RMS error of the
    sampler's samples against x_ref (`_error`); delta halves after a sweep with no accepted move.
    start_above (a time, the noise end): grid[0] moves too, staying below it (a grid reached by the analytic
    first step). Returns (grid, error)."""
    path, options = model.path, dict(options or {})
    lam = path.log_snr(grid).clone()
    first = 0 if start_above is not None else 1
    lam_top = float(path.log_snr(torch.tensor(start_above, dtype=F64))) if start_above is not None else -math.inf
    lam_max = min(float(path.log_snr(torch.tensor(path.t_eps, dtype=F64))), -2 * math.log(1e-4))
    best = _error(model, noise, sampler, grid, x_ref, cond, options) if err0 is None else err0
    evals, gap = 0, 1e-3

    def grid_of(lv):
        return torch.cat([grid[:first], path.t_from_log_snr(lv[first:-1]), grid[-1:]])

    while delta >= delta_min and evals < max_evals:
        moved = False
        for i in range(first, lam.numel() - 1):
            below = float(lam[i - 1]) if i > 0 else lam_top
            lo = below + gap if math.isfinite(below) else -math.inf
            hi = float(lam[i + 1]) - gap if i + 1 < lam.numel() - 1 else lam_max
            for d in (delta, -delta):
                v = min(max(float(lam[i]) + d, lo), hi)
                if abs(v - float(lam[i])) < 1e-9 or evals >= max_evals:
                    continue
                trial = lam.clone()
                trial[i] = v
                g = grid_of(trial)
                if not bool((g[1:] < g[:-1]).all()):
                    continue
                err = _error(model, noise, sampler, g, x_ref, cond, options)
                evals += 1
                if err < best:
                    best, lam, moved = err, trial, True
                    break
        if not moved:
            delta /= 2
    return grid_of(lam), best


def optimize_grid(model, noise: torch.Tensor, nfe: int, sampler: str = "dpmpp_2m", *, reference_nfe: int = 192,
                  candidates: int = 48, max_evals: int = 160, delta: float = 1.0, delta_min: float = 0.05,
                  cond: dict | None = None, first_step: str | None = None, return_info: bool = False,
                  **options) -> torch.Tensor:
    """A native-time grid fitted to `model` for `sampler` at exactly `nfe` evaluations (module docstring).

    noise: a small batch of the model's own standard-normal noise, e.g. 32-64 images; the grid is fitted to
    the samples from this noise. reference_nfe: evaluations per sample of the reference solution (a multiple
    of `candidates`). max_evals: sampler runs of the coordinate descent. Cost in network evaluations:
    batch x (reference_nfe + candidates + nfe x (8 + max_evals)) at most. first_step: "evaluated" (the grid
    starts at the noise end), "analytic" (it starts below, reached by `uf.sample`'s free analytic first step, and
    that start is fitted too) or None (default: both kinds of starting grid compete, the better is refined).
    Returns the grid t_0 > ... > t_K = t_min that `uf.sample(model, noise, sampler, spacing=grid)` takes
    (its cost there is exactly nfe); with return_info also a dict of the errors on the fitting batch."""
    from ..parameterization.kinds import defined_at_zero_snr
    from ..sampling import _check_nfe, _grid_options, planned_grid
    from . import get

    spec = get(sampler)
    nfe = _check_nfe(nfe)
    if spec.cost not in FITTABLE or (spec.stochastic and sampler != "ddim"):
        raise UnifuseError(f"optimize_grid fits deterministic ODE samplers; {sampler!r} is not one "
                           "(use e.g. 'dpmpp_2m', 'unipc', 'dpmpp_3m', 'heun' or 'euler')")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or not noise.is_floating_point():
        raise UnifuseError("noise must be a floating-point tensor [batch, ...] of standard normal values")
    path = model.path
    first_steps = ("evaluated", "analytic") if first_step is None else (choose("first_step", first_step,
                                                                             ("evaluated", "analytic")),)
    zero_ok = defined_at_zero_snr(getattr(model, "prediction", None))
    spacing, kw = _grid_options(model, sampler, nfe, None, dict(rho=7.0, shift=3.0, sigma_min=None, sigma_max=None),
                                None)  # the default grid uf.sample uses without a spacing
    kw["first_step"] = "evaluated"  # the noise end: where the reference starts
    start = float(planned_grid(path, sampler, nfe, spacing, kw, zero_ok, options)[0][0])  # the noise end
    table = gits_table(model, noise, candidates, max(1, reference_nfe // candidates), cond, start)
    inits = _starting_grids(path, sampler, nfe, spacing, kw, start, table, first_steps, zero_ok, options)
    errs = {k: _error(model, noise, sampler, g, table.x_ref, cond, options) for k, g in inits.items()}
    first = min(errs, key=errs.get)
    above = start if float(inits[first][0]) < start else None  # an analytic grid: its first time moves too
    grid, err = refine_grid(model, noise, sampler, inits[first], table.x_ref, delta=delta, delta_min=delta_min,
                            max_evals=max_evals, cond=cond, options=options, err0=errs[first], start_above=above)
    if return_info:
        return grid, {"start": first, "errors": errs, "error": err, "steps": grid.numel() - 1}
    return grid


def _starting_grids(path, sampler, nfe, spacing, kw, start, table, first_steps, zero_ok, options) -> dict:
    """The descent's candidate starting grids, each costing exactly nfe: with the evaluated first step, GITS and
    the default and named spacings from the noise end; with the analytic one, GITS from the free jump and the
    default grid read at its sigma_max."""
    from ..sampling import noise_end_grid

    inits = {}
    if "evaluated" in first_steps:
        steps = _steps_for(path, sampler, nfe, start, options)
        inits["gits"] = gits_path(table, steps)
        full = dict(kw, sigma_min=None, sigma_max=None)
        for name, sp, grid_kw in [("default", spacing, kw)] + [(sp, sp, full) for sp in NAMED]:
            g = _user_default(path, steps, sp, start, grid_kw, zero_ok)
            if g is not None:
                inits[name] = g
    if "analytic" in first_steps:
        akw = dict(kw, first_step="analytic")
        top = float(noise_end_grid(path, 2, spacing, akw, zero_ok)[0])  # where the analytic default grid starts
        g = _user_default(path, _steps_for(path, sampler, nfe, top, options), spacing, top, akw, zero_ok)
        if g is not None and top < start:
            inits["default, analytic"] = g
        try:
            g = gits_path(table, _steps_for(path, sampler, nfe, float(table.cand[1]), options), analytic_first=True)
            inits["gits, analytic"] = g
        except UnifuseError:
            pass
    return inits


def _user_default(path, steps, spacing, start, kw, zero_ok):
    """A grid of `steps` steps from `uf.sample`'s construction (`noise_end_grid`) that starts at `start`, or None."""
    from ..sampling import noise_end_grid

    try:
        g = noise_end_grid(path, steps, spacing, kw, zero_ok)
    except UnifuseError:
        return None
    if abs(float(g[0]) - start) > 1e-9 * max(1.0, abs(start)):  # starts elsewhere (e.g. below a zero-SNR end)
        return None
    g = torch.cat([torch.tensor([start], dtype=F64), g[1:]])  # the same start to the last bit
    return g if bool((g[1:] < g[:-1]).all()) else None

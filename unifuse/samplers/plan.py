"""Sampler plans: the time-only work of sampling on a grid, done before the loop and kept where the caller
keeps it (after k-diffusion's and EDM's loops, where the schedule is read once per grid).

A plan holds, per grid, the checked float64 grid, its `Schedule` (alpha, sigma, their derivatives and the
half log-SNR as Python floats), per-grid sampler constants (e.g. DDIM's step coefficients), and the network
inputs of every grid time (coefficients, time input, input scale: one vectorised schedule computation) with
the once-per-grid check that the model's prediction kind converts to the pair there. `uf.sample` and every
`sample_*` function make a fresh plan per call unless given one:

    plan = uf.samplers.Plan()
    for noise in batches:
        x = uf.sample(model, noise, "dpmpp_2m", nfe=25, plan=plan)   # set-up work on the first call only

Entries are keyed by everything they depend on (the path, the model's prediction kind, time input and input
scaling, the grid, and the batch size, dtype and device), at most `size` of them, the oldest dropped first;
nothing is kept on models or paths.

A model seen on another path (`model.on`) is a time change: its plan entry is the rescaling at equal log-SNR
and the source's own network inputs at the mapped times. Other transforms (guidance, thresholding) are called
through their `evaluate`, one call per evaluation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..errors import UnifuseError
from ..model import DiffusionModel, Evaluation, NetworkInput, ReexpressedModel, evaluate_network
from ..parameterization.convert import Coefficients, compute_dtype
from ..parameterization.kinds import valid_times
from ..parameterization.precond import input_scale
from ..paths.base import as_time, equal_log_snr

F64 = torch.float64


# --- the grid's coefficients ------------------------------------------------------------------------
class Schedule(NamedTuple):
    """alpha, sigma, their time derivatives and the half log-SNR lambda = log(alpha/sigma) at each grid
    time, as Python floats (float64); lambda is -inf where alpha = 0 and +inf where sigma = 0."""

    t: list
    alpha: list
    sigma: list
    d_alpha: list
    d_sigma: list
    lam: list

    @property
    def ends_on_data(self) -> bool:
        return self.sigma[-1] == 0.0


def schedule(path, ts, tensors: bool = False):
    """The float64 coefficients of `path` at the times `ts` (computed once, on the CPU); with tensors=True
    also the (alpha, sigma, d_alpha, d_sigma) tensors themselves."""
    ts = torch.as_tensor(ts, dtype=F64).cpu().flatten()
    a, s, da, ds = coef = path.coefficients(ts)
    lam = torch.log(a) - torch.log(s)  # exact to rounding (a difference of logs); +inf at sigma = 0, -inf at alpha = 0
    sch = Schedule(*(v.tolist() for v in (ts, a, s, da, ds, lam)))
    return (sch, coef) if tensors else sch


def check_grid(ts) -> torch.Tensor:
    """A float64 CPU grid that decreases strictly (one clear error otherwise)."""
    ts = torch.as_tensor(ts, dtype=F64).cpu().flatten()
    if ts.numel() < 2:
        raise UnifuseError(f"a sampler needs a grid of at least 2 times (start and end), got {ts.tolist()}")
    d = ts[1:] - ts[:-1]
    if not bool((d < 0).all()):
        k = int(torch.nonzero(d >= 0)[0])
        raise UnifuseError(f"time grid must decrease strictly; t[{k}]={float(ts[k])} -> t[{k + 1}]={float(ts[k + 1])}")
    return ts


class GridPlan(NamedTuple):
    """The time-only work of one grid on one path: the checked grid, its `Schedule`, the coefficient
    tensors, and a table for sampler-specific per-grid constants (e.g. DDIM's step coefficients)."""

    ts: torch.Tensor
    sch: Schedule
    coef: tuple
    constants: dict


def remember(table: dict, key, make: Callable, size: int = 16, keep: Callable | None = None):
    """table[key], made by make() on a miss; at most `size` keys (the oldest dropped first). An unhashable
    key, or a value for which keep(value) is false, is not kept. Values are shared between calls: callers
    never modify them."""
    try:
        return table[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable setting (e.g. a list): compute, do not cache
        return make()
    value = make()
    if keep is not None and not keep(value):
        return value
    while len(table) >= size:
        table.pop(next(iter(table)), None)
    table[key] = value
    return value


# --- the plan ------------------------------------------------------------------------------------------
class Plan:
    """Set-up work of sampling calls, kept as long as the caller keeps this object (see the module docstring).

    size: the most entries kept (grids, network inputs, `uf.sample` grids), the oldest dropped first."""

    def __init__(self, size: int = 64):
        self.size, self.table = int(size), {}

    def __len__(self) -> int:
        return len(self.table)

    def remember(self, key, make: Callable, keep: Callable | None = None):
        """The entry under `key`, made by make() on a miss (see `remember`)."""
        return remember(self.table, key, make, self.size, keep)

    def grid(self, path, ts) -> GridPlan:
        """`check_grid` and `schedule` of ts on path."""
        ts = torch.as_tensor(ts, dtype=F64).detach().cpu().flatten()

        def make():
            checked = check_grid(ts)
            sch, coef = schedule(path, checked, tensors=True)
            return GridPlan(checked, sch, coef, {})

        return self.remember(("grid", path, ts.numpy().tobytes()), make)

    def network_inputs(self, model, grid: GridPlan, like: torch.Tensor) -> dict:
        """{t: prepared evaluation} for every grid time but the last, from the grid's own coefficients."""
        n = len(grid.sch.t) - 1

        def make():
            coefficients = tuple(c[:n] for c in grid.coef)
            return dict(zip(grid.sch.t[:n], prepare_grid(model, grid.ts[:n], like, coefficients)))

        key = grid_key(model)
        if key is None:
            return make()
        key = ("prepared", grid.ts.numpy().tobytes(), key, like.device, like.dtype, like.shape[0], like.ndim)
        return self.remember(key, make, keep=_no_grad)


def as_plan(plan, name: str) -> Plan:
    """`plan`, or a new plan for one call when None (one clear error for anything else)."""
    if plan is None:
        return Plan()
    if not isinstance(plan, Plan):
        raise UnifuseError(f"{name}: plan must be a uf.samplers.Plan (or None), got {type(plan).__name__}")
    return plan


# --- which models a plan prepares ----------------------------------------------------------------------
def preparable(model) -> bool:
    """A model whose evaluations a plan prepares: a `DiffusionModel` itself (not a transform or a subclass,
    which are called through their `evaluate`) or one seen on another path."""
    return type(model) is DiffusionModel or isinstance(model, ReexpressedModel)


def _pure(fn) -> bool:
    """A time_input whose output depends on t alone as far as we can tell: none, or a function or method
    that is not a torch module's (a module's parameters may change between calls)."""
    return fn is None or (not isinstance(fn, nn.Module) and not isinstance(getattr(fn, "__self__", None), nn.Module))


def grid_key(model):
    """Everything `prepare_grid` reads besides the grid and x's batch, dtype and device (None: not kept, e.g.
    a time input that is a module, whose parameters may change between calls)."""
    if isinstance(model, ReexpressedModel):
        source = model.source
        if not preparable(source):  # the source is called through its evaluate
            return (model.path, source, source.path, None)
        key = grid_key(source)
        return None if key is None else (model.path, source, source.path, key)
    if not _pure(model.time_input):
        return None
    return (model.path, model.prediction, model.time_input, model.scale_input, model.sigma_data)


def _no_grad(prepared: dict) -> bool:
    """Prepared evaluations that carry no autograd graph (a time input with parameters makes one per call)."""
    return not any(isinstance(v, torch.Tensor) and v.requires_grad
                   for p in prepared.values() if p is not None for v in _leaves(p))


def _leaves(p):
    for v in p:
        if isinstance(v, tuple):
            yield from _leaves(v)
        else:
            yield v


# --- network inputs of a whole grid at once ------------------------------------------------------------
def prepare_grid(model, ts, like: torch.Tensor, coefficients=None) -> list:
    """The prepared evaluation of each time of the 1-D grid `ts` for a `preparable` model (one vectorised
    schedule computation; `coefficients`: the path's (alpha, sigma, d_alpha, d_sigma) at ts if known)."""
    ts = as_time(ts).to(F64).flatten().cpu()
    if isinstance(model, ReexpressedModel):
        return _prepare_reexpressed(model, ts, like, coefficients)
    return _prepare_network(model, ts, like, coefficients)


def _prepare_network(model, ts, like, coefficients) -> list:
    n, B, ones = ts.numel(), like.shape[0], (1,) * (like.ndim - 1)
    coefficients = model.path.coefficients(ts) if coefficients is None else coefficients
    checked = valid_times(model.prediction, Coefficients(*coefficients))
    coef = torch.stack(tuple(coefficients), 1).to(like.device, compute_dtype(like))  # [n, 4]
    coef = coef.reshape((n * 4, 1) + ones).expand((n * 4, B) + ones).unbind(0)        # 4n views [B, 1, ...]
    t_dev = ts.to(like.device)
    t_in = model.time_input(t_dev) if model.time_input is not None else t_dev
    t_in = t_in.to(like.dtype if like.dtype == F64 else torch.float32)
    times, inputs = t_dev[:, None].expand(n, B).unbind(0), t_in[:, None].expand(n, B).unbind(0)
    out = []
    for k in range(n):
        c = Coefficients(*coef[4 * k:4 * k + 4])
        x_scale = input_scale(c, model.sigma_data).to(like.dtype) if model.scale_input else None
        out.append(NetworkInput(times[k], c, inputs[k], x_scale, checked[k]))
    return out


def _prepare_reexpressed(model, ts, like, coefficients) -> list:
    """(scale, source time, the source's prepared evaluation or None) per time."""
    model.check_times(ts)
    alpha, sigma = (None, None) if coefficients is None else coefficients[:2]
    t_src, scale = equal_log_snr(model.path, model.source.path, ts, alpha, sigma)
    scale = scale.to(like.device, like.dtype)
    src = prepare_grid(model.source, t_src, like) if preparable(model.source) else [None] * ts.numel()
    return [(scale[k], t_src[k], src[k]) for k in range(ts.numel())]


def evaluate_prepared(model, x: torch.Tensor, prepared, **cond) -> Evaluation:
    """`model.evaluate(x, t)` with the time-only work `prepared` (from `prepare_grid`) done in advance."""
    if isinstance(model, ReexpressedModel):
        scale, t_src, src = prepared
        if src is None:
            return model.source.evaluate(x * scale, t_src, **cond)
        return evaluate_prepared(model.source, x * scale, src, **cond)
    return evaluate_network(model, x, prepared, **cond)


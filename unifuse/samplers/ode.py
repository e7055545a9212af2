"""Probability-flow ODE solvers in the path's native time: Euler, Heun and EDM's stochastic sampler
(Karras et al. 2022, Algorithms 1-2, ALGORITHMS card 6), the explicit midpoint rule (rectified flow's
midpoint sampler on the rf path), and an adaptive Dormand-Prince 5(4) solver for reference answers.

The ODE is dx/dt = u = alpha'(t) x0_hat + sigma'(t) eps_hat, so on the edm path these are EDM's samplers
(u = (x - D)/sigma) and on the rf path rectified-flow Euler / midpoint (u = noise - x0). The adaptive solver
works in the angle phi = atan(sigma/alpha) with y = x / sqrt(alpha^2 + sigma^2), where every path's ODE is
the same bounded field dy/dphi = cos(phi) eps_hat - sin(phi) x0_hat (finite at alpha = 0 and at sigma = 0).
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError
from .base import F64, linear, schedule, setup, singlestep_orders
from .dormand_prince import dormand_prince_step, error_norm, step_factor


def _ode_plan(sch, orders):
    return [(sch.t[i + 1] - sch.t[i], p) for i, p in enumerate(orders)]


def sample_euler(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None):
    """Euler's method on dx/dt = alpha' x0_hat + sigma' eps_hat in native time."""
    return _native(model, x, ts, "euler", cond, noise, callback, progress, info, plan, None, 1)


def sample_heun(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                orders=None):
    """Heun's second-order method (EDM Algorithm 1); orders[i] = 1 makes step i an Euler step."""
    return _native(model, x, ts, "heun", cond, noise, callback, progress, info, plan, orders, 2)


def sample_midpoint(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                    orders=None):
    """The explicit midpoint rule (second order) in native time; orders[i] = 1 gives an Euler step."""
    return _native(model, x, ts, "midpoint", cond, noise, callback, progress, info, plan, orders, 2)


def _native(model, x, ts, name, cond, noise, callback, progress, info, plan, orders, max_order):
    ev, sch, x, _ = setup(name, model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = singlestep_orders(sch, orders, max_order, name, zero_snr_first_order=False)
    mids = {}
    if name == "midpoint":
        for i, p in enumerate(orders):
            if p == 2:
                tm = 0.5 * (sch.t[i] + sch.t[i + 1])
                mids[i] = (tm,) + tuple(schedule(model.path, [tm])[k][0] for k in (3, 4))
                ev.prepare(tm)
    for i in ev.steps(len(sch.t) - 1):
        e = ev(x, sch.t[i])
        if i == len(orders):
            x = e.x0
        else:
            x = _native_step(ev, sch, i, x, e, orders[i], name, mids.get(i))
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


def native_coefficients(dt: float, da_s: float, ds_s: float, da_t: float, ds_t: float) -> tuple:
    """The weights of (x0_hat, eps_hat) in a native-time step of size dt: Euler's at s, then Heun's
    trapezoidal ones at s and at t."""
    return dt * da_s, dt * ds_s, 0.5 * dt * da_s, 0.5 * dt * ds_s, 0.5 * dt * da_t, 0.5 * dt * ds_t


def _native_step(ev, sch, i, x, e, p, name, mid=None, t_from=None, coef_from=None):
    """One Euler / Heun / midpoint step from t_i (or t_from) to t_{i+1} given the evaluation e there."""
    s = sch.t[i] if t_from is None else t_from
    da_s, ds_s = (sch.d_alpha[i], sch.d_sigma[i]) if coef_from is None else coef_from
    t = sch.t[i + 1]
    dt = t - s
    c = native_coefficients(dt, da_s, ds_s, sch.d_alpha[i + 1], sch.d_sigma[i + 1])
    if p == 1:
        return linear(x, 1.0, [(c[0], e.x0), (c[1], e.eps)])
    if name == "midpoint":
        tm, da_m, ds_m = mid
        x_mid = linear(x, 1.0, [(0.5 * dt * da_s, e.x0), (0.5 * dt * ds_s, e.eps)])
        e2 = ev(x_mid, tm)
        return linear(x, 1.0, [(dt * da_m, e2.x0), (dt * ds_m, e2.eps)])
    x_e = linear(x, 1.0, [(c[0], e.x0), (c[1], e.eps)])
    e2 = ev(x_e, t)
    return linear(x, 1.0, [(c[2], e.x0), (c[3], e.eps), (c[4], e2.x0), (c[5], e2.eps)])


def sample_edm_stochastic(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                          orders=None,
                          S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0):
    """EDM Algorithm 2: raise the noise level by gamma = min(S_churn/N, sqrt(2) - 1) inside [S_tmin, S_tmax]
    (EDM sigma = sigma/alpha), then take a Heun step (Euler where orders[i] = 1) in native time."""
    for k, v in (("S_churn", S_churn), ("S_tmin", S_tmin), ("S_noise", S_noise)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise UnifuseError(f"edm_stochastic: {k} must be a finite number >= 0, got {v!r}")
    ev, sch, x, rng = setup("edm_stochastic", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = singlestep_orders(sch, orders, 2, "edm_stochastic", zero_snr_first_order=False)
    path, K = model.path, len(sch.t) - 1
    top = float(path.sigma_edm(torch.tensor(float(getattr(model, "t_max", path.t_max)), dtype=F64)))
    churn = []
    for i in range(K):
        a_i, s_i = sch.alpha[i], sch.sigma[i]
        se = s_i / a_i if a_i > 0 else math.inf
        gamma = min(S_churn / K, math.sqrt(2.0) - 1.0) if (S_tmin <= se <= S_tmax and math.isfinite(se)) else 0.0
        se_hat = min(se * (1.0 + gamma), top)
        if gamma == 0.0 or se_hat <= se:
            churn.append(None)
            continue
        t_hat = float(path.t_from_sigma_edm(torch.tensor(se_hat, dtype=F64)))
        hat = schedule(path, [t_hat])
        a_h = hat.alpha[0]
        churn.append((t_hat, a_h / a_i, a_h * math.sqrt(se_hat**2 - se**2) * S_noise, (hat.d_alpha[0], hat.d_sigma[0])))
        ev.prepare(t_hat)
    for i in ev.steps(K):
        c = churn[i]
        t_from, coef_from = None, None
        if c is not None:  # add noise: x_hat = (alpha_hat/alpha_i) x + alpha_hat sqrt(se_hat^2 - se^2) S_noise z
            t_from, ratio, std, coef_from = c
            x = linear(x, ratio, [(std, rng(x))])
        e = ev(x, sch.t[i] if t_from is None else t_from)
        if i == len(orders):
            x = e.x0
        else:
            x = _native_step(ev, sch, i, x, e, orders[i], "heun", t_from=t_from, coef_from=coef_from)
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


# --- adaptive Dormand-Prince 5(4) --------------------------------------------------------------------------
def _combine(y, h: float, weights, slopes):
    """y + h sum_j w_j k_j (h sum_j w_j k_j when y is None) as one `linear` over the slopes."""
    if y is None:
        return linear(slopes[0], weights[0] * h, [(h * w, k) for w, k in zip(weights[1:], slopes[1:])])
    return linear(y, 1.0, [(h * w, k) for w, k in zip(weights, slopes)])


def sample_adaptive(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                    rtol: float = 1e-5,
                    atol: float = 1e-5, max_nfe=None, sigma_stop=None, h_init: float = 0.05):
    """Adaptive Dormand-Prince 5(4) on the PF-ODE in phi = atan(sigma/alpha), passing through every grid time.

    A grid that ends on the data stops at the least noisy evaluable time (path.t_eps, or where
    sigma/alpha = sigma_stop) and returns the denoised estimate there from the last stage (no extra NFE).
    max_nfe: raise rather than use more evaluations. Step sizes are shared by the batch (error = worst sample)."""
    ev, sch, x, _ = setup("adaptive", model, x, ts, cond, noise, callback, progress, info, check_finite=False,
                          plan=plan)
    path = model.path
    times = list(sch.t)
    if sch.ends_on_data:  # stop where the network may still be evaluated
        t_stop = float(getattr(model, "t_eps", path.t_eps))
        if sigma_stop is None and float(path.sigma(torch.tensor(t_stop, dtype=F64))) == 0.0:
            sigma_stop = 1e-3
        if sigma_stop is not None:
            t_stop = float(path.t_from_sigma_edm(torch.tensor(float(sigma_stop), dtype=F64)))
        times[-1] = min(t_stop, times[-2])
    st = schedule(path, times)
    phis = [math.atan2(s, a) for a, s in zip(st.alpha, st.sigma)]
    norms = [math.hypot(a, s) for a, s in zip(st.alpha, st.sigma)]
    grid_time = dict(zip(phis, times))

    def field(ph, y):
        t = grid_time.get(ph)
        if t is None:
            t = float(path.t_from_log_snr(torch.tensor(2.0 * math.log(math.cos(ph) / math.sin(ph)), dtype=F64)))
        c = schedule(path, [t])
        e = ev(y * math.hypot(c.alpha[0], c.sigma[0]), t)
        if max_nfe is not None and ev.nfe > max_nfe:
            raise UnifuseError(f"adaptive: the tolerance (rtol={rtol}, atol={atol}) needs more than "
                               f"max_nfe = {max_nfe} "
                               f"evaluations (at phi = {ph:.4g}); raise nfe or loosen rtol/atol")
        return math.cos(ph) * e.eps - math.sin(ph) * e.x0, e

    y = x / norms[0]
    first = field(phis[0], y)
    h = -abs(h_init) * (phis[0] - phis[-1])
    for i in ev.steps(len(times) - 1):
        ph, target = phis[i], phis[i + 1]
        while ph > target:
            final = h <= target - ph  # h < 0: toward the data; land exactly on the grid time
            h = target - ph if final else h
            y_new, ks, es, err = dormand_prince_step(field, ph, y, first, h, _combine, target if final else None)
            ratio = float(error_norm(err, y, y_new, rtol, atol).max())
            if not math.isfinite(ratio):
                raise UnifuseError(f"adaptive: a non-finite value appeared at phi = {ph:.4g} (step {i}); "
                                   "check the model there")
            if ratio <= 1.0:
                y, ph, first = y_new, (target if final else ph + h), (ks[6], es[6])
            h = h * step_factor(ratio, 5.0)
        x_i = y * norms[i + 1]
        if i == len(times) - 2 and sch.ends_on_data:
            x_i = first[1].x0
        ev.done(i, sch.t[i + 1], x_i, first[1].x0)
    return ev.finish(x_i)

"""Single-step exponential integrators: DPM-Solver-1/2/3 in noise-prediction form (Lu et al. 2022, ALGORITHMS
card 7) and DPM-Solver++ 2S in data-prediction form (Lu et al. 2022b, card 8).

All work in the half log-SNR lambda = log(alpha/sigma); a step s -> t has h = lambda_t - lambda_s and stage
times t_lambda(lambda_s + r h). The noise-prediction updates are written in the algebraically equal form

    x_t = alpha_t x0_hat_s + sigma_t eps_hat_s - (higher-order corrections in eps),

since (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s = alpha_t x0_hat_s + sigma_t eps_s; it avoids the 1/alpha_s
blow-up near zero SNR. Noise-prediction DPM-Solver cannot step to sigma = 0 (e^h = inf), so its last step to
the data returns the denoised estimate, like every sampler. `orders` gives each step's order (the NFE rule
of `uf.sample` builds it: DPM-Solver-fast style, e.g. [3, ..., 3, 2] or [3, ..., 3, 1]); a step starting at
alpha = 0 is first order.
"""
from __future__ import annotations

import math

from .base import linear, phi, schedule, setup, singlestep_orders, t_at_lambda


def _stages(path, sch, i, fractions):
    """Native time, alpha, sigma and the realised fraction r of h for each stage of step i."""
    l_s, h = sch.lam[i], sch.lam[i + 1] - sch.lam[i]
    ts = [t_at_lambda(path, l_s + r * h) for r in fractions]
    st = schedule(path, ts)
    return [(st.t[k], st.alpha[k], st.sigma[k], (st.lam[k] - l_s) / h) for k in range(len(ts))]


def sample_dpm_solver(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                      order: int = 3, orders=None, name: str = "dpm_solver"):
    """DPM-Solver (noise prediction), single-step orders 1-3 with r = 1/2 (order 2) and 1/3, 2/3 (order 3)."""
    ev, sch, x, _ = setup(name, model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = singlestep_orders(sch, orders, order, name)
    path = model.path
    steps = []
    for i, p in enumerate(orders):
        h = sch.lam[i + 1] - sch.lam[i]
        a_t, s_t = sch.alpha[i + 1], sch.sigma[i + 1]
        if p == 1:
            steps.append((1, [], None))
        elif p == 2:
            (t1, a1, s1, r1), = _stages(path, sch, i, [0.5])
            steps.append((2, [(t1, a1, s1)], -s_t * math.expm1(h) / (2 * r1)))
        else:
            (t1, a1, s1, r1), (t2, a2, s2, r2) = _stages(path, sch, i, [1 / 3, 2 / 3])
            phi_22 = r2 * h * phi(2, r2 * h)   # (e^{r2 h} - 1)/(r2 h) - 1
            phi_2 = h * phi(2, h)              # (e^h - 1)/h - 1
            steps.append((3, [(t1, a1, s1), (t2, a2, s2)], (-(r2 / r1) * s2 * phi_22, -(1 / r2) * s_t * phi_2)))
        for st in steps[-1][1]:
            ev.prepare(st[0])
    K = len(sch.t) - 1
    for i in ev.steps(K):
        e = ev(x, sch.t[i])
        if i == len(orders):  # the final step to the data
            x = e.x0
            ev.done(i, sch.t[i + 1], x, e.x0)
            continue
        p, stages, c = steps[i]
        a_t, s_t = sch.alpha[i + 1], sch.sigma[i + 1]
        if p == 2:
            t1, a1, s1 = stages[0]
            e1 = ev(linear(e.x0, a1, [(s1, e.eps)]), t1)
            x = linear(e.x0, a_t, [(s_t, e.eps), (c, e1.eps), (-c, e.eps)])
        elif p == 3:
            (t1, a1, s1), (t2, a2, s2) = stages
            e1 = ev(linear(e.x0, a1, [(s1, e.eps)]), t1)
            u2 = linear(e.x0, a2, [(s2, e.eps), (c[0], e1.eps), (-c[0], e.eps)])
            e2 = ev(u2, t2)
            x = linear(e.x0, a_t, [(s_t, e.eps), (c[1], e2.eps), (-c[1], e.eps)])
        else:
            x = linear(e.x0, a_t, [(s_t, e.eps)])
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


def sample_dpm_solver_1(model, x, ts, **kw):
    """DPM-Solver-1 (= DDIM with eta = 0)."""
    return sample_dpm_solver(model, x, ts, order=1, name="dpm_solver_1", **kw)


def sample_dpm_solver_2(model, x, ts, *, orders=None, **kw):
    """DPM-Solver-2, single step (r1 = 1/2)."""
    return sample_dpm_solver(model, x, ts, order=2, orders=orders, name="dpm_solver_2", **kw)


def sample_dpm_solver_3(model, x, ts, *, orders=None, **kw):
    """DPM-Solver-3, single step (r1 = 1/3, r2 = 2/3)."""
    return sample_dpm_solver(model, x, ts, order=3, orders=orders, name="dpm_solver_3", **kw)


def sample_dpmpp_2s(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                    orders=None, r1: float = 0.5):
    """DPM-Solver++(2S): data prediction, one intermediate stage at lambda_s + r1 h (card 8)."""
    ev, sch, x, _ = setup("dpmpp_2s", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = singlestep_orders(sch, orders, 2, "dpmpp_2s")
    steps = []
    for i, p in enumerate(orders):
        h = sch.lam[i + 1] - sch.lam[i]
        s_s, a_t, s_t = sch.sigma[i], sch.alpha[i + 1], sch.sigma[i + 1]
        first = (s_t / s_s, -a_t * math.expm1(-h))  # x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) m_s
        if p == 1:
            steps.append((first, None))
            continue
        (t1, a1, s1, r), = _stages(model.path, sch, i, [r1])
        stage = (t1, s1 / s_s, -a1 * math.expm1(-r * h))
        corr = -a_t * math.expm1(-h) / (2 * r)  # coefficient of (m(u) - m_s)
        steps.append((first, (stage, corr)))
        ev.prepare(t1)
    K = len(sch.t) - 1
    for i in ev.steps(K):
        e = ev(x, sch.t[i])
        if i == len(orders):
            x = e.x0
        else:
            (cx, c0), extra = steps[i]
            if extra is None:
                x = linear(x, cx, [(c0, e.x0)])
            else:
                (t1, ux, u0), corr = extra
                m1 = ev(linear(x, ux, [(u0, e.x0)]), t1).x0
                x = linear(x, cx, [(c0 - corr, e.x0), (corr, m1)])
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)

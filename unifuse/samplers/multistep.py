"""Multistep solvers: DPM-Solver++ 2M / 3M and SDE-DPM-Solver++ 2M (Lu et al. 2022b, ALGORITHMS card 8),
UniPC (Zhao et al. 2023, card 9) and iPNDM (Zhang & Chen 2023, DEIS paper, improved PNDM).

Each step is a linear combination of the state and stored model outputs, with weights computed in float64
from the grid before the loop. lambda = log(alpha/sigma) is the half log-SNR, h = lambda_t - lambda_s, and
r_k = h_k/h the ratios of past steps. DPM-Solver++ 3M uses D2 = 2 (D1_0 - D1_1)/(r0 + r1), an estimate of
h^2 m'' (card 8): the reference code and diffusers omit the factor 2, which leaves 3M at order ~2.
Warm-up uses orders 1, 2, ...; a past point at zero SNR (lambda = -inf) is never used; with fewer than 15
steps the step before the final one drops to order <= 2 (`lower_order_final`, as in DPM-Solver); the final
step to the data returns the denoised estimate.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UnifuseError, choose
from .base import linear, phi, setup

INF = math.inf


def _check_order(name, order, top):
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= top:
        raise UnifuseError(f"{name}: order must be an integer in 1..{top}, got {order!r}")
    return order


def _orders(sch, order: int, lower_order_final: bool):
    """Effective order of each non-final step: limited by usable history and lower_order_final."""
    K = len(sch.t) - 1
    n = K - 1 if sch.ends_on_data else K
    out = []
    for i in range(n):
        usable = 1 + sum(1 for j in range(i) if sch.lam[j] > -INF)
        p = min(order, usable)
        if lower_order_final and K < 15 and i == n - 1 and sch.ends_on_data:
            p = min(p, 2)
        out.append(p)
    return out


def _ratios(sch, i, p):
    """r_k = (lambda_{i-k+1} - lambda_{i-k}) / h for k = 1..p-1 (past step sizes over the current one)."""
    h = sch.lam[i + 1] - sch.lam[i]
    return h, [(sch.lam[i - k + 1] - sch.lam[i - k]) / h for k in range(1, p)]


def dpmpp_weights(sch, i, p, variant: str = "midpoint"):
    """(c_x, [w_0, ..., w_{p-1}]): x_t = c_x x_s + sum_k w_k m_{i-k} (DPM-Solver++ kM, data prediction)."""
    h, r = _ratios(sch, i, p)
    s_s, a_t, s_t = sch.sigma[i], sch.alpha[i + 1], sch.sigma[i + 1]
    # x_t = (s_t/s_s) x_s + a_t h phi_1(-h) m0 + a_t h phi_2(-h) D1 + a_t h phi_3(-h) D2  (D1 ~ h m', D2 ~ h^2 m'')
    b1 = -a_t * math.expm1(-h)  # = a_t h phi_1(-h), and a_t from zero SNR (h = inf, first order only)
    b2, b3 = (a_t * h * phi(k, -h) for k in (2, 3)) if p > 1 else (0.0, 0.0)
    w = np.zeros(p)
    w[0] = b1
    if p == 2:
        d1 = np.array([1.0, -1.0]) / r[0]  # D1_0 = (m0 - m1)/r0
        w += (0.5 * b1 if variant == "midpoint" else b2) * d1
    elif p == 3:
        r0, r1 = r
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1
        D1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        D2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
        w += b2 * D1 + b3 * D2
    return s_t / s_s, [float(v) for v in w]


def run_multistep(ev, sch, x, n_steps: int, keep: int, output, step):
    """The loop every multistep method shares: evaluate, keep the newest `keep` outputs (output(e), newest
    first), and take step(i, x, e, history) -> x; after the n_steps ordinary steps, the final step to the data
    returns the denoised estimate."""
    hist = []
    for i in ev.steps(len(sch.t) - 1):
        e = ev(x, sch.t[i])
        hist = [output(e)] + hist[:keep - 1]
        x = e.x0 if i == n_steps else step(i, x, e, hist)
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


def _denoised(e):
    return e.x0


def sample_dpmpp_multistep(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                           order: int = 2,
                           variant: str = "midpoint", lower_order_final: bool = True, name: str = "dpmpp_2m"):
    """DPM-Solver++ multistep of order 2 or 3 (card 8)."""
    choose("DPM-Solver++ variant", variant, ("midpoint", "heun"))
    ev, sch, x, _ = setup(name, model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = _orders(sch, order, lower_order_final)
    weights = [dpmpp_weights(sch, i, p, variant) for i, p in enumerate(orders)]

    def step(i, x, e, hist):  # hist: the model outputs m_i, m_{i-1}, ..., newest first
        cx, w = weights[i]
        return linear(x, cx, list(zip(w, hist)))

    return run_multistep(ev, sch, x, len(orders), 3, _denoised, step)


def sample_dpmpp_2m(model, x, ts, *, variant: str = "midpoint", **kw):
    """DPM-Solver++(2M)."""
    return sample_dpmpp_multistep(model, x, ts, order=2, variant=variant, name="dpmpp_2m", **kw)


def sample_dpmpp_3m(model, x, ts, **kw):
    """DPM-Solver++(3M) with the order-3 second difference D2 = 2 (D1_0 - D1_1)/(r0 + r1)."""
    return sample_dpmpp_multistep(model, x, ts, order=3, name="dpmpp_3m", **kw)


# --- SDE-DPM-Solver++ 2M -----------------------------------------------------------------------------------
def sde_dpmpp_weights(sch, i, p, variant: str = "midpoint"):
    """(c_x, [w_0, w_1], std) of SDE-DPM-Solver++ (1 or 2M); p = 1 is the exact ancestral step."""
    h, r = _ratios(sch, i, p)
    s_s, a_t, s_t = sch.sigma[i], sch.alpha[i + 1], sch.sigma[i + 1]
    one_m = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    w = [a_t * one_m]
    if p == 2:
        c = 0.5 * a_t * one_m if variant == "midpoint" else a_t * (1.0 - one_m / (2.0 * h))
        w = [w[0] + c / r[0], -c / r[0]]
    return (s_t / s_s) * math.exp(-h), w, s_t * math.sqrt(one_m)


def sample_dpmpp_2m_sde(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                        variant: str = "midpoint", lower_order_final: bool = True):
    """SDE-DPM-Solver++(2M): x_t = (s_t/s_s) e^{-h} x_s + a_t (1 - e^{-2h}) D + s_t sqrt(1 - e^{-2h}) z."""
    choose("DPM-Solver++ variant", variant, ("midpoint", "heun"))
    ev, sch, x, rng = setup("dpmpp_2m_sde", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = _orders(sch, 2, lower_order_final)
    weights = [sde_dpmpp_weights(sch, i, p, variant) for i, p in enumerate(orders)]

    def step(i, x, e, hist):
        cx, w, std = weights[i]
        x = linear(x, cx, list(zip(w, hist)))
        return x.add_(rng(x), alpha=std)

    return run_multistep(ev, sch, x, len(orders), 2, _denoised, step)


# --- UniPC ----------------------------------------------------------------------------------------------------
def unipc_weights(sch, i, p, variant: str = "bh1"):
    """Predictor and corrector weights of UniPC-p (data prediction, card 9).

    Returns (c_x, pred [w over m_i, m_{i-1}, ...], corr [w over m_i, m_{i-1}, ...], w_new on m_{i+1});
    the corrector is None where h = inf (a step from zero SNR)."""
    h = sch.lam[i + 1] - sch.lam[i]
    s_s, a_t, s_t = sch.sigma[i], sch.alpha[i + 1], sch.sigma[i + 1]
    cx, base = s_t / s_s, -a_t * math.expm1(-h)  # x_t = cx x_s + base m_s + corrections
    if h == INF:
        return cx, [base], None, 0.0
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    rks = [(sch.lam[i - k] - sch.lam[i]) / h for k in range(1, p)] + [1.0]
    R = np.array([[rk ** j for rk in rks] for j in range(p)])
    b = np.array([hh * phi(j + 2, hh) * math.factorial(j + 1) / B for j in range(p)])
    # D_k = (m_{i-k} - m_i) / rk_k as weights over (m_i, m_{i-1}, ..., m_{i-p+1})
    D = np.zeros((p - 1, p))
    for k in range(1, p):
        D[k - 1, 0], D[k - 1, k] = -1.0 / rks[k - 1], 1.0 / rks[k - 1]
    pred = np.zeros(p)
    pred[0] = base
    if p == 2:
        pred += -a_t * B * 0.5 * D[0]
    elif p > 2:
        rho_p = np.linalg.solve(R[:-1, :-1], b[:-1])
        pred += -a_t * B * (rho_p @ D)
    rho_c = np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
    corr = np.zeros(p)
    corr[0] = base
    if p > 1:
        corr += -a_t * B * (rho_c[:-1] @ D)
    # rho_c[-1] (m_t - m_s)
    corr[0] += a_t * B * rho_c[-1]
    return cx, [float(v) for v in pred], [float(v) for v in corr], float(-a_t * B * rho_c[-1])


def sample_unipc(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                 order: int = 3, variant: str = "bh2", lower_order_final: bool = True, corrector: bool = True,
                 denoise_corrected: bool = True):
    """UniPC: UniP-p predictor plus the UniC corrector that reuses the next evaluation (no extra NFE).

    variant: "bh2" (B(h) = e^{-h} - 1, diffusers' default; the more accurate one on our Gaussian-mixture
    benchmarks) or "bh1" (B(h) = -h).
    The model is evaluated at the predictor's point; the corrected point becomes the state. The final step
    returns x0_hat of the corrected point, estimated as (x_c - sigma eps_hat)/alpha with the eps_hat of that
    evaluation (`denoise_corrected`; False returns the x0_hat of the predictor's point, as diffusers does)."""
    choose("UniPC variant", variant, ("bh1", "bh2"))
    order = _check_order("unipc", order, 3)
    ev, sch, x, _ = setup("unipc", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = _orders(sch, order, lower_order_final)
    weights = [unipc_weights(sch, i, p, variant) for i, p in enumerate(orders)]
    hist, x_start = [], None
    for i in ev.steps(len(sch.t) - 1):
        e = ev(x, sch.t[i])
        if corrector and i > 0 and weights[i - 1][2] is not None:  # UniC for the step just taken
            cx, _, corr, w_new = weights[i - 1]
            x_c = linear(x_start, cx, list(zip(corr, hist)) + [(w_new, e.x0)])
        else:
            x_c = x
        hist = [e.x0] + hist[: max(order - 1, 1)]
        if i == len(orders):
            if denoise_corrected and x_c is not x:
                x = linear(x_c, 1.0 / sch.alpha[i], [(-sch.sigma[i] / sch.alpha[i], e.eps)])
            else:
                x = e.x0
        else:
            x_start = x_c
            cx, pred, _, _ = weights[i]
            x = linear(x_c, cx, list(zip(pred, hist)))
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


# --- iPNDM ----------------------------------------------------------------------------------------------------
IPNDM = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ab_weights(rhos, p: int) -> list:
    """Variable-step Adams-Bashforth weights: the integral from rhos[0] to rhos[1] of the Lagrange basis
    through rhos[0], rhos[-1], rhos[-2], ... (p nodes: current first, then the past), divided by the step."""
    rho_s, rho_t, nodes = rhos[0], rhos[1], [rhos[0]] + list(rhos[2:2 + p - 1])
    u, g = np.polynomial.legendre.leggauss(4)  # exact for the degree <= 3 basis polynomials
    r = rho_s + 0.5 * (u + 1.0) * (rho_t - rho_s)
    w = []
    for j, nj in enumerate(nodes):
        L = np.ones_like(r)
        for k, nk in enumerate(nodes):
            if k != j:
                L *= (r - nk) / (nj - nk)
        w.append(float(0.5 * (g * L).sum()))
    return w


def sample_ipndm(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                 order: int = 4, lower_order_final: bool = True, variable: bool = True):
    """iPNDM: Adams-Bashforth of order <= 4 on dy/drho = eps_hat, y = x/alpha, rho = sigma/alpha.

    variable=False uses PNDM's fixed coefficients (which assume equal steps in rho; the order drops to 2 on
    other grids); variable=True integrates the interpolating polynomial of the past eps over the actual
    step (DEIS's rho-AB). Written as x_t = alpha_t x0_hat_s + sigma_t eps_s + alpha_t (rho_t - rho_s)
    sum_j c_j (eps_{s-j} - eps_s): the Euler (= DDIM) step plus the multistep correction."""
    order = _check_order("ipndm", order, 4)
    ev, sch, x, _ = setup("ipndm", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    orders = _orders(sch, order, lower_order_final)
    rho = [s / a if a > 0 else INF for a, s in zip(sch.alpha, sch.sigma)]
    coefs = []
    for i, p in enumerate(orders):
        if p == 1:
            coefs.append([1.0])
        elif not variable:
            coefs.append(IPNDM[p])
        else:
            coefs.append(ab_weights([rho[i], rho[i + 1]] + [rho[i - k] for k in range(1, p)], p))
    def step(i, x, e, hist):  # hist: eps_i, eps_{i-1}, ..., newest first
        a_t, s_t, c = sch.alpha[i + 1], sch.sigma[i + 1], coefs[i]
        terms = [(s_t, e.eps)]
        if len(c) > 1:
            d_rho = rho[i + 1] - rho[i]
            terms += [(a_t * d_rho * c[j], hist[j]) for j in range(1, len(c))]
            terms += [(-a_t * d_rho * sum(c[1:]), e.eps)]
        return linear(e.x0, a_t, terms)

    return run_multistep(ev, sch, x, len(orders), 4, lambda e: e.eps, step)


__all__ = ["sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpmpp_2m_sde", "sample_unipc", "sample_ipndm",
           "dpmpp_weights", "sde_dpmpp_weights", "unipc_weights", "ab_weights"]

"""DDPM ancestral sampling (Ho et al. 2020; learned variance: Nichol & Dhariwal 2021) and DDIM with eta
(Song, Meng, Ermon 2020), in the generic (alpha, sigma) form of ALGORITHMS cards 1, 3 and 4.

For a step from s to a less noisy t with h = lambda_t - lambda_s (half log-SNR):
    DDIM:  x_t = alpha_t x0_hat + sqrt(sigma_t^2 - v) eps_hat + sqrt(v) z,   v = eta^2 sigma_t^2 (1 - e^{-2h})
    DDPM:  x_t ~ q(x_t | x_s, x0 = x0_hat) = N(c_x x_s + c_0 x0_hat, v),
           c_x = (sigma_t/sigma_s) e^{-h}, c_0 = alpha_t (1 - e^{-2h}),
           v = sigma_t^2 (1 - e^{-2h}) ("small", beta_tilde) or sigma_s^2 (1 - e^{-2h}) ("large", beta),
           or exp(f log v_large + (1 - f) log v_small) with f = model.evaluate(...).var_frac ("learned").
Written with e^{-h} these stay finite at alpha_s = 0 (zero terminal SNR). eta = 1 is DDPM "small"; the step
to the data end (sigma_t = 0) returns x0_hat with no noise.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError, choose
from .base import linear, setup
from .plan import remember

VARIANCES = ("small", "large", "learned")


def ddim_coefficients(a_s, s_s, l_s, a_t, s_t, l_t, eta: float = 0.0):
    """(c_x, c_0, std) with x_t = c_x x_s + c_0 x0_hat + std z (DDIM, card 4, generic form)."""
    if s_t == 0.0:
        return 0.0, 1.0, 0.0
    h = l_t - l_s
    one_m = -math.expm1(-2.0 * h)  # 1 - e^{-2h}, = 1 from alpha_s = 0
    q2 = (1.0 - eta * eta) + eta * eta * math.exp(-2.0 * h)  # (sigma_t^2 - v) / sigma_t^2, a sum of non-negatives
    q = math.sqrt(q2)
    c_x = (s_t / s_s) * q
    c_0 = a_t * -math.expm1(-h + 0.5 * math.log(q2)) if q2 > 0 else a_t
    return c_x, c_0, eta * s_t * math.sqrt(one_m)


def ddpm_coefficients(a_s, s_s, l_s, a_t, s_t, l_t):
    """(c_x, c_0, var_small, var_large) of the posterior step q(x_t | x_s, x0_hat) (cards 1 and 3)."""
    if s_t == 0.0:
        return 0.0, 1.0, 0.0, 0.0
    h = l_t - l_s
    one_m = -math.expm1(-2.0 * h)
    return (s_t / s_s) * math.exp(-h), a_t * one_m, s_t * s_t * one_m, s_s * s_s * one_m


def check_eta(eta):
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise UnifuseError(f"eta must be a number in [0, 1], got {eta!r}") from None
    if not 0.0 <= eta <= 1.0:
        raise UnifuseError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM), got {eta}")
    return eta


def sample_ddim(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                eta: float = 0.0):
    """DDIM (eta = 0: first-order exponential integrator = DPM-Solver-1; eta = 1: DDPM ancestral)."""
    eta = check_eta(eta)
    ev, sch, x, rng = setup("ddim", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    K = len(sch.t) - 1
    coefs = remember(ev.constants, ("ddim", eta), lambda: [  # kept with the grid's schedule (see `setup`)
        ddim_coefficients(sch.alpha[i], sch.sigma[i], sch.lam[i], sch.alpha[i + 1], sch.sigma[i + 1],
                          sch.lam[i + 1], eta) for i in range(K)])
    for i in ev.steps(K):
        e = ev(x, sch.t[i])
        c_x, c_0, std = coefs[i]
        x = e.x0 if sch.sigma[i + 1] == 0.0 else linear(x, c_x, [(c_0, e.x0)])
        if std > 0.0:
            x = x.add_(rng(x), alpha=std)
        ev.done(i, sch.t[i + 1], x, e.x0)
        e = None  # free this step's network output before the next one is made (a lower peak of live tensors)
    return ev.finish(x)


def ddpm_std(coef, var_frac, variance, clip_small):
    """Per-step std: a float for the fixed variances, a tensor for the learned one."""
    _, _, v_small, v_large = coef
    if variance == "small":
        return math.sqrt(v_small)
    if variance == "large":
        return math.sqrt(v_large)
    if var_frac is None:
        raise UnifuseError("variance='learned' needs a model with learned variance (DiffusionModel(..., "
                           "learned_variance=True)); use variance='small' or 'large'")
    lo, hi = math.log(max(v_small, clip_small)), math.log(v_large)
    return torch.exp(0.5 * (lo + var_frac * (hi - lo)))


def sample_ddpm(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
                variance: str = "small"):
    """DDPM ancestral sampling along the grid: posterior mean of x0_hat plus fixed or learned noise."""
    choose("DDPM variance", variance, VARIANCES)
    ev, sch, x, rng = setup("ddpm", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    K = len(sch.t) - 1
    coefs = [ddpm_coefficients(sch.alpha[i], sch.sigma[i], sch.lam[i], sch.alpha[i + 1], sch.sigma[i + 1],
                               sch.lam[i + 1]) for i in range(K)]
    # improved-diffusion replaces the zero posterior variance of the last noisy step by the next one's
    clip = [coefs[i + 1][2] if i + 1 < K and coefs[i][2] == 0.0 else 1e-300 for i in range(K)]
    for i in ev.steps(K):
        e = ev(x, sch.t[i])
        c_x, c_0 = coefs[i][0], coefs[i][1]
        if sch.sigma[i + 1] == 0.0:
            x = e.x0
        else:
            x = linear(x, c_x, [(c_0, e.x0)])
            std = ddpm_std(coefs[i], e.var_frac, variance, clip[i])
            x = x.add_(rng(x), alpha=std) if isinstance(std, float) else x.add_(std * rng(x))
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)

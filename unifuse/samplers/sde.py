"""Reverse-SDE samplers of score SDEs (Song et al. 2021, ALGORITHMS card 5): Euler-Maruyama and the
predictor-corrector sampler with a Langevin corrector.

Reverse SDE in native time: dx = [f x - g^2 score] dt + g dw, f = alpha'/alpha, g^2 = 2 sigma sigma' - 2 f sigma^2,
score = -eps_hat/sigma. Euler-Maruyama from s to t (dt = t - s < 0):
    x_t = (1 + f dt) x_s + dt (g^2/sigma) eps_hat + g sqrt(|dt|) z.
At alpha_s = 0 (zero terminal SNR) f is infinite: that step is the exact ancestral step instead.
PC: at each grid time, Langevin corrector steps x <- x + e s + sqrt(2 e) z with e = 2 (snr |z|/|s|)^2, then a
predictor step (reverse diffusion = DDPM "large", ancestral = DDPM "small", or Euler-Maruyama).
The default step rule is e = 2 (snr sigma)^2 (annealed Langevin, Song & Ermon 2019), which the norm rule
approaches when eps_hat has unit scale; step_rule="norms" uses the norms per sample (unstable in very low
dimension, where the ratio is heavy-tailed) and "batch_norms" averages them over the batch as the score_sde
code does (sample i then depends on the other samples).
"""
from __future__ import annotations

import math

import torch

from ..errors import choose
from .ancestral import ddpm_coefficients
from .base import linear, setup

PREDICTORS = ("reverse_diffusion", "ancestral", "euler_maruyama")


def em_coefficients(a_s, s_s, da_s, ds_s, l_s, a_t, s_t, l_t, dt):
    """(c_x, c_eps, std) of one Euler-Maruyama step (exact ancestral step where alpha_s = 0)."""
    if a_s == 0.0:
        c_x, c_0, v_small, _ = ddpm_coefficients(a_s, s_s, l_s, a_t, s_t, l_t)
        return None, (c_x, c_0), math.sqrt(v_small)
    f = da_s / a_s
    g2 = max(2.0 * s_s * ds_s - 2.0 * f * s_s * s_s, 0.0)
    return 1.0 + f * dt, dt * g2 / s_s, math.sqrt(g2 * -dt)


def _em_apply(x, e, coef, rng):
    c_x, c_e, std = coef
    if c_x is None:  # the ancestral fallback: c_e holds (c_x, c_0)
        out = linear(x, c_e[0], [(c_e[1], e.x0)])
    else:
        out = linear(x, c_x, [(c_e, e.eps)])
    return out.add_(rng(out), alpha=std) if std > 0 else out


def _em_coefs(sch, i):
    return em_coefficients(sch.alpha[i], sch.sigma[i], sch.d_alpha[i], sch.d_sigma[i], sch.lam[i],
                           sch.alpha[i + 1], sch.sigma[i + 1], sch.lam[i + 1], sch.t[i + 1] - sch.t[i])


def sample_euler_maruyama(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None):
    """Euler-Maruyama on the reverse SDE in native time; the last step returns x0_hat (no noise)."""
    ev, sch, x, rng = setup("euler_maruyama", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    K = len(sch.t) - 1
    coefs = [_em_coefs(sch, i) for i in range(K)]
    for i in ev.steps(K):
        e = ev(x, sch.t[i])
        x = e.x0 if sch.sigma[i + 1] == 0.0 else _em_apply(x, e, coefs[i], rng)
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)


STEP_RULES = ("norms", "batch_norms", "sigma")


def langevin_step_size(x, e, sigma: float, snr: float, z, rule: str = "norms"):
    """Langevin step size, shaped to broadcast against x:
    "norms": 2 (snr |z| / |score|)^2 per sample (Song et al. 2021); "batch_norms": the same with both norms
    averaged over the batch (the score_sde code; sample i then depends on the batch); "sigma": 2 (snr sigma)^2,
    the annealed-Langevin rule step ~ sigma^2 (Song & Ermon 2019), equal to "norms" when eps_hat has unit
    scale and stable in any dimension ("norms" needs many dimensions: in 1-D the ratio is heavy-tailed)."""
    if rule == "sigma":
        return torch.full((x.shape[0],) + (1,) * (x.ndim - 1), 2.0 * (snr * sigma) ** 2, dtype=x.dtype, device=x.device)
    flat = lambda v: v.reshape(v.shape[0], -1).norm(dim=1)
    z_norm, s_norm = flat(z), flat(e.eps) / sigma
    if rule == "batch_norms":
        z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
    step = 2.0 * (snr * z_norm / s_norm.clamp_min(1e-30)) ** 2
    return step.reshape((-1,) + (1,) * (x.ndim - 1))


def sample_pc(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None,
              predictor: str = "reverse_diffusion",
              snr: float = 0.16, n_corrector: int = 1, correctors=None, step_rule: str = "sigma"):
    """Predictor-corrector: at each grid time `correctors[i]` (default n_corrector) Langevin steps, then the
    predictor (at the last noisy time: the denoised estimate)."""
    choose("PC predictor", predictor, PREDICTORS)
    choose("Langevin step rule", step_rule, STEP_RULES)
    ev, sch, x, rng = setup("pc", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    K = len(sch.t) - 1
    correctors = [int(n_corrector)] * K if correctors is None else [int(c) for c in correctors]
    if len(correctors) != K or min(correctors) < 0:
        from ..errors import UnifuseError

        raise UnifuseError(f"pc: correctors must list {K} non-negative corrector counts (one per grid time), "
                           f"got {correctors}")
    pred = []
    for i in range(K):
        if predictor == "euler_maruyama":
            pred.append(_em_coefs(sch, i))
        else:
            c_x, c_0, v_small, v_large = ddpm_coefficients(sch.alpha[i], sch.sigma[i], sch.lam[i], sch.alpha[i + 1],
                                                           sch.sigma[i + 1], sch.lam[i + 1])
            pred.append((None, (c_x, c_0), math.sqrt(v_large if predictor == "reverse_diffusion" else v_small)))
    for i in ev.steps(K):
        for _ in range(correctors[i]):  # Langevin corrector at t_i
            e = ev(x, sch.t[i])
            z = rng(x)
            step = langevin_step_size(x, e, sch.sigma[i], snr, z, step_rule)
            x = x - (step / sch.sigma[i]) * e.eps + torch.sqrt(2.0 * step) * z
        e = ev(x, sch.t[i])
        x = e.x0 if sch.sigma[i + 1] == 0.0 else _em_apply(x, e, pred[i], rng)
        ev.done(i, sch.t[i + 1], x, e.x0)
    return ev.finish(x)

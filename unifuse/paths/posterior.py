"""Forward transitions and the Gaussian posterior between two times of any path (VDM; NOTATION 2).

For s < t (s less noisy):
    q(x_t | x_s)     = N(alpha_{t|s} x_s, sigma2_{t|s})      alpha_{t|s} = alpha_t / alpha_s
    q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, var)             sigma2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
    c_xt = alpha_{t|s} sigma_s^2 / sigma_t^2,  c_x0 = alpha_s sigma2_{t|s} / sigma_t^2,
    var  = sigma2_{t|s} sigma_s^2 / sigma_t^2                 ("fixed small", beta_tilde in DDPM)
The reverse-step variances of DDPM are var ("small") and sigma2_{t|s} ("large", beta); a learned
variance interpolates their logarithms (Improved DDPM, ALGORITHMS card 3).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .base import Path, as_time


class Posterior(NamedTuple):
    """Coefficients of q(x_s | x_t, x0) and the two DDPM reverse variances (float64)."""

    c_x0: torch.Tensor
    c_xt: torch.Tensor
    var_small: torch.Tensor
    var_large: torch.Tensor


def transition(path: Path, s, t):
    """(alpha_{t|s}, sigma2_{t|s}) of q(x_t | x_s), s < t; sigma2 computed without cancellation."""
    s, t = as_time(s).to(torch.float64), as_time(t).to(torch.float64)
    a_s, a_t, sg_s, sg_t = path.alpha(s), path.alpha(t), path.sigma(s), path.sigma(t)
    ratio = a_t / a_s
    # sigma_t^2 - ratio^2 sigma_s^2 = sigma_t^2 (1 - exp(lambda_t - lambda_s)), stable for close times
    var = sg_t**2 * -torch.expm1(path.log_snr(t) - path.log_snr(s))
    var = torch.where(sg_s == 0, sg_t**2, var)
    return ratio, var


def posterior(path: Path, s, t) -> Posterior:
    """q(x_s | x_t, x0) for s < t (s may be the data end, where var = 0 and c_x0 = 1)."""
    s, t = as_time(s).to(torch.float64), as_time(t).to(torch.float64)
    ratio, var_ts = transition(path, s, t)
    a_s, sg_s, sg_t = path.alpha(s), path.sigma(s), path.sigma(t)
    c_xt = ratio * sg_s**2 / sg_t**2
    c_x0 = a_s * var_ts / sg_t**2
    return Posterior(c_x0, c_xt, var_ts * sg_s**2 / sg_t**2, var_ts)


def learned_log_variance(post: Posterior, frac: torch.Tensor) -> torch.Tensor:
    """Improved-DDPM log-variance: frac log(var_large) + (1 - frac) log(var_small); var_small = 0 at
    the final step is replaced by the next step's value by the caller (improved-diffusion's clipping)."""
    return frac * torch.log(post.var_large) + (1 - frac) * torch.log(post.var_small)

"""Preconditioning (Karras et al. 2022, section 5; Song et al. 2023 consistency models; Lu & Song 2024).

Written on x_t of any path: with the equal-SNR EDM point x_edm = x_t/alpha, s = sigma/alpha, and
r = sqrt(sigma^2 + (alpha sigma_d)^2) (so that c_in x_edm = x_t / r stays finite at alpha = 0):

    edm          x0 = c_skip x_t + c_out F(x_t / r)     c_skip = sigma_d^2 alpha / r^2, c_out = sigma sigma_d / r
    trigflow     x0 = c_skip x_t - c_out F(x_t / r)     (= cos t x_t - sin t sigma_d F on TrigFlow)
    consistency  x0 = k_skip x_t + k_out F(x_t / r)     boundary scalings: x0 = x_t exactly at s = s_eps
                 k_skip = sigma_d^2 alpha / ((sigma - s_eps alpha)^2 + (alpha sigma_d)^2)
                 k_out  = sigma_d (sigma - s_eps alpha) / r
"""
from __future__ import annotations

import torch

from .convert import Coefficients, _edm_scalings


def input_scale(c: Coefficients, sigma_data: float) -> torch.Tensor:
    """1 / r: scales x_t to unit variance when the data have std sigma_data (EDM's c_in)."""
    return torch.rsqrt(c.sigma**2 + (c.alpha * sigma_data) ** 2)


def consistency_scalings(c: Coefficients, sigma_data: float, s_eps: float):
    """(k_skip, k_out) of the consistency-model boundary condition on x_t (ALGORITHMS card 16)."""
    gap = c.sigma - s_eps * c.alpha
    k_skip = sigma_data**2 * c.alpha / (gap**2 + (c.alpha * sigma_data) ** 2)
    k_out = sigma_data * gap * input_scale(c, sigma_data)
    return k_skip, k_out


def x0_from_raw(kind: str, F: torch.Tensor, x_t: torch.Tensor, c: Coefficients, sigma_data: float, s_eps: float = 0.0):
    """The denoised estimate from a preconditioned network's raw output F."""
    if kind == "consistency":
        k_skip, k_out = consistency_scalings(c, sigma_data, s_eps)
        return k_skip * x_t + k_out * F
    c_skip, c_out = _edm_scalings(c, sigma_data)
    return c_skip * x_t + (c_out * F if kind == "edm" else -c_out * F)

"""What unit weight on the squared error of a prediction kind means in x0 units (NOTATION 6.5).

Every kind is affine in the pair, target = A x0 + B eps + C x_t, so at fixed x_t an error in x0 moves the
target by (A - B alpha / sigma) (d eps / d x0 = -alpha / sigma), and unit weight on the target's MSE is the
x0-weight k = (A - B alpha / sigma)^2: eps -> SNR, v -> ((alpha^2 + sigma^2) / sigma)^2, RF velocity -> 1/t^2,
EDM / TrigFlow F -> 1 / c_out^2. `kind_weight` turns a weighting into the weight on a kind's own MSE.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .convert import Coefficients, from_pair
from .kinds import noise_scaled

F64 = torch.float64


def target_coefficients(kind: str, c: Coefficients, sigma_data: float = 0.5):
    """(A, B) with target = A x0 + B eps + C x_t for a prediction kind (the conversions are affine)."""
    one, zero = torch.ones_like(c.alpha), torch.zeros_like(c.alpha)
    A = from_pair(kind, one, zero, zero, c, sigma_data)
    B = from_pair(kind, zero, one, zero, c, sigma_data)
    return A, B


def equivalent_x0_weight(kind: str, c: Coefficients, sigma_data: float = 0.5):
    """k with ||target_hat - target||^2 = k ||x0_hat - x0||^2 at fixed x_t (NOTATION 6.5): eps -> SNR,
    v -> ((alpha^2 + sigma^2)/sigma)^2, RF velocity -> 1/t^2, EDM/TrigFlow F -> 1/c_out^2."""
    A, B = target_coefficients(kind, c, sigma_data)
    # At fixed x_t, d eps / d x0 = -alpha / sigma.
    return (A - B * c.alpha / c.sigma) ** 2


def kind_weight(kind: str, c: Coefficients, sigma_data: float, x0_weight: Callable, eps_weight: Callable):
    """Weight [B] (float64) on the MSE of a `kind` target that realises a weighting given as its x0-weight
    and its eps-weight (thunks). eps and score use the eps-weight's closed form, finite at SNR = 0
    (score = -eps / sigma carries 1 / sigma^2); x0 uses the x0-weight; every other kind w_x0 / k."""
    if noise_scaled(kind):
        w = eps_weight()
        return w if kind == "eps" else w * c.sigma.reshape(-1).to(F64) ** 2
    if kind == "x0":
        return x0_weight()
    return x0_weight() / equivalent_x0_weight(kind, c, sigma_data).reshape(-1).to(F64)


__all__ = ["target_coefficients", "equivalent_x0_weight", "kind_weight"]

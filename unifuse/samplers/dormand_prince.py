"""The Dormand-Prince 5(4) pair (Dormand & Prince 1980; Hairer, Norsett & Wanner, Solving ODEs I, II.4-5):
one embedded Runge-Kutta step with first-same-as-last stages, its error norm and step-size controller.

Shared by the adaptive PF-ODE sampler (`sample_adaptive`) and the exact likelihood (`uf.log_likelihood`); each
drives it with its own loop (the sampler passes through every grid time, the likelihood carries the
divergence integral along) and its own tensor arithmetic (`combine`), so each keeps its results to the bit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# nodes, stage weights (the last row is the 5th-order solution: FSAL), 4th-order weights, and their difference
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
     (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
B5 = A[6] + (0.0,)
B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
E = tuple(b5 - b4 for b5, b4 in zip(B5, B4))


def dormand_prince_step(field: Callable, t: float, y, first: tuple, h: float, combine: Callable, t_last=None):
    """The six new stages of one step of size h from (t, y), the first stage `first` = field(t, y) known (FSAL).

    field(t, y) -> (slope, extra); combine(y, h, weights, slopes) -> y + h sum_j w_j k_j, or with y = None the
    weighted sum h sum_j w_j k_j alone. t_last: the exact time of the stages at t + h (to land on a grid time).
    Returns (the 5th-order solution, the 7 slopes, the 7 extras, the error estimate y5 - y4)."""
    slopes, extras = [first[0]], [first[1]]
    for j in range(1, 7):
        y_j = combine(y, h, A[j], slopes)
        k_j, extra = field(t_last if (t_last is not None and C[j] == 1.0) else t + C[j] * h, y_j)
        slopes.append(k_j)
        extras.append(extra)
    return y_j, slopes, extras, combine(None, h, E, slopes)


def error_norm(err: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-sample RMS of the error estimate in units of atol + rtol max(|y|, |y_new|) -> [batch]."""
    scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
    return (err / scale).pow(2).reshape(err.shape[0], -1).mean(1).sqrt()


def step_factor(err: float, grow: float) -> float:
    """The next step over this one: 0.9 err^(-1/5), kept in [0.2, grow] (grow where the error is 0)."""
    return min(grow, max(0.2, 0.9 * err ** -0.2)) if err > 0 else grow

"""The shared Dormand-Prince 5(4) step (`uf.samplers.dormand_prince`): fifth order, an error estimate of
fourth order, on y' = cos(t) y with the exact solution y = exp(sin t)."""
import math

import torch

from unifuse.samplers.dormand_prince import dormand_prince_step, step_factor

F64 = torch.float64


def combine(y, h, weights, slopes):
    total = h * sum(w * k for w, k in zip(weights, slopes))
    return total if y is None else y + total


def field(t, y):
    return math.cos(t) * y, None


def test_one_step_is_fifth_order_and_its_error_estimate_fourth():
    y0 = torch.ones(1, 1, dtype=F64)
    errors, estimates = [], []
    for h in (0.4, 0.2, 0.1):
        y, _, _, err = dormand_prince_step(field, 0.0, y0, field(0.0, y0), h, combine)
        errors.append(abs(float(y) - math.exp(math.sin(h))))
        estimates.append(abs(float(err)))
    assert math.log2(errors[1] / errors[2]) > 5.5  # local error O(h^6)
    assert math.log2(estimates[1] / estimates[2]) > 4.5  # y5 - y4 = O(h^5)


def test_step_factor_is_bounded():
    assert step_factor(0.0, 5.0) == 5.0 and step_factor(1e-12, 10.0) == 10.0
    assert step_factor(1e12, 10.0) == 0.2 and math.isclose(step_factor(1.0, 10.0), 0.9)

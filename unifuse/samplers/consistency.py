"""Multistep consistency sampling (Song, Dhariwal, Chen, Sutskever 2023, Algorithm 1; ALGORITHMS cards 16, 18).

    x = f(x_T, t_0);  for each later grid time t_i > data:  x_{t_i} = alpha_i (x + sqrt(s_i^2 - eps^2) z),
                                                             x = f(x_{t_i}, t_i)
with f the model's denoised estimate (for "consistency" and "trigflow" consistency models that is the
consistency function), s_i = sigma_i/alpha_i the EDM noise level and eps = model.boundary. One network
evaluation per grid time except the data end; on a diffusion model this is denoise-and-renoise sampling.
"""
from __future__ import annotations

import math

from .base import linear, setup


def sample_consistency(model, x, ts, *, cond=None, noise=None, callback=None, progress=False, info=None, plan=None):
    """Consistency-model multistep sampling over the grid (NFE = number of noisy grid times)."""
    ev, sch, x, rng = setup("consistency", model, x, ts, cond, noise, callback, progress, info, plan=plan)
    eps = float(getattr(model, "boundary", 0.0))
    noisy = [i for i in range(len(sch.t)) if sch.sigma[i] > 0.0]
    for n in ev.steps(len(noisy)):
        i = noisy[n]
        if n > 0:  # re-noise the current data estimate to t_i
            a, s = sch.alpha[i], sch.sigma[i]
            std = a * math.sqrt(max((s / a) ** 2 - eps * eps, 0.0))
            x = linear(x, a, [(std, rng(x))])
        x = ev(x, sch.t[i]).x0
        ev.done(n, sch.t[i], x, x)
    return ev.finish(x)

"""No silent garbage: a planned grid is tried on an exact data-like model before the real one runs.

A sampler's discretisation can fail on its own, whatever the network: Euler-Maruyama's step from sigma 80
removes twice the noise it should, a native-time Euler step on a VE path overshoots by sigma' dt, a Heun
step that lands on the least noisy time averages in a slope of almost zero. Such a call returns noise with
no error. `probe` runs the sampler, with the same grid and options, on the exact denoiser of a small
Gaussian mixture (`testing.GaussianMixture`: well-separated means, small spread, at the data's scale) on
the model's own path and prediction kind, and measures how far the samples end from the nearest mean,
relative to standard normal noise. The posterior mean at the noise end (what one evaluation gives) scores
0.55; converged samplers about 0.05; noise 1; a diverged step far more. `uf.sample` refuses grids
that score above `SENSIBLE`, naming an NFE that works. The check costs nfe evaluations of a tiny closed
form (milliseconds); a kept `uf.samplers.Plan` remembers it per setting.
"""
from __future__ import annotations

import torch

from .base import NoiseSource

SENSIBLE = 0.6   # the one-evaluation answer (the posterior mean) scores 0.55 here; noise 1
PROBE_MAX_NFE = 50  # above this every default grid has steps small enough
_D, _K, _BATCH = 8, 4, 64


def _mixture():
    """Four well-separated components in 8-D at +-0.5 per coordinate with spread 0.05 (pixel-like data)."""
    from ..testing import GaussianMixture  # lazy: the oracle is only needed when a grid is checked

    means = torch.tensor([[0.5, 0.5, -0.5, -0.5], [-0.5, 0.5, 0.5, -0.5], [0.5, -0.5, -0.5, 0.5],
                          [-0.5, -0.5, 0.5, 0.5]], dtype=torch.float64)
    means = torch.cat([means, means.flip(0)], 1)
    return GaussianMixture(torch.full((_K,), 1.0 / _K, dtype=torch.float64), means, 0.05)


def nearest_mean_ratio(x: torch.Tensor, means: torch.Tensor, noise: torch.Tensor) -> float:
    """Mean distance of x to the nearest mean over that of `noise` (standard normal draws)."""
    near = lambda v: float(torch.cdist(v.reshape(len(v), -1), means).min(1).values.mean())
    return near(x) / near(noise)


def probe(fn, path, prediction: str, ts: torch.Tensor, extra: dict, options: dict) -> float | None:
    """The ratio of `nearest_mean_ratio` for sampler function `fn` on grid ts, or None where the oracle has
    no such prediction kind (a consistency model: its own sampler decides)."""
    from ..errors import UnifuseError

    gm = _mixture()
    noise = torch.randn(_BATCH, _D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        model = gm.model(path, prediction)
        prior = float(path.sigma(ts[:1])[0])  # as `uf.sample` scales the noise
        with torch.no_grad():
            x = fn(model, noise * prior, ts, noise=NoiseSource(0, _BATCH), **extra, **options)
    except UnifuseError:
        return None
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return nearest_mean_ratio(x, gm.means, noise)

"""Two-dimensional toy distributions with exact densities (the FFJORD benchmark sets, Grathwohl et al. 2019).

"8gaussians" is a Gaussian mixture. "moons" and "swissroll" are defined as Gaussian mixtures whose means are
1,000 midpoint-rule nodes along the curves (indistinguishable from the continuous sets at the noise level used),
so their density, score and denoiser are exact via `unifuse.testing.GaussianMixture`. "checkerboard" is uniform on
8 squares of side 2 in [-4, 4]^2. Every set lies roughly in [-4, 4]^2.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import UnifuseError, choose
from ..testing import GaussianMixture

NODES = 500  # quadrature nodes per curve segment


class Checkerboard:
    """Uniform density 1/32 on the 8 squares [2i, 2i+2) x [2j, 2j+2), i, j in -2..1, with i + j even."""

    num_classes = 8
    area = 32.0

    def sample(self, n: int, generator: Optional[torch.Generator] = None, dtype=torch.float64):
        """n points [n, 2] and the index 0..7 of the square each lies in."""
        labels = torch.randint(0, 8, (n,), generator=generator)
        i = labels % 4 - 2                                   # column -2..1
        j = 2 * (labels // 4) - 2 + (i % 2)                  # row with i + j even
        corner = torch.stack([i, j], 1).to(dtype) * 2
        return corner + 2 * torch.rand(n, 2, generator=generator, dtype=dtype), labels

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """Exact log-density of the data (alpha=1, sigma=0 only); -inf off the squares."""
        if alpha != 1.0 or sigma != 0.0:
            raise UnifuseError("Checkerboard.log_prob has a closed form for the clean data only (alpha=1, sigma=0)")
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 2)
        cell = torch.floor(x / 2)
        inside = (x.abs() <= 4).all(1) & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
        return torch.where(inside, torch.full_like(x[:, 0], -math.log(self.area)), torch.full_like(x[:, 0], -math.inf))

    def entropy(self) -> float:
        return math.log(self.area)


def _curve_mixture(points: torch.Tensor, std: float) -> GaussianMixture:
    k = points.shape[0]
    return GaussianMixture(torch.full((k,), 1.0 / k, dtype=torch.float64), points, std)


def eight_gaussians() -> GaussianMixture:
    """8 Gaussians of std 0.5/sqrt(2) at radius 4/sqrt(2), angles k pi/4 (FFJORD's "8gaussians")."""
    ang = torch.arange(8, dtype=torch.float64) * math.pi / 4
    means = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * 4 / math.sqrt(2)
    return GaussianMixture(torch.full((8,), 1 / 8, dtype=torch.float64), means, 0.5 / math.sqrt(2))


def moons() -> GaussianMixture:
    """Two interleaved half circles (scikit-learn's make_moons, noise 0.1), centred and scaled by 2."""
    th = (torch.arange(NODES, dtype=torch.float64) + 0.5) * math.pi / NODES
    upper = torch.stack([torch.cos(th), torch.sin(th)], 1)
    lower = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], 1)
    centre = torch.tensor([0.5, 0.25], dtype=torch.float64)
    return _curve_mixture((torch.cat([upper, lower]) - centre) * 2, 0.1 * 2)


def swissroll() -> GaussianMixture:
    """The 2-D swiss roll (t cos t, t sin t)/5, t uniform in [1.5 pi, 4.5 pi], noise std 1/5 (FFJORD's "swissroll")."""
    t = 1.5 * math.pi * (1 + 2 * (torch.arange(2 * NODES, dtype=torch.float64) + 0.5) / (2 * NODES))
    return _curve_mixture(torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5, 1.0 / 5)


TOYS = {"moons": moons, "8gaussians": eight_gaussians, "checkerboard": Checkerboard, "swissroll": swissroll}
TOY_CLASSES = {"moons": 2, "8gaussians": 8, "checkerboard": 8, "swissroll": 0}
# Differential entropies in nats: log 32 for the checkerboard; Monte Carlo with 400,000 samples (seed 123,
# standard error 0.0012-0.0015) for the mixtures. Checked against fresh Monte Carlo in tests/test_data.py.
TOY_ENTROPY = {"moons": 2.3938, "8gaussians": 2.8307, "checkerboard": math.log(32.0), "swissroll": 2.6694}


def toy_density(name: str):
    """The exact distribution of a toy set: a GaussianMixture, or a Checkerboard (both have sample and log_prob)."""
    return TOYS[choose("toy data set", name, TOYS)]()


def sample_toy(name: str, n: int, generator: Optional[torch.Generator] = None, labels: bool = False,
               dtype=torch.float32):
    """n samples [n, 2] of a toy set (and their class labels if labels=True: moon, Gaussian or square index)."""
    density = toy_density(name)
    x, comp = density.sample(int(n), generator)
    if not labels:
        return x.to(dtype)
    if name == "moons":
        comp = comp // NODES
    elif name == "swissroll":
        comp = torch.zeros_like(comp)
    return x.to(dtype), comp.long()


def toy_entropy(name: str, n: Optional[int] = None, seed: int = 0) -> float:
    """Differential entropy H = -E log p(x) in nats: the stored value (TOY_ENTROPY), or a fresh Monte Carlo
    estimate from n samples (exact for the checkerboard)."""
    density = toy_density(name)
    if n is None or isinstance(density, Checkerboard):
        return TOY_ENTROPY[name]
    x, _ = density.sample(n, torch.Generator().manual_seed(seed))
    return float(-torch.cat([density.log_prob(c) for c in x.split(10_000)]).mean())

"""Two-dimensional toy distributions with exact densities (the FFJORD benchmark sets, Grathwohl et al. 2019).

"8gaussians" is a Gaussian mixture. "moons" and "swissroll" are defined as Gaussian mixtures whose means are
1,000 midpoint-rule nodes along the curves (indistinguishable from the continuous sets at the noise level used),
so their density is exact (`MixtureDensity`; the score and denoiser too via `unifuse.testing.GaussianMixture`, the
same mixture). "checkerboard" is uniform on 8 squares of side 2 in [-4, 4]^2. Every set lies roughly in [-4, 4]^2.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError, choose
from ..paths.base import as_time

NODES = 500  # quadrature nodes per curve segment
F64 = torch.float64


def _col(c, x):
    """A scalar or [B] coefficient shaped [B, 1, 1] (or []) against [B, K, D] arrays."""
    c = as_time(c).to(device=x.device, dtype=x.dtype)
    return c.reshape(-1, 1, 1) if c.ndim == 1 else c


class MixtureDensity:
    """A diagonal Gaussian mixture in R^D and its noisy marginals: sampling, log-density, class posterior
    (data may carry any shape with D elements). weights [K], means [K, D], stds [K, D], [K] or a scalar.
    Component k is class k. `unifuse.testing.GaussianMixture` adds the exact score, denoiser and PF-ODE."""

    def __init__(self, weights, means, stds, dtype=F64):
        self.means = torch.as_tensor(means, dtype=dtype)
        if self.means.ndim == 1:
            self.means = self.means[None]
        K, D = self.means.shape
        self.weights = torch.as_tensor(weights, dtype=dtype).reshape(K)
        if not bool((self.weights > 0).all()) or abs(float(self.weights.sum()) - 1) > 1e-9:
            raise UnifuseError(f"mixture weights must be positive and sum to 1, got {self.weights.tolist()}")
        s = torch.as_tensor(stds, dtype=dtype)
        s = torch.full((K, D), float(s), dtype=dtype) if s.ndim == 0 else s.reshape(K, -1).expand(K, D)
        self.stds = s.clone()
        self.K, self.D = K, D

    @classmethod
    def gaussian(cls, mean, std, dtype=F64) -> MixtureDensity:
        mean = torch.as_tensor(mean, dtype=dtype).reshape(1, -1)
        return cls([1.0], mean, torch.as_tensor(std, dtype=dtype).expand(mean.shape).reshape(1, -1), dtype)

    # --- sampling -----------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None):
        """n data points [n, D] (from the given components if labels are given) and their labels."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, dtype=self.means.dtype, generator=generator)
        return self.means[labels] + self.stds[labels] * z, labels

    # --- noisy marginal --------------------------------------------------------------------
    def _parts(self, x, a, sg):
        x = x.reshape(x.shape[0], -1).to(self.means.dtype)
        a, sg = _col(a, x), _col(sg, x)
        v = a * a * self.stds[None] ** 2 + sg * sg                     # [B, K, D]
        d = x[:, None, :] - a * self.means[None]                         # [B, K, D]
        logn = -0.5 * (d * d / v + torch.log(2 * math.pi * v)).sum(-1)  # [B, K]
        logw = torch.log(self.weights)[None] + logn
        return x, a, v, d, logw

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """log q_t(x) of x_t = alpha x0 + sigma noise; alpha=1, sigma=0 gives the data density."""
        return torch.logsumexp(self._parts(x, alpha, sigma)[-1], 1)

    def responsibilities(self, x, alpha, sigma):
        """p(k | x_t): the exact noisy classifier."""
        return torch.softmax(self._parts(x, alpha, sigma)[-1], 1)


class Checkerboard:
    """Uniform density 1/32 on the 8 squares [2i, 2i+2) x [2j, 2j+2), i, j in -2..1, with i + j even."""

    num_classes = 8
    area = 32.0

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64):
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


def _curve_mixture(points: torch.Tensor, std: float) -> MixtureDensity:
    k = points.shape[0]
    return MixtureDensity(torch.full((k,), 1.0 / k, dtype=torch.float64), points, std)


def eight_gaussians() -> MixtureDensity:
    """8 Gaussians of std 0.5/sqrt(2) at radius 4/sqrt(2), angles k pi/4 (FFJORD's "8gaussians")."""
    ang = torch.arange(8, dtype=torch.float64) * math.pi / 4
    means = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * 4 / math.sqrt(2)
    return MixtureDensity(torch.full((8,), 1 / 8, dtype=torch.float64), means, 0.5 / math.sqrt(2))


def moons() -> MixtureDensity:
    """Two interleaved half circles (scikit-learn's make_moons, noise 0.1), centred and scaled by 2."""
    th = (torch.arange(NODES, dtype=torch.float64) + 0.5) * math.pi / NODES
    upper = torch.stack([torch.cos(th), torch.sin(th)], 1)
    lower = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], 1)
    centre = torch.tensor([0.5, 0.25], dtype=torch.float64)
    return _curve_mixture((torch.cat([upper, lower]) - centre) * 2, 0.1 * 2)


def swissroll() -> MixtureDensity:
    """The 2-D swiss roll (t cos t, t sin t)/5, t uniform in [1.5 pi, 4.5 pi], noise std 1/5 (FFJORD's "swissroll")."""
    t = 1.5 * math.pi * (1 + 2 * (torch.arange(2 * NODES, dtype=torch.float64) + 0.5) / (2 * NODES))
    return _curve_mixture(torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5, 1.0 / 5)


TOYS = {"moons": moons, "8gaussians": eight_gaussians, "checkerboard": Checkerboard, "swissroll": swissroll}
TOY_CLASSES = {"moons": 2, "8gaussians": 8, "checkerboard": 8, "swissroll": 0}
# Differential entropies in nats: log 32 for the checkerboard; Monte Carlo with 400,000 samples (seed 123,
# standard error 0.0012-0.0015) for the mixtures. Checked against fresh Monte Carlo in tests/test_data.py.
TOY_ENTROPY = {"moons": 2.3938, "8gaussians": 2.8307, "checkerboard": math.log(32.0), "swissroll": 2.6694}


def toy_density(name: str):
    """The exact distribution of a toy set: a MixtureDensity, or a Checkerboard (both have sample and log_prob)."""
    return TOYS[choose("toy data set", name, TOYS)]()


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, labels: bool = False,
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


def toy_entropy(name: str, n: int | None = None, seed: int = 0) -> float:
    """Differential entropy H = -E log p(x) in nats: the stored value (TOY_ENTROPY), or a fresh Monte Carlo
    estimate from n samples (exact for the checkerboard)."""
    density = toy_density(name)
    if n is None or isinstance(density, Checkerboard):
        return TOY_ENTROPY[name]
    x, _ = density.sample(n, torch.Generator().manual_seed(seed))
    return float(-torch.cat([density.log_prob(c) for c in x.split(10_000)]).mean())

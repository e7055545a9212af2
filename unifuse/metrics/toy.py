"""Distances for low-dimensional samples: sliced Wasserstein (Rabin et al. 2011; Bonneel et al. 2015), kernel
MMD with RBF kernels (Gretton et al. 2012, unbiased estimator), and the exact cross-entropy of samples under the
known toy density (unifuse.data.toy)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..data.toy import toy_density, toy_entropy
from ..errors import UnifuseError
from .kernel import mmd2_unbiased

F64 = torch.float64
BANDWIDTHS = (0.1, 0.2, 0.5, 1.0)


def _pair(x, y):
    x, y = torch.as_tensor(x).to(F64), torch.as_tensor(y).to(F64)
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 2:
        raise UnifuseError(f"need two sample sets [N >= 2, D] with equal D, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def sliced_wasserstein(x, y, projections: int = 256, seed: int = 0) -> float:
    """SW_2 = sqrt(mean over random unit directions theta of W_2^2(theta.x, theta.y)); 1-D W_2 from quantiles."""
    x, y = _pair(x, y)
    theta = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=F64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (theta.T @ x.T).sort(1).values, (theta.T @ y.T).sort(1).values   # [projections, N], rows contiguous
    if px.shape[1] != py.shape[1]:  # compare both empirical quantile functions on a common grid
        m = max(px.shape[1], py.shape[1])
        q = (torch.arange(m, dtype=F64) + 0.5) / m
        px, py = torch.quantile(px, q, dim=1), torch.quantile(py, q, dim=1)
    return float((px - py).square().mean().sqrt())


def mmd(x, y, bandwidths: Sequence[float] = BANDWIDTHS, max_points: int = 2000, seed: int = 0) -> float:
    """Unbiased MMD^2 with k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) (at most max_points per set, drawn at random)."""
    x, y = _pair(x, y)
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(x.shape[0], generator=g)[:max_points]]
    y = y[torch.randperm(y.shape[0], generator=g)[:max_points]]

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return float(mmd2_unbiased(k(x, x), k(y, y), k(x, y)))


def cross_entropy(samples, name: str) -> dict:
    """-mean log p_data(samples) under the exact toy density, and the fraction of samples off its support."""
    density = toy_density(name)
    x = torch.as_tensor(samples).to(F64).reshape(-1, 2)
    logp = torch.cat([density.log_prob(c) for c in x.split(10_000)])
    finite = torch.isfinite(logp)
    nll = float(-logp.mean()) if bool(finite.all()) else math.inf
    return dict(nll=nll, nll_on_support=float(-logp[finite].mean()) if bool(finite.any()) else math.inf,
                off_support=float(1 - finite.double().mean()))


def evaluate_toy(samples, name: str, n_ref: int | None = None, seed: int = 0) -> dict:
    """swd, mmd against n_ref fresh samples of the true distribution (as many as given by default), their floors
    (the same distances between two independent true samples of that size), and the exact cross-entropy."""
    x = torch.as_tensor(samples).detach().to("cpu", F64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise UnifuseError(f"toy samples must be [N, 2], got shape {tuple(x.shape)}")
    n = n_ref or x.shape[0]
    density = toy_density(name)
    g = torch.Generator().manual_seed(10_000 + seed)
    ref, _ = density.sample(n, g)
    ref2, _ = density.sample(n, g)
    out = dict(swd=sliced_wasserstein(x, ref, seed=seed), mmd=mmd(x, ref, seed=seed),
               swd_floor=sliced_wasserstein(ref2, ref, seed=seed), mmd_floor=mmd(ref2, ref, seed=seed))
    out.update(cross_entropy(x, name))
    out["entropy"] = toy_entropy(name)
    return out

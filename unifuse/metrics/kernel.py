"""Kernel two-sample distances: the unbiased MMD^2 estimator (Gretton et al. 2012, "A kernel two-sample test")
and the Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with the
cubic polynomial kernel k(a, b) = (a.b / D + 1)^3, averaged over random subsets. Unlike the Frechet distance, KID
has no bias at small n: its expectation is exactly 0 when both sets come from one distribution."""
from __future__ import annotations

import torch

from ..errors import UnifuseError

F64 = torch.float64


def mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    """U-statistic MMD^2 from the three kernel matrices: the diagonals (k(a, a)) are left out of the within-set means."""
    n, m = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """k(a, b) = (a.b / D + 1)^degree for rows of a [N, D] and b [M, D]."""
    return (a @ b.T / a.shape[1] + 1) ** degree


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `subsets` random subsets (without replacement, at most `subset_size` per set) of the
    unbiased MMD^2 with the cubic polynomial kernel: the Kernel Inception Distance on any features [N, D]."""
    x, y = (torch.as_tensor(f).to(F64) for f in (features1, features2))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 2:
        raise UnifuseError(f"KID needs two feature sets [N >= 2, D] with equal D, got {tuple(x.shape)} and "
                           f"{tuple(y.shape)}")
    size = min(subset_size, x.shape[0], y.shape[0])
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(x.shape[0], generator=g)[:size]]
        b = y[torch.randperm(y.shape[0], generator=g)[:size]]
        values.append(mmd2_unbiased(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)))
    v = torch.stack(values)
    return float(v.mean()), float(v.std()) if subsets > 1 else 0.0


__all__ = ["kid", "mmd2_unbiased", "polynomial_kernel"]

"""Training time densities (NOTATION section 7): plain `rand_*` functions returning native times.

Every density is a law on log-SNR pushed through the path's own inverse, so one function serves every
family: EDM's log-normal sigma (Karras et al. 2022) is TrigFlow's arctan(e^tau / sigma_d) (Lu & Song
2024) and, with (m, s), SD3's logit-normal rectified-flow time (Esser et al. 2024). Times are float64
tensors [n] on the generator's device. `ImportanceSampler` is Improved DDPM's loss-second-moment
resampler (Nichol & Dhariwal 2021, section 3.3).
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError
from ..paths.base import Path
from ..paths.ddpm import DDPM

F64 = torch.float64


def _where(generator, device):
    return generator.device if generator is not None else torch.device(device or "cpu")


def _randn(n, generator=None, device=None):
    return torch.randn(n, generator=generator, device=_where(generator, device), dtype=F64)


def _rand(n, generator=None, device=None):
    return torch.rand(n, generator=generator, device=_where(generator, device), dtype=F64)


def training_range(path: Path, lo: float | None = None, hi: float | None = None) -> tuple:
    """[lo, hi] of native training times: [t_eps, t_max] unless given (VE starts at t = 0)."""
    lo = float(path.t_eps if lo is None else lo)
    hi = float(path.t_max if hi is None else hi)
    if not (math.isfinite(lo) and lo < hi):
        raise UnifuseError(f"training time range [{lo}, {hi}] is empty or infinite for {path!r}; pass t_lo < t_hi")
    return lo, hi


def rand_uniform(n: int, path: Path, lo: float | None = None, hi: float | None = None, *, generator=None, device=None):
    """t ~ U(lo, hi) in native time (score SDE: U(1e-5, 1); rectified flow: U(0, 1))."""
    lo, hi = training_range(path, lo, hi)
    return lo + (hi - lo) * _rand(n, generator, device)


def rand_index(n: int, path: Path, *, generator=None, device=None):
    """n ~ U{0, ..., N-1}: the integer step of a discrete DDPM path (Ho et al. 2020), as float64."""
    if not isinstance(path, DDPM):
        raise UnifuseError(f"integer time steps need a discrete DDPM path, got {path!r}; use rand_uniform")
    where = _where(generator, device)
    return torch.randint(0, path.N, (n,), generator=generator, device=where).to(F64)


def rand_log_normal(n: int, path: Path, mean: float = -1.2, std: float = 1.2, *, generator=None, device=None):
    """log sigma_edm ~ N(mean, std^2) (EDM: -1.2, 1.2; iCT/ECT: -1.1, 2.0; TrigFlow's tau), as native t."""
    sigma = torch.exp(mean + std * _randn(n, generator, device))
    return path.t_from_sigma_edm(sigma).clamp(path.t_eps, path.t_max)


def rand_logit_normal(n: int, path: Path, mean: float = 0.0, std: float = 1.0, *, generator=None, device=None):
    """Rectified-flow t = sigmoid(z), z ~ N(mean, std^2) (SD3), carried to any path at equal log-SNR."""
    z = mean + std * _randn(n, generator, device)
    return path.t_from_log_snr(-2.0 * z).clamp(path.t_eps, path.t_max)


def rand_logsnr_uniform(n: int, path: Path, lo: float | None = None, hi: float | None = None,
                        *, generator=None, device=None, clip=20.0):
    """lambda ~ U(lambda(hi), lambda(lo)): importance sampling for the likelihood weighting (Song et al. 2021b),
    and the noise levels of a noise-conditional classifier (clip: a bound, or the pair (lam_min, lam_max))."""
    lam_lo, lam_hi = logsnr_range(path, lo, hi, clip)
    lam = lam_lo + (lam_hi - lam_lo) * _rand(n, generator, device)
    return path.t_from_log_snr(lam)


def logsnr_range(path: Path, lo=None, hi=None, clip=20.0) -> tuple:
    """(lambda at hi, lambda at lo), clipped to [-clip, clip] (or to clip = (lam_min, lam_max)), e.g. where the
    path reaches SNR 0 or infinity."""
    lo, hi = training_range(path, lo, hi)
    bounds = clip if isinstance(clip, (tuple, list)) else (-clip, clip)
    lam_hi = float(path.log_snr(torch.tensor(lo, dtype=F64)).clamp(*bounds))
    lam_lo = float(path.log_snr(torch.tensor(hi, dtype=F64)).clamp(*bounds))
    return lam_lo, lam_hi


TIME_DENSITIES = {
    "uniform": rand_uniform,
    "index": rand_index,
    "log_normal": rand_log_normal,
    "logit_normal": rand_logit_normal,
    "logsnr_uniform": rand_logsnr_uniform,
}


class ImportanceSampler:
    """Improved-DDPM importance sampling of DDPM steps: p_n proportional to sqrt(E[L_n^2]) over the last
    `history` losses of step n, mixed with `uniform_prob` of the uniform law; uniform until every step has
    `history` losses. `sample` returns (n, w) with w = 1 / (N p_n), so E[w L] is the uniform-step loss."""

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 1e-3):
        self.N, self.history, self.uniform_prob = int(num_steps), int(history), float(uniform_prob)
        self.losses = torch.zeros(self.N, self.history, dtype=F64)
        self.counts = torch.zeros(self.N, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        if not bool((self.counts >= self.history).all()):
            return torch.full((self.N,), 1.0 / self.N, dtype=F64)
        p = torch.sqrt((self.losses**2).mean(1))
        p = p / p.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.N

    def sample(self, n: int, *, generator=None, device=None):
        p = self.probabilities()
        where = _where(generator, device)
        idx = torch.multinomial(p.to(where), n, replacement=True, generator=generator)
        return idx.to(F64), (1.0 / (self.N * p.to(where)[idx])).to(F64)

    def update(self, steps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses at integer steps (all processes' values, in the same order everywhere)."""
        for n, loss in zip(steps.detach().long().cpu().tolist(), losses.detach().to("cpu", F64).tolist()):
            if self.counts[n] == self.history:
                self.losses[n, :-1] = self.losses[n, 1:].clone()
                self.losses[n, -1] = loss
            else:
                self.losses[n, self.counts[n]] = loss
                self.counts[n] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"]), self.counts.copy_(state["counts"])


__all__ = ["rand_uniform", "rand_index", "rand_log_normal", "rand_logit_normal", "rand_logsnr_uniform",
           "training_range", "logsnr_range", "TIME_DENSITIES", "ImportanceSampler"]

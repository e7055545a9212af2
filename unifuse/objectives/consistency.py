"""Consistency training from scratch: iCT (Song & Dhariwal 2023) and ECT (Geng et al. 2024), ALGORITHMS 16-17.

Both compare the model at a noisier point x_t = x + t z with a stop-gradient target at a less noisy point
x_r = x + r z on the same noise z (sigma_edm units; any path through equal log-SNR):

    loss = d(f_theta(x_t, t), stopgrad f_theta(x_r, r)) / (t - r),   d = pseudo-Huber sqrt(|.|^2 + c^2) - c

    ict   t, r adjacent points of a Karras grid (rho = 7) on [sigma_min, sigma_max] with N(k) points,
          N(k) = min(s0 2^floor(k/K'), s1) + 1, the interval drawn with log-normal(P_mean, P_std) mass
    ect   t ~ log-normal(P_mean, P_std), r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), r >= 0,
          stage = step // stage_every; r = 0 makes the target the data itself (diffusion pre-training)

The target evaluation reuses the online evaluation's random state, so dropout masks agree.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import UnifuseError, choose
from ..model import DiffusionModel
from ..paths.grids import karras_sigmas
from .losses import draw_noise

F64 = torch.float64


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||diff||^2 + c^2) - c per sample (norm over all non-batch dims); c = 0 gives the L2 norm."""
    sq = diff.reshape(diff.shape[0], -1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def ict_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT discretisation N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's r(t) = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0."""
    return (t * (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)


@contextlib.contextmanager
def _same_random_state(device: torch.device):
    """Run a block and then restore the random state, so the next block draws the same dropout masks."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        yield


@dataclass(frozen=True)
class ConsistencyTrainingLoss:
    """Consistency training (iCT or ECT schedule) with the pseudo-Huber metric; per-sample losses [B].

    huber_c: None gives 0.00054 sqrt(d) (iCT); 0 the plain L2 norm. sigma_min/max bound the noise levels
    in sigma_edm units (the model's boundary condition sits at sigma_min)."""

    schedule: str = "ect"
    P_mean: float = -1.1
    P_std: float = 2.0
    huber_c: float | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    s0: int = 10                 # iCT
    s1: int = 1280
    total_steps: int = 400_000
    q: float = 2.0               # ECT
    k: float = 8.0
    b: float = 1.0
    stage_every: int = 25_000

    def __post_init__(self):
        choose("consistency schedule", self.schedule, ("ict", "ect"))
        if self.stage_every < 1 or self.total_steps < 1:
            raise UnifuseError("stage_every and total_steps must be >= 1")

    def noise_levels(self, n: int, step: int, generator=None, device=None):
        """(t, r) in sigma_edm units, float64 [n], with t > r >= 0."""
        where = generator.device if generator is not None else torch.device(device or "cpu")
        if self.schedule == "ict":
            sig = karras_sigmas(ict_steps(step, self.total_steps, self.s0, self.s1), self.sigma_min, self.sigma_max)
            cdf = torch.erf((torch.log(sig) - self.P_mean) / (math.sqrt(2) * self.P_std))
            p = cdf[1:] - cdf[:-1]
            i = torch.multinomial((p / p.sum()).to(where), n, replacement=True, generator=generator)
            sig = sig.to(where)
            return sig[i + 1], sig[i]
        z = torch.randn(n, generator=generator, device=where, dtype=F64)
        t = torch.exp(self.P_mean + self.P_std * z).clamp(self.sigma_min, self.sigma_max)
        return t, ect_r(t, step // self.stage_every, self.q, self.k, self.b)

    def __call__(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *, generator=None,
                 step: int = 0, target_model: DiffusionModel | None = None) -> torch.Tensor:
        cond = cond or {}
        path = model.path
        s_t, s_r = self.noise_levels(x.shape[0], step, generator, x.device)
        noise = draw_noise(x, generator)
        # r = 0 is the data end, where the consistency function is the identity: evaluate the target at a
        # finite noise level there (c_noise is -inf at sigma = 0) and replace it by the data below.
        t, r = path.t_from_sigma_edm(s_t), path.t_from_sigma_edm(s_r.clamp(min=self.sigma_min))
        x_t = path.interpolate(x, noise, t).to(x.dtype)
        x_r = path.interpolate(x, noise, r).to(x.dtype)
        target_model = model if target_model is None else target_model
        with _same_random_state(x.device), torch.no_grad():
            target = target_model.denoise(x_r, r, **cond)
        zero = (s_r == 0).reshape((-1,) + (1,) * (x.ndim - 1))
        target = torch.where(zero, x.to(target.dtype), target)
        online = model.denoise(x_t, t, **cond)
        c = 0.00054 * math.sqrt(x[0].numel()) if self.huber_c is None else self.huber_c
        return pseudo_huber(online - target, c) / (s_t - s_r).to(online.dtype)


__all__ = ["ConsistencyTrainingLoss", "pseudo_huber", "ict_steps", "karras_sigmas", "ect_r"]

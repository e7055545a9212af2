"""Shortcut models: one network for every step size, by self-consistency (Frans, Hafner, Levine, Abbeel 2024).

The paper's s(x_t, t, d), the slope of a jump of size d, is the average velocity u(x_t, r, t) with r = t - d
(`meanflow`): on the rectified-flow path (t = 0 data, t = 1 noise, so a jump decreases t)

    x_{t - d} = x_t - d u_d(x_t, t),   u_d(x_t, t) = u(x_t, t - d, t),   u_0 = v (the instantaneous velocity).

Two consecutive jumps of size d make one of size 2d, which gives the self-consistency target

    u_{2d}(x_t, t) = 1/2 [ u_d(x_t, t) + u_d(x_t - d u_d(x_t, t), t - d) ]

(exact for the exact average velocity: (x_t - x_{t-2d}) / 2d is the mean of the two half slopes). The loss is

    flow matching on (1 - k) of the batch:  || u_theta(x_t, t, t) - (e - x) ||^2,       t ~ U(0, 1)
    self-consistency on k of the batch:     || u_theta(x_t, t - 2d, t) - stopgrad(u_{2d}) ||^2,
        d = 2^-j, j ~ U{1, ..., log2 M}, t ~ U{2d, 4d, ..., 1} (the jump stays in [0, 1]),

with the targets from the online network or an EMA copy (`target_model=`). The model is read exactly as in
MeanFlow (`meanflow.average_velocity`: a two-time network predicting "velocity" on "rf").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.conditions import select
from ..errors import UnifuseError, choose
from ..model import DiffusionModel
from .losses import draw_noise, mean_dims
from .meanflow import average_velocity, check_average_model

F64 = torch.float64


def shortcut_target(model: DiffusionModel, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                    cond: dict | None = None) -> torch.Tensor:
    """u_{2d}(x_t, t) = (u_d(x_t, t) + u_d(x_t - d u_d(x_t, t), t - d)) / 2, two half jumps of the model (no graph).
    t, d: [B] float64 native times and half-jump sizes (t >= 2d)."""
    cond = cond or {}
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    with torch.no_grad():
        u1 = average_velocity(model, x_t, t - d, t, cond)
        x_mid = x_t - d.to(x_t.dtype).reshape(shape) * u1
        u2 = average_velocity(model, x_mid, t - 2 * d, t - d, cond)
    return (0.5 * (u1 + u2)).detach()


@dataclass(frozen=True)
class ShortcutLoss:
    """The shortcut-model objective (Frans et al. 2024) on a two-time velocity model on the rf path; losses [B].

    fraction: the share k of the batch trained by self-consistency, 1/4 here (the reference code uses 1/8 at
    batch 256; a quarter gives small-data runs enough jumps); steps: M, the finest grid, so the smallest half
    jump is 1/M (the reference's M = 128); target: "online" (the network being trained, under no_grad: the default for
    small data, where an EMA lags a short run) or "ema" (the reference: pass `target_model=` the EMA model).
    Flow-matching times are uniform (the reference's)."""

    fraction: float = 0.25
    steps: int = 128
    target: str = "online"

    def __post_init__(self):
        choose("shortcut target", self.target, ("online", "ema"))
        if not 0.0 <= self.fraction <= 1.0:
            raise UnifuseError(f"shortcut fraction must lie in [0, 1], got {self.fraction}")
        if self.steps < 2 or self.steps & (self.steps - 1):
            raise UnifuseError(f"shortcut steps must be a power of two >= 2 (the finest grid), got {self.steps}")

    def sample_jumps(self, n: int, generator=None, device=None):
        """(t, d), float64 [n]: d = 2^-j, j ~ U{1..log2 steps}, t ~ U{2d, 4d, ..., 1}."""
        where = generator.device if generator is not None else torch.device(device or "cpu")
        levels = int(math.log2(self.steps))
        j = torch.randint(1, levels + 1, (n,), generator=generator, device=where)
        d = torch.pow(torch.tensor(0.5, dtype=F64, device=where), j.to(F64))
        u = torch.rand(n, generator=generator, device=where, dtype=F64)
        k = torch.floor(u * (1.0 / (2 * d))) + 1  # 1 .. 1/(2d)
        return (k * 2 * d).clamp(max=1.0), d

    def losses(self, model: DiffusionModel, x, noise, t_fm, t_sc, d, cond=None, target_model=None):
        """Per-sample losses for given draws: flow matching on the first B - n_sc samples at t_fm, self-
        consistency on the last n_sc = len(t_sc) samples at (t_sc, half jump d)."""
        check_average_model(model, "the shortcut objective")
        cond, n_fm = cond or {}, x.shape[0] - t_sc.shape[0]
        t = torch.cat([t_fm, t_sc]).to(x.device)
        r = torch.cat([t_fm, t_sc - 2 * d]).to(x.device)
        x_t = model.path.interpolate(x, noise, t).to(x.dtype)
        target = (noise - x).to(x_t.dtype)
        if n_fm < x.shape[0]:
            ref = model if target_model is None else target_model
            rows = torch.arange(n_fm, x.shape[0], device=x.device)
            sc = shortcut_target(ref, x_t[n_fm:], t[n_fm:], d.to(x.device), select(cond, rows, x.shape[0]))
            target = torch.cat([target[:n_fm], sc.to(target.dtype)])
        return mean_dims((average_velocity(model, x_t, r, t, cond) - target) ** 2)

    def __call__(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *, generator=None,
                 step: int = 0, target_model: DiffusionModel | None = None) -> torch.Tensor:
        if self.target == "ema" and target_model is None:
            raise UnifuseError("shortcut target='ema' needs target_model= (the EMA model); or use target='online'")
        B = x.shape[0]
        n_sc = round(self.fraction * B)
        where = generator.device if generator is not None else x.device
        t_fm = torch.rand(B - n_sc, generator=generator, device=where, dtype=F64)
        t_sc, d = self.sample_jumps(n_sc, generator, x.device)
        noise = draw_noise(x, generator)
        return self.losses(model, x, noise, t_fm, t_sc, d, cond, target_model)


__all__ = ["ShortcutLoss", "shortcut_target"]

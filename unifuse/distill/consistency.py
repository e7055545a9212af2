"""Consistency distillation (Song, Dhariwal, Chen, Sutskever 2023; ALGORITHMS card 16) and consistency fine-tuning
of the pre-trained model (ECT, Geng et al. 2024; card 17).

CD. On a Karras grid sigma_1 < ... < sigma_N (rho = 7, EDM noise levels sigma/alpha on the student's path, native
times t_i = t_from_sigma_edm(sigma_i)), with n ~ U{1..N-1} and z ~ N(0, I):

    x_{n+1} = alpha(t_{n+1}) x + sigma(t_{n+1}) z
    x^_n    = Phi(x_{n+1}; t_{n+1} -> t_n)          one teacher PF-ODE step: Heun (EDM Algorithm 1) or Euler
    loss    = lambda_n d( f_theta(x_{n+1}, t_{n+1}), f_theta^-(x^_n, t_n) )
    d(a, b) = sqrt(||a - b||^2 + c^2) - c  (pseudo-Huber, c = 0.00054 sqrt(D))   or   mean_dims (a - b)^2  ("l2")
    lambda_n = 1  or  1 / (sigma_{n+1} - sigma_n)
    theta^- = stopgrad(theta) (target_ema = 0)   or   theta^- <- stopgrad(mu theta^- + (1 - mu) theta)

f_theta is the student's denoised estimate. With an EDM teacher the student is the same network under the
boundary-condition scalings (kind "consistency": f(x, sigma_1) = x exactly); otherwise it keeps the teacher's kind.
The target's evaluation reuses the online evaluation's random state (the same dropout masks).

CFT. Easy consistency tuning from the pre-trained weights: the loss of `objectives.ConsistencyTrainingLoss` with the
ECT schedule, t ~ log-normal(P_mean, P_std), r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), its stages spread
evenly over the budget (stage = floor(progress * stages)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..errors import UnifuseError, choose
from ..objectives.consistency import ConsistencyTrainingLoss, _same_random_state, pseudo_huber
from ..objectives.losses import draw_noise, mean_dims
from ..paths.grids import karras_sigmas
from ..samplers.steps import step_euler, step_heun
from .base import Context, frozen_copy, rebind

F64 = torch.float64
SOLVERS = {"heun": step_heun, "euler": step_euler}


def consistency_kind(teacher_prediction: str) -> str | None:
    """The student's kind: "consistency" for an EDM teacher (the same network, boundary scalings), else the
    teacher's own (None)."""
    return "consistency" if teacher_prediction == "edm" else None


def sigma_range(ctx: Context, sigma_min: float | None, sigma_max: float | None) -> tuple:
    """(lo, hi) in sigma_edm on the student's path: lo = max(0.002, the student's boundary, the teacher's least
    noisy level), hi = min(80, both noise ends), unless given."""
    path = ctx.student.path
    level = lambda t: float(path.sigma_edm(torch.tensor(float(t), dtype=F64)))
    if sigma_min is None:
        sigma_min = max(0.002, float(ctx.student.boundary), level(ctx.teacher.t_eps))
    if sigma_max is None:
        sigma_max = min(80.0, level(ctx.student.t_max), level(ctx.teacher.t_max))
    if not 0 < sigma_min < sigma_max:
        raise UnifuseError(f"empty noise range [{sigma_min}, {sigma_max}] for consistency distillation")
    return float(sigma_min), float(sigma_max)


class CDPair(NamedTuple):
    """The online input x_{n+1} at t_{n+1}, the teacher's step x^_n at t_n (native times, float64 [B]), and
    sigma_{n+1} - sigma_n."""

    x_next: torch.Tensor
    t_next: torch.Tensor
    x_hat: torch.Tensor
    t_now: torch.Tensor
    gap: torch.Tensor


@dataclass
class ConsistencyStudent:
    """What the two consistency methods share: the student (the teacher's network under the boundary scalings for an
    EDM teacher), its multistep consistency sampler on the `renoise` grid, any NFE, an evaluation EMA."""

    sigma_min: float | None = None
    sigma_max: float | None = None
    ema: bool = True
    student_path: str | None = None
    student_prediction: str | None = None
    sampler: ClassVar[str] = "consistency"
    spacing: ClassVar[str] = "renoise"
    nfe: ClassVar[tuple | None] = None

    def student_kind(self, teacher_prediction: str) -> str | None:
        return consistency_kind(teacher_prediction)


@dataclass
class ConsistencyDistillation(ConsistencyStudent):
    """Consistency distillation (card 16) with the teacher's own ODE step.

    steps = 18 Karras points (the CM code uses N = 40 on ImageNet-64; 18 suits small data), solver = "heun" (the
    CM code's; "euler" also in the paper), metric = "pseudo_huber" with huber_c = 0.00054 sqrt(D) (iCT, card 17;
    LPIPS is not available here) or "l2", weighting = "inverse_step" (1/(sigma_{n+1} - sigma_n), iCT's partner of
    pseudo-Huber; on 2-D data it converges where lambda = 1 does not) or "uniform" (lambda = 1, the CM paper's
    choice with L2/LPIPS), target_ema = 0 (stop-gradient, iCT; the CM code's CD uses 0.95),
    sigma range [0.002, 80] clipped to both models' ranges. Evaluation EMA on (the CM paper's 0.9999 decay is the
    loop's). The student samples with "consistency" at any NFE.
    """

    steps: int = 18
    solver: str = "heun"
    metric: str = "pseudo_huber"
    huber_c: float | None = None
    weighting: str = "inverse_step"
    target_ema: float = 0.0
    rho: float = 7.0
    name: ClassVar[str] = "cd"

    def __post_init__(self):
        choose("consistency-distillation solver", self.solver, SOLVERS)
        choose("consistency metric", self.metric, ("pseudo_huber", "l2"))
        choose("consistency weighting", self.weighting, ("uniform", "inverse_step"))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise UnifuseError(f"steps must be an integer >= 2 (points of the Karras grid), got {self.steps!r}")
        if not 0.0 <= self.target_ema < 1.0:
            raise UnifuseError(f"target_ema must lie in [0, 1), got {self.target_ema}")
        self._grid = None

    def setup(self, ctx: Context) -> None:
        """The noise grid; with target_ema > 0 the EMA target network (checkpointed as "cd_target")."""
        self.grid(ctx)
        if self.target_ema > 0:
            target = frozen_copy(ctx.student_net).train(ctx.student_net.training)  # dropout as the online net
            ctx.add_net("cd_target", target)

    def grid(self, ctx: Context) -> tuple:
        """(sigma_1 < ... < sigma_N, their native times) on the student's path, float64."""
        if self._grid is None:
            lo, hi = sigma_range(ctx, self.sigma_min, self.sigma_max)
            sig = karras_sigmas(self.steps, lo, hi, self.rho)
            sig[0], sig[-1] = lo, hi  # exactly: the boundary condition holds at sigma_1 (the ramp rounds it)
            self._grid = (sig, ctx.student.path.t_from_sigma_edm(sig))
        return self._grid

    def pair(self, ctx: Context, x: torch.Tensor, cond: dict | None = None, generator=None) -> CDPair:
        """Draw n and z; x_{n+1} and the teacher's step x^_n (no gradients)."""
        sig, ts = self.grid(ctx)
        where = generator.device if generator is not None else x.device
        n = torch.randint(0, self.steps - 1, (x.shape[0],), generator=generator, device=where).cpu()
        noise = draw_noise(x, generator)
        t_next, t_now = ts[n + 1], ts[n]
        x_next = ctx.student.path.interpolate(x, noise, t_next).to(x.dtype)
        with torch.no_grad():
            x_hat = SOLVERS[self.solver](ctx.teacher, x_next, t_next, t_now, cond=cond or {}).to(x.dtype)
        return CDPair(x_next, t_next, x_hat, t_now, sig[n + 1] - sig[n])

    def _update_target(self, ctx: Context):
        """theta^- <- mu theta^- + (1 - mu) theta (before each loss: after the previous optimizer step)."""
        target = ctx.nets["cd_target"]
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), ctx.student_net.parameters()):
                p_t.lerp_(p.detach().to(p_t.dtype), 1.0 - self.target_ema)
            for b_t, b in zip(target.buffers(), ctx.student_net.buffers()):
                b_t.copy_(b)
        return rebind(ctx.student, target)

    def loss(self, ctx: Context, x: torch.Tensor, cond: dict, *, generator=None, step: int = 0) -> torch.Tensor:
        """lambda_n d(f_theta(x_{n+1}, t_{n+1}), f_theta^-(x^_n, t_n)) per sample."""
        cond = cond or {}
        target_model = self._update_target(ctx) if self.target_ema > 0 else ctx.student
        p = self.pair(ctx, x, cond, generator)
        dev = x.device
        with _same_random_state(dev), torch.no_grad():
            target = target_model.denoise(p.x_hat, p.t_now.to(dev), **cond)
        online = ctx.student.denoise(p.x_next, p.t_next.to(dev), **cond)
        diff = online - target.to(online.dtype)
        if self.metric == "l2":
            d = mean_dims(diff * diff)
        else:
            d = pseudo_huber(diff, 0.00054 * math.sqrt(x[0].numel()) if self.huber_c is None else self.huber_c)
        if self.weighting == "inverse_step":
            d = d / p.gap.to(dev, d.dtype)
        return d


@dataclass
class ConsistencyFineTuning(ConsistencyStudent):
    """Consistency fine-tuning from the pre-trained weights: ECT (card 17), `ConsistencyTrainingLoss(schedule="ect")`
    as it is, its stage advancing `stages` times over the budget (stage = floor(progress * stages)).

    Defaults are ECT's: P_mean = -1.1, P_std = 2.0, q = 2, k = 8, b = 1, pseudo-Huber c = 0.00054 sqrt(D)
    (huber_c = None); stages = 16, the objective's own default ratio (400k steps, a stage every 25k); the sigma range
    as in CD. The student's kind follows CD ("consistency" for an EDM teacher); it samples with "consistency".
    lr_scale = 0.2: the loop's rate is the data set's distillation rate times this (ECT's 1 / (t - r) weighting
    grows 2^stages-fold over the run; at the full rate the 2-D student ended 12.8x the teacher, at 0.2x 1.4x).
    """

    stages: int = 16
    P_mean: float = -1.1
    P_std: float = 2.0
    huber_c: float | None = None
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    name: ClassVar[str] = "cft"
    lr_scale: ClassVar[float] = 0.2

    def __post_init__(self):
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise UnifuseError(f"stages must be a positive integer, got {self.stages!r}")
        self._loss = None

    def setup(self, ctx: Context) -> None:
        lo, hi = sigma_range(ctx, self.sigma_min, self.sigma_max)
        # stage_every = 1 with step = the stage index: the objective's stage is ours, whatever the budget's unit
        self._loss = ConsistencyTrainingLoss(schedule="ect", P_mean=self.P_mean, P_std=self.P_std,
                                             huber_c=self.huber_c, sigma_min=lo, sigma_max=hi, q=self.q, k=self.k,
                                             b=self.b, stage_every=1, total_steps=max(int(ctx.total_steps), 1))

    def stage(self, progress: float) -> int:
        return min(max(math.floor(progress * self.stages), 0), self.stages - 1)

    def loss(self, ctx: Context, x: torch.Tensor, cond: dict, *, generator=None, step: int = 0) -> torch.Tensor:
        if self._loss is None:
            self.setup(ctx)
        ctx.scalars["stage"] = self.stage(ctx.progress)
        return self._loss(ctx.student, x, cond, generator=generator, step=self.stage(ctx.progress))


__all__ = ["ConsistencyDistillation", "ConsistencyFineTuning", "CDPair", "consistency_kind", "sigma_range"]

"""Continuous-time consistency distillation and fine-tuning on TrigFlow: sCD and sCT (Lu & Song 2024; card 18).

The student lives on TrigFlow (x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), sigma_d = the model's sigma_data),
starts from the teacher's weights in the teacher's own prediction kind (re-expressed on TrigFlow by the loop: an EDM
network seen on TrigFlow is exactly the TrigFlow parameterisation, F_trig = -F_edm), and is trained with the sCM
loss of `objectives.scm.SCTLoss`:

    f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t, t)
    g    = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt),  g <- g / (||g|| + c)
    loss = exp(-u_phi(t)) / D ||F_theta - F^- - g||^2 + u_phi(t)

    scd   dx_t/dt = the frozen teacher's PF-ODE velocity at (x_t, t)        (consistency distillation)
    sct   dx_t/dt = cos t z - sin t x0, the conditional velocity            (consistency training / fine-tuning)

The adaptive-weight head u_phi is a network of its own ("weight_head" in every checkpoint) with its own Adam
optimizer. It is stepped inside `loss` on the same batch: it takes the gradient of exp(-u) mse + u with mse held
fixed, and the student's loss uses u held fixed, which is exactly the joint update of (theta, phi) of the paper
(under data parallelism the head's gradient is averaged over ranks first).

Sampling: the "consistency" sampler (1 step: x = f(z, t_max); 2 steps: renoise to t_mid = 1.1 and apply f again).
`sample_times(K, sigma_d)` gives the paper's grid [t_max, t_mid, 0] for K = 2 (t_max = arctan(80 / sigma_d));
the CLI's `sample.spacing` cannot yet hold such a grid (see the method's docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnifuseError
from ..objectives.scm import T_CLAMP, SCTLoss, trigflow_sigma_d
from .base import Context

HALF_PI = math.pi / 2


def time_embedding_parameters(net: nn.Module) -> list:
    """The parameters that read the sinusoidal features of the noise label: `embed.time` of the library's networks
    (layers.ConditionEmbedding in MLP, UNet, DiT) and `time_embedding` of a diffusers UNet."""
    from ..nets.layers import ConditionEmbedding

    params = []
    for name, module in net.named_modules():
        if isinstance(module, ConditionEmbedding):
            params += list(module.time.parameters())
        elif name.split(".")[-1] == "time_embedding":
            params += list(module.parameters())
    return params


def freeze_time_embedding(net: nn.Module) -> int:
    """Keep the time-embedding MLP at its initial (the teacher's) weights: their gradients are replaced by zeros
    (a hook, so data-parallel gradient averaging sees the same parameters on every rank; Adam then moves them by
    0 / (0 + eps) = 0, exactly, with weight_decay = 0). Returns how many tensors were frozen."""
    params = time_embedding_parameters(net)
    for p in params:
        p.register_hook(torch.zeros_like)
    return len(params)


@dataclass
class SCT:
    """sCT: continuous-time consistency fine-tuning from the teacher's weights (dx_t/dt = cos t z - sin t x0).

    Defaults: P_mean = -1.0, P_std = 1.4 (card 18 for sCT; FastGen's sCM), c = 0.1 with the paper's per-sample L2
    tangent norm (norm="rms": FastGen's), warmup = 1000 steps (sCM-mnist; FastGen's 10k exceeds the few-thousand-step
    budgets of small data), adaptive = True (the paper) with the head trained by Adam at head_lr = 1e-3 (a tiny
    zero-initialised head that must follow the loss within a short run), prior_weighting = False (sCM-mnist finds
    1/(sigma_d tan t) destabilising), jvp = "auto" (torch.func.jvp on a GPU, central differences on a CPU,
    where forward-mode AD costs 8-10 forwards against 2; central differences also where an op has no forward-mode
    formula; "fd" and "autodiff" force one), window = 0.1 (the tangent is the secant over +-0.1 in log sigma:
    `objectives.scm`; 0 with jvp="autodiff" for the pointwise derivative), t_mid = 1.1 for two steps (card 18,
    unverified), evaluation EMA on.

    Stability on the library's networks (issue 13). Their time embedding is sinusoidal(c_noise) with c_noise = 250
    log sigma (EDM teachers): the paper's unstable case (large time-embedding frequencies). The sCM target carries
    the student's own d/dt, so high-frequency structure in t that training adds feeds back: on the 2-D 8-gaussians
    teacher the pointwise tangent of the student grew 3.7 -> 268 within 1,500 steps and the one-step samples
    diverged once r -> 1. Three defaults stop it: the secant tangent (window), freeze_time = True (the MLP that
    reads the sinusoidal features, `embed.time`, keeps the teacher's weights, so training cannot add new
    frequencies in t; with it the tangent stayed at 4-9 over the same run), and lr_scale = 0.2 (the loop's rate is
    the data set's distillation rate times this: 1e-4 on 2-D data, 4e-5 on digits; the paper's small rate).

    The two-step grid: `uf.sample(student, noise, "consistency", spacing=method.sample_times(2, sigma_d))` uses it; a run's
    config stores `sample.spacing` as a name, so `unifuse sample` uses the consistency sampler's Karras grid until
    the loop stores explicit times (reported in the issue).
    """

    P_mean: float = -1.0
    P_std: float = 1.4
    warmup: int = 1000
    c: float = 0.1
    norm: str = "l2"
    adaptive: bool = True
    head_lr: float = 1e-3
    prior_weighting: bool = False
    jvp: str = "auto"
    window: float = 0.1
    freeze_time: bool = True
    t_mid: float = 1.1
    ema: bool = True
    student_path: str | None = "trigflow"
    student_prediction: str | None = None
    name: ClassVar[str] = "sct"
    lr_scale: ClassVar[float] = 0.2
    sampler: ClassVar[str] = "consistency"
    spacing: ClassVar[str] = "renoise"
    nfe: ClassVar[tuple | None] = None
    distilled: ClassVar[bool] = False

    def __post_init__(self):
        if self.student_path != "trigflow":
            raise UnifuseError(f"{self.name} trains a TrigFlow consistency model; student_path must be 'trigflow', "
                               f"got {self.student_path!r}")
        if not 0.0 < self.t_mid < HALF_PI:
            raise UnifuseError(f"t_mid must lie in (0, pi/2), got {self.t_mid}")
        if self.head_lr <= 0:
            raise UnifuseError(f"head_lr must be positive, got {self.head_lr}")
        self.objective = SCTLoss(self.P_mean, self.P_std, self.warmup, self.c, self.norm, self.adaptive,
                                 self.prior_weighting, self.jvp, window=self.window)

    def setup(self, ctx: Context) -> None:
        """Check the student's TrigFlow sigma_d; keep the teacher's time embedding (`freeze_time`); register the
        adaptive-weight head and its optimizer."""
        trigflow_sigma_d(ctx.student)
        if self.freeze_time:
            freeze_time_embedding(ctx.student_net)
        if self.jvp == "auto" and ctx.device.type == "cpu":  # forward-mode AD costs ~8-10 forwards on CPU; fd two
            self.objective.jvp = "fd"
        head = self.objective.head
        if head is not None:
            ctx.add_net("weight_head", head)
            ctx.add_optimizer("weight_head", torch.optim.Adam(head.parameters(), lr=self.head_lr))

    def loss(self, ctx: Context, x: torch.Tensor, cond: dict, *, generator=None, step: int = 0) -> torch.Tensor:
        """Per-sample sCM losses [B]; steps the weight head first (the joint update of theta and phi)."""
        teacher = ctx.teacher if self.distilled else None
        terms = self.objective.terms(ctx.student, x, cond, generator=generator, step=step, teacher=teacher)
        u = terms.u
        if self.objective.head is not None:
            self._step_head(ctx, terms)
            u = u.detach()
        return torch.where(terms.ok, torch.exp(-u) * terms.mse + u, torch.zeros_like(terms.mse))

    def _step_head(self, ctx: Context, terms) -> None:
        """One Adam step of u_phi on mean(exp(-u) mse + u) with mse fixed (gradients averaged over ranks)."""
        head, opt = self.objective.head, ctx.optimizers["weight_head"]
        opt.zero_grad(set_to_none=True)
        mse = terms.mse.detach()
        head_loss = torch.where(terms.ok, torch.exp(-terms.u) * mse + terms.u, torch.zeros_like(mse)).mean()
        head_loss.backward(inputs=list(head.parameters()))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in head.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_times(self, nfe: int, sigma_d: float = 0.5, sigma_max: float = 80.0) -> torch.Tensor:
        """The student's grid for `nfe` consistency steps: [t_max, t_mid, ..., 0] with t_max = arctan(sigma_max /
        sigma_d) (card 18: 1.5645 for 80 / 0.5; pi/2 is barely trained) and the intermediate times evenly spaced
        in t from t_mid down (K = 2: [t_max, 1.1, 0], the paper's)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise UnifuseError(f"nfe must be a positive integer, got {nfe!r}")
        t_max = min(math.atan(sigma_max / sigma_d), HALF_PI - T_CLAMP)
        mids = [self.t_mid * (nfe - i) / (nfe - 1) for i in range(1, nfe)] if nfe > 1 else []
        return torch.tensor([t_max, *mids, 0.0], dtype=torch.float64)


@dataclass
class SCD(SCT):
    """sCD: continuous-time consistency distillation, dx_t/dt = the frozen teacher's velocity at (x_t, t).

    Defaults as `SCT` except P_mean = -0.8, P_std = 1.6 (card 18's sCD values, unverified). Classifier-free
    guidance of the teacher's velocity is not applied (the teacher is used as given).
    """

    P_mean: float = -0.8
    P_std: float = 1.6
    name: ClassVar[str] = "scd"
    distilled: ClassVar[bool] = True


__all__ = ["SCD", "SCT"]

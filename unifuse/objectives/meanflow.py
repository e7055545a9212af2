"""MeanFlow: one-step generation by learning the average velocity (Geng, Deng, Bai, Kolter, He 2025).

On the rectified-flow path (t = 0 data, t = 1 noise)

    z_t = (1 - t) x + t e,   v = e - x,   dz_t/dt = v(z_t, t) = E[e - x | z_t]
    u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds = (z_t - z_r) / (t - r)        the average velocity over [r, t]

along the probability-flow ODE, so one jump is z_r = z_t - (t - r) u(z_t, r, t), and u(z, t, t) = v(z, t).
Differentiating (t - r) u = int_r^t v ds in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u

(the total derivative along the ODE: a Jacobian-vector product with tangents (v, 0, 1) in (z, r, t)). Training
regresses the network on the identity with the conditional velocity v = e - x in place of v(z_t, t):

    u_tgt = stopgrad(v - (t - r) JVP_{(v, 0, 1)} u_theta(z_t, r, t))
    loss  = w ||u_theta(z_t, r, t) - u_tgt||^2,   w = stopgrad(1 / (||.||^2 + c)^p)       (adaptive weight)

t and r are two logit-normal draws sorted so that t >= r, with r = t for a fraction of the batch (plain flow
matching there). The network is a two-time net (`nets`, two_times=True) read directly: its raw output at
(z_t, t, r) is u, so the model must predict "velocity" on the "rf" path (the library's prediction-kind conversions
assume the instantaneous field, so no other kind is read as an average velocity). `end_time(model, r)` gives the
network's r input in its own time units (`time_input`, 1000 t on rf with the training configs); `average_velocity`
evaluates u for the objectives here and in `shortcut`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.conditions import select
from ..errors import UnifuseError, choose
from ..model import DiffusionModel, ReexpressedModel, WrappedModel, network_input
from ..paths.continuous import RectifiedFlow
from ..tangent import METHODS as JVP_METHODS
from ..tangent import jvp, unwrap
from .consistency import _same_random_state
from .losses import draw_noise, mean_dims
from .time import rand_logit_normal

F64 = torch.float64


# --- two-time models -----------------------------------------------------------------------------------------
def is_two_time(model) -> bool:
    """Whether the model's network takes the end time r (`two_times=True`); transforms are looked through."""
    net = getattr(model, "net", None)
    return bool(getattr(unwrap(net), "two_times", False)) if net is not None else False


def owner(model) -> DiffusionModel:
    """The DiffusionModel whose network a model (or a guidance / thresholding transform of it) evaluates.
    A two-time model seen on another path (`model.on`) is refused: its r would need the same time change."""
    base = model
    while isinstance(base, WrappedModel):
        base = base.inner
    if isinstance(base, ReexpressedModel):
        raise UnifuseError("a two-time (average-velocity) model cannot be re-expressed on another path with on(): "
                           "its end time r is in its own path's time; sample it on its own path")
    return base


def end_time(model, r) -> dict:
    """The cond entry {"r": r in the network's time units} for end times r (native time, [B] or a scalar):
    model.time_input(r) (identity when the model has none), in float64 (the net casts it as it casts t)."""
    if not is_two_time(model):
        raise UnifuseError("this model's network takes no end time r; build it with two_times=True (nets.MLP, "
                           "UNet, DiT) to train or sample a few-step MeanFlow / shortcut model")
    base = owner(model)
    r = torch.as_tensor(r, dtype=F64) if not isinstance(r, torch.Tensor) else r
    return {"r": base.time_input(r) if base.time_input is not None else r}


def check_average_model(model: DiffusionModel, what: str) -> None:
    """Refuse, in one line, a model whose raw output is not the average velocity on the rf path."""
    if model.prediction != "velocity" or not isinstance(model.path, RectifiedFlow) or model.learned_variance:
        raise UnifuseError(f"{what} reads the network output as the average velocity u(z, r, t) on the rectified "
                           f"flow path; got prediction {model.prediction!r} on path {model.path!r}"
                           f"{' with learned variance' if model.learned_variance else ''}: set "
                           "model.prediction=velocity and model.path=rf (learned_variance off)")
    if not is_two_time(model):
        raise UnifuseError(f"{what} needs a two-time network (net(x, t, r=...)); build it with two_times=True")


def average_velocity(model: DiffusionModel, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond: dict,
                     net=None) -> torch.Tensor:
    """u_theta(z, r, t): the raw network output at native times t, r ([B] float64), through `net` (default
    model.net: the network as trained, possibly data-parallel; pass `unwrap(model.net)` for a tangent)."""
    net = model.net if net is None else net
    inp = network_input(model, t, z)  # the path's time input and input scale, differentiable in t
    zin = z * inp.x_scale if inp.x_scale is not None else z
    out = net(zin, inp.t_in, **end_time(model, r), **cond)
    return out.to(z.dtype) if out.dtype != z.dtype else out


def adaptive_weight(err: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """stopgrad(1 / (err + c)^p) (MeanFlow's adaptive loss weight; p = 0 gives 1)."""
    return torch.ones_like(err) if p == 0 else (err.detach() + c).pow(-p)


@dataclass(frozen=True)
class MeanFlowLoss:
    """MeanFlow's objective (Geng et al. 2025) on a two-time velocity model on the rf path; per-sample losses [B].

    Defaults are the reference's (the MeanFlow paper's ImageNet setting): t ~ logitN(-0.4, 1.0),
    r ~ logitN(-4.0, 1.6), sorted so that t >= r, r = t for r_equals_t = 0.75 of the batch, adaptive weight
    p = 0.75 with c = 1e-3 (p = 0: plain L2). The squared error is the mean over dimensions (the library's
    convention; the paper's sum only rescales w by D^-p and c). Small data (2-D points, 200 steps): the same
    densities work, r_equals_t = 0.5 spends more of a short budget on the jumps (one-step W2^2 0.008 against
    0.031 at 0.75), and the network should see native t (`DiffusionModel(time_input=None)`): fed 1000 t, the
    tangent of its high-frequency time features swamps the target (W2^2 0.14-0.21, no better than flow
    matching's one Euler step, 0.15). Only the samples with r != t need a tangent; it is computed on those rows.
    jvp: the tangent method of `unifuse.tangent.jvp` ("auto": forward-mode autodiff, finite differences where an
    op lacks a forward-mode formula). The tangent runs on the bare network (`tangent.unwrap`), the gradient-
    carrying forward through `model.net` (data-parallel gradient synchronisation happens there).
    """

    t_mean: float = -0.4
    t_std: float = 1.0
    r_mean: float = -4.0
    r_std: float = 1.6
    r_equals_t: float = 0.75
    p: float = 0.75
    c: float = 1e-3
    jvp: str = "auto"

    def __post_init__(self):
        choose("jvp method", self.jvp, JVP_METHODS)
        if not 0.0 <= self.r_equals_t <= 1.0 or self.p < 0 or self.c <= 0:
            raise UnifuseError(f"MeanFlow needs 0 <= r_equals_t <= 1, p >= 0 and c > 0; got r_equals_t="
                               f"{self.r_equals_t}, p={self.p}, c={self.c}")

    def sample_times(self, n: int, path, generator=None, device=None):
        """(t, r), float64 [n], t >= r: two logit-normal draws sorted, r = t for a fraction r_equals_t."""
        a = rand_logit_normal(n, path, self.t_mean, self.t_std, generator=generator, device=device)
        b = rand_logit_normal(n, path, self.r_mean, self.r_std, generator=generator, device=device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        where = generator.device if generator is not None else torch.device(device or "cpu")
        same = torch.rand(n, generator=generator, device=where, dtype=F64) < self.r_equals_t
        return t, torch.where(same.to(r.device), t, r)

    def target(self, model: DiffusionModel, z, v, r, t, cond: dict) -> torch.Tensor:
        """u_tgt = v - (t - r) d/dt u_theta(z, r, t), the JVP along (v, 0, 1) on the bare network, no graph."""
        net = unwrap(model.net)
        _, dudt = jvp(lambda zz, tt: average_velocity(model, zz, r, tt, cond, net), (z, t),
                      (v, torch.ones_like(t)), method=self.jvp)
        gap = (t - r).to(z.dtype).reshape((-1,) + (1,) * (z.ndim - 1))
        return (v - gap * dudt.to(z.dtype)).detach()

    def losses(self, model: DiffusionModel, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
               cond: dict | None = None) -> torch.Tensor:
        """The per-sample losses for given draws (t, r [B] float64, noise shaped like x)."""
        check_average_model(model, "MeanFlow")
        cond = cond or {}
        z = model.path.interpolate(x, noise, t).to(x.dtype)
        v = (noise - x).to(z.dtype)
        u_tgt = v
        jump = (t != r).nonzero().reshape(-1)  # where r = t the target is v itself: no tangent needed
        if jump.numel() == x.shape[0]:
            with _same_random_state(x.device):  # the same dropout masks in the tangent and the forward
                u_tgt = self.target(model, z, v, r, t, cond)
        elif jump.numel():
            with _same_random_state(x.device):  # leave the forward's random stream as without the tangent
                part = self.target(model, z[jump], v[jump], r[jump], t[jump], select(cond, jump, x.shape[0]))
            u_tgt = v.index_copy(0, jump, part)
        err = mean_dims((average_velocity(model, z, r, t, cond) - u_tgt) ** 2)
        return adaptive_weight(err, self.p, self.c) * err

    def __call__(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *, generator=None,
                 step: int = 0) -> torch.Tensor:
        t, r = self.sample_times(x.shape[0], model.path, generator, x.device)
        noise = draw_noise(x, generator)
        return self.losses(model, x, noise, t.to(x.device), r.to(x.device), cond)


__all__ = ["MeanFlowLoss", "average_velocity", "end_time", "is_two_time", "owner", "check_average_model",
           "adaptive_weight"]

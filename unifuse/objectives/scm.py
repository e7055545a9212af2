"""Continuous-time consistency models on TrigFlow: sCT and sCD (Lu & Song 2024; ALGORITHMS card 18).

TrigFlow: x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]. The consistency function is

    f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t, t)          (= model.denoise; f(x, 0) = x)

with F_theta = model.predict(x_t, t, "trigflow") for a model of any prediction kind on the TrigFlow path (the
library feeds the network x_t / sigma_d). One training step (Algorithm 1 of the paper):

    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sigma_d),  clamped to [1e-4, pi/2 - 1e-4]
    x_t  = cos t x0 + sin t z
    dx_t/dt = cos t z - sin t x0                         (sCT)
            = teacher velocity  teacher.predict(x_t, t, "velocity")   (sCD)
    F^-, cos t sin t dF^-/dt = JVP of (x, t) -> F_theta^-(x, t) at (x_t, t) along cos t sin t (dx_t/dt, 1)
    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt),   r = min(1, step / warmup)
    g <- g / (||g|| + c)        (per-sample L2 norm over all dims; norm="rms": ||g|| / sqrt(D))
    loss = exp(-u_phi(t)) / D ||F_theta(x_t, t) - F^- - g||^2 + u_phi(t)

theta^- = stopgrad(theta); u_phi = -w_phi is the learned log-variance of the adaptive weighting. With r = 1,
g = cos t df^-/dt, the total derivative of the consistency function along the PF-ODE, so the exact consistency
function has g = 0.

Units of the tangent. The paper differentiates F_theta(x_t / sigma_d, t) along (dx_t/dt / sigma_d, 1); here F is a
function of x_t itself (x in the path's units), along (dx_t/dt, 1): the same total derivative d/dt F(x_t(t), t).
The tangent is passed pre-scaled by cos t sin t, so the JVP returns cos t sin t dF/dt directly; this equals
cos t sin t (F(x + h dxdt, t + h) - F(x - h dxdt, t - h)) / 2h (tests/objectives/test_scm.py checks both
conventions), which settles NVlabs/Sana#327: the "pre-scaled" code is right because its tangents carry cos t sin t.

The tangent is a secant by default (`window` = 0.1). One unit along the pre-scaled tangent moves log sigma_edm =
log(sigma_d tan t) by exactly 1 (d/dt log tan t = 1 / (cos t sin t)), so

    cos t sin t dF^-/dt  ~  (F^-(x_t + w cs dx_t/dt, t + w cs) - F^-(x_t - w cs dx_t/dt, t - w cs)) / 2w,   cs = cos t sin t

is the derivative averaged over +-w in log sigma along the PF-ODE's tangent line (bias O(w^2): the line leaves the
curved ODE; tests/objectives/test_scm.py). Why: the library's networks see sinusoidal(c_noise) with frequencies up
to 1 and c_noise = 250 log sigma (EDM) or 1000 t / (pi/2) (TrigFlow), periods of 0.025 in log sigma. A network
fitted at sampled times carries errors e(t) of that period, and the pointwise tangent multiplies them by ~250:
on the 2-D 8-gaussians EDM teacher the pointwise cos t sin t dF/dt was off by 0.4-7 (true size 0.2-1.6), the
secant with w = 0.1 by 0.1-0.5 (the teacher's own error). A high-frequency error of size a adds at most a / w to
the secant; the paper avoids the error instead (c_noise = t, low-frequency embeddings), which a teacher's weights
cannot. window = 0 gives the pointwise derivative (jvp = "autodiff" needs it).

Numerics (card 18 pitfalls): g is formed in float64; rows where F^- or g is not finite are dropped (loss 0, as
rCM does); the JVP runs on the bare network (`tangent.unwrap`: a JVP through DDP skips gradient sync) and under
the online forward's random state (same dropout masks); `jvp` = "auto" | "autodiff" | "fd" (unifuse.tangent).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..errors import UnifuseError, choose
from ..model import DiffusionModel, ReexpressedModel, rebind
from ..paths.continuous import TrigFlow
from ..tangent import METHODS as JVP_METHODS
from ..tangent import jvp as tangent_jvp
from ..tangent import unwrap
from .consistency import _same_random_state
from .losses import draw_noise
from .time import rand_log_normal

F64 = torch.float64
HALF_PI = math.pi / 2
T_CLAMP = 1e-4  # t in [T_CLAMP, pi/2 - T_CLAMP]: tan t explodes at pi/2, sin t vanishes at 0
NORMS = ("l2", "rms")


def trigflow_sigma_d(model: DiffusionModel) -> float:
    """The model's TrigFlow sigma_d, checking that the path is TrigFlow and that sigma_d = model.sigma_data
    (then model.predict(.., "trigflow") is exactly the F of f = cos t x_t - sin t sigma_d F = model.denoise)."""
    path = model.path
    if not isinstance(path, TrigFlow):
        raise UnifuseError(f"sCT / sCD need a model on the TrigFlow path, got {path!r}; use "
                           "uf.paths.get('trigflow', sigma_d=...) (distillation: student_path='trigflow')")
    if abs(float(path.sigma_d) - float(model.sigma_data)) > 1e-9:
        raise UnifuseError(f"the TrigFlow path's sigma_d = {path.sigma_d} differs from the model's sigma_data = "
                           f"{model.sigma_data}; build the path as uf.paths.get('trigflow', sigma_d={model.sigma_data})")
    return float(path.sigma_d)


def scm_times(n: int, path: TrigFlow, P_mean: float, P_std: float, *, generator=None, device=None,
              t_max: float = HALF_PI):
    """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2), clamped to [1e-4, pi/2 - 1e-4], or to t_max - 0.01 below
    a model's noise end t_max < pi/2 (a teacher with a finite sigma_max re-expressed on TrigFlow; the margin leaves
    room for a central difference in t); float64 [n]."""
    t = rand_log_normal(n, path, P_mean, P_std, generator=generator, device=device)
    top = HALF_PI - T_CLAMP if t_max >= HALF_PI else float(t_max) - 1e-2  # room for a finite difference in t
    return t.clamp(T_CLAMP, top)


def bare_model(model: DiffusionModel) -> DiffusionModel:
    """The model around its unwrapped network (no DDP / torch.compile wrapper), for tangents without gradients
    (a re-expressed student keeps its re-expression; transforms are evaluated as they are)."""
    if type(model) not in (DiffusionModel, ReexpressedModel):
        return model
    raw = unwrap(model.net)
    return model if raw is model.net else rebind(model, raw)


def _col(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape((-1,) + (1,) * (x.ndim - 1))


def trigflow_tangent(model: DiffusionModel, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor,
                     cond: dict | None = None, *, method: str = "auto", h: float | None = None,
                     window: float = 0.0, t_max: float = HALF_PI):
    """(F^-(x_t, t), cos t sin t dF^-/dt) without gradients: the JVP of (x, t) -> model.predict(x, t, "trigflow")
    along the pre-scaled tangent cos t sin t (dx_t/dt, 1), x in the path's units (see the module docstring).

    window > 0: the secant over +-window along that tangent instead of the pointwise derivative. One unit along the
    pre-scaled tangent moves log sigma_edm = log(sigma_d tan t) by exactly 1 to first order (d/dt log tan t =
    1 / (cos t sin t)), so the window is a half-width in log sigma: the points are x_t +- w cos t sin t dx_t/dt at
    t +- w cos t sin t, on the PF-ODE through x_t. Rows whose window would leave [0, t_max] use a narrower one
    (the tangent is linear in its direction: the secant along k v, divided by k)."""
    cond = cond or {}
    bare = bare_model(model)
    cs = torch.cos(t) * torch.sin(t)
    k = torch.ones_like(cs)
    if window > 0:
        room = torch.minimum(t, torch.as_tensor(t_max, dtype=t.dtype, device=t.device) - t).clamp(min=0)
        k = (0.99 * room / (window * cs)).clamp(1e-6, 1.0)

    def field(x, s):
        return bare.predict(x, s, "trigflow", **cond)

    v_x, v_t = _col(k * cs, x_t).to(x_t.dtype) * dxdt.to(x_t.dtype), k * cs
    F, tan = tangent_jvp(field, (x_t, t), (v_x, v_t), method=method, h=h, step=window if window > 0 else None)
    return F, tan / _col(k, tan).to(tan.dtype) if window > 0 else tan


def scm_tangent(F: torch.Tensor, cs_dFdt: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor,
                sigma_d: float, r: float = 1.0) -> torch.Tensor:
    """g = -cos^2 t (sigma_d F - dxdt) - r (cos t sin t x_t + sigma_d cos t sin t dF/dt), in float64."""
    F, cs_dFdt, x_t, dxdt = (a.to(F64) for a in (F, cs_dFdt, x_t, dxdt))
    c, s = _col(torch.cos(t.to(F64)), x_t), _col(torch.sin(t.to(F64)), x_t)
    return -c * c * (sigma_d * F - dxdt) - r * (c * s * x_t + sigma_d * cs_dFdt)


def normalize_tangent(g: torch.Tensor, c: float = 0.1, norm: str = "l2") -> torch.Tensor:
    """g / (||g|| + c) per sample: ||g|| the L2 norm over all dims ("l2", the paper) or ||g|| / sqrt(D) ("rms")."""
    flat = g.reshape(g.shape[0], -1)
    size = flat.norm(dim=1)
    if norm == "rms":
        size = size / math.sqrt(max(flat.shape[1], 1))
    return g / _col(size + c, g)


class AdaptiveWeight(nn.Module):
    """u_phi(t): the adaptive weighting's log-variance (weight exp(-u)), a small MLP on fixed Fourier features
    cos(k pi s), sin(k pi s), k = 1..features, of s = t / (pi/2). The last layer starts at zero (weight 1)."""

    def __init__(self, features: int = 16, width: int = 64):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, features + 1, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * features, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = (t.to(self.freqs.device, torch.float32) / HALF_PI)[:, None] * self.freqs
        return self.mlp(torch.cat([torch.cos(s), torch.sin(s)], 1)).squeeze(1)


class SCMTerms(NamedTuple):
    """Per-sample pieces of the sCM loss: mse = ||F_theta - F^- - g||^2 / D (times the prior weight, if on), the
    log-variance u = u_phi(t) (zeros without adaptive weighting), the times and which rows were kept."""

    mse: torch.Tensor
    u: torch.Tensor
    t: torch.Tensor
    ok: torch.Tensor


class SCTLoss(nn.Module):
    """The sCM loss (card 18), shared by sCT (dx_t/dt = cos t z - sin t x0) and sCD (`teacher=` a model on the same
    TrigFlow path: dx_t/dt = its velocity). `__call__(model, x, cond=None, *, generator=None, step=0, teacher=None)`
    returns per-sample losses [B].

    Defaults: P_mean = -1.0, P_std = 1.4 (card 18 and FastGen's sCT; FastGen uses P_std 1.8 when starting from an
    EDM model); c = 0.1 with the paper's per-sample L2 norm (FastGen: norm="rms"); warmup = 1000 steps of tangent
    warm-up (sCM-mnist's; FastGen's 10k is for ImageNet-scale budgets and would keep r < 1 through a whole
    small-data run of a few thousand steps); adaptive = True (the paper's learned weighting; this module holds the
    head, so an optimizer must train `self.parameters()`); prior_weighting = False (1/(sigma_d tan t), FastGen's; the
    sCM-mnist README finds it destabilising); jvp = "auto" (forward-mode autodiff, finite differences on failure);
    window = 0.1 (the secant tangent over +-0.1 in log sigma, see the module docstring; 0: the pointwise one).
    """

    def __init__(self, P_mean: float = -1.0, P_std: float = 1.4, warmup: int = 1000, c: float = 0.1,
                 norm: str = "l2", adaptive: bool = True, prior_weighting: bool = False, jvp: str = "auto",
                 h: float | None = None, window: float = 0.1):
        super().__init__()
        choose("sCM tangent norm", norm, NORMS)
        choose("jvp method", jvp, JVP_METHODS)
        if P_std <= 0 or c < 0 or warmup < 0 or not 0 <= window < 1:
            raise UnifuseError(f"sCM options need P_std > 0, c >= 0, warmup >= 0 and 0 <= window < 1, got "
                               f"P_std={P_std}, c={c}, warmup={warmup}, window={window}")
        if jvp == "autodiff" and window > 0:
            raise UnifuseError(f"jvp='autodiff' takes the pointwise derivative, window={window} a secant; set "
                               "window=0 for autodiff, or jvp='fd' / 'auto' for the secant")
        self.P_mean, self.P_std, self.warmup, self.c, self.norm = float(P_mean), float(P_std), int(warmup), float(c), norm
        self.prior_weighting, self.jvp, self.h, self.window = bool(prior_weighting), jvp, h, float(window)
        self.head = AdaptiveWeight() if adaptive else None

    def warmup_ratio(self, step: int) -> float:
        """r = min(1, step / warmup) (1 without warm-up)."""
        return 1.0 if self.warmup <= 0 else min(1.0, float(step) / self.warmup)

    def forward(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *, generator=None,
                step: int = 0, teacher: DiffusionModel | None = None) -> torch.Tensor:
        terms = self.terms(model, x, cond, generator=generator, step=step, teacher=teacher)
        return torch.where(terms.ok, torch.exp(-terms.u) * terms.mse + terms.u, torch.zeros_like(terms.mse))

    def terms(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *, generator=None,
              step: int = 0, teacher: DiffusionModel | None = None, t: torch.Tensor | None = None) -> SCMTerms:
        """The loss's pieces; the online F carries gradients, u carries the head's (t: given times, for tests)."""
        cond = cond or {}
        sd = trigflow_sigma_d(model)
        path = model.path
        top = min(float(getattr(m, "t_max", HALF_PI)) for m in (model, teacher) if m is not None)
        if t is None:
            t = scm_times(x.shape[0], path, self.P_mean, self.P_std, generator=generator, device=x.device, t_max=top)
        t = t.to(device=x.device, dtype=F64)
        noise = draw_noise(x, generator)
        x_t = path.interpolate(x.to(F64), noise.to(F64), t)
        if teacher is None:
            dxdt = _col(path.d_alpha(t), x) * x.to(F64) + _col(path.d_sigma(t), x) * noise.to(F64)
        else:
            with torch.no_grad():
                dxdt = teacher.predict(x_t.to(x.dtype), t, "velocity", **cond).to(F64)
        with _same_random_state(x.device):
            F_minus, cs_dFdt = trigflow_tangent(model, x_t.to(x.dtype), t, dxdt, cond, method=self.jvp, h=self.h,
                                                window=self.window, t_max=top)
        F = model.predict(x_t.to(x.dtype), t, "trigflow", **cond)
        g = scm_tangent(F_minus, cs_dFdt, x_t, t, dxdt, sd, self.warmup_ratio(step))
        g = normalize_tangent(g, self.c, self.norm)
        target = F_minus.to(F64) + g
        ok = torch.isfinite(target.reshape(x.shape[0], -1)).all(1)
        target = torch.where(_col(ok, x), target, F.detach().to(F64)).to(F.dtype)  # dropped rows: zero difference
        mse = (F - target).reshape(x.shape[0], -1).pow(2).mean(1)
        if self.prior_weighting:
            mse = mse / (sd * torch.tan(t)).to(mse.dtype)
        u = self.head.to(x.device)(t).to(mse.dtype) if self.head is not None else torch.zeros_like(mse)
        return SCMTerms(mse, u, t, ok)


__all__ = ["AdaptiveWeight", "NORMS", "SCMTerms", "SCTLoss", "bare_model", "normalize_tangent", "scm_tangent",
           "scm_times", "trigflow_sigma_d", "trigflow_tangent"]

"""Denoising objectives: one weighted regression covers the diffusion families (EDM `loss.py` style).

    t ~ p(t);  noise ~ N(0, I);  x_t = alpha(t) x + sigma(t) noise
    loss = w(t) * mean_dims( target_hat(x_t, t) - target(x, noise, x_t) )^2        per sample, shape [B]

The target is any prediction kind, read off the model's (x0_hat, eps_hat) by the library's one converter.
The named objectives are that regression with each paper's target, weighting and time density:

    DDPMLoss          eps (or x0, v) target, uniform integer steps          Ho et al. 2020, L_simple
    DSMLoss           eps target (= score with lambda = sigma^2), t ~ U(1e-5, 1); likelihood weighting
                      g^2 / sigma^2 with optional importance sampling in log-SNR      Song et al. 2021a, 2021b
    EDMLoss           F target with unit weight (= lambda(sigma) ||D - x||^2), log-normal sigma  Karras et al. 2022
    FlowMatchingLoss  velocity target, logit-normal (SD3) or uniform time   Lipman et al. 2022; Liu et al. 2022
    TrigFlowLoss      TrigFlow F target, tau ~ N(P_mean, P_std^2)           Lu & Song 2024
    HybridLoss        L_simple + lambda L_vlb with a stop-gradient on the mean, learned variance,
                      uniform or importance-sampled steps                  Nichol & Dhariwal 2021
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnifuseError, choose
from ..model import DiffusionModel
from ..parameterization.convert import from_pair
from ..parameterization.kinds import CONVERTIBLE, defined_at_zero_snr, noise_scaled
from ..parameterization.weights import kind_weight
from .couplings import couple
from .time import TIME_DENSITIES, ImportanceSampler, logsnr_range, training_range
from .weighting import WEIGHTINGS, loss_weight

F64 = torch.float64
TARGETS = CONVERTIBLE


def mean_dims(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over every dimension but the batch."""
    return x.reshape(x.shape[0], -1).mean(1)


def draw_noise(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x, from `generator` (on x's device)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class DenoisingLoss:
    """E[w(t) mean_dims(target_hat - target)^2] with `target` a prediction kind, `weighting` a log-SNR weighting
    (WEIGHTINGS, or "likelihood") and `time` a density name (TIME_DENSITIES) with its location `mean`, scale `std`
    and range [t_lo, t_hi]. Returns per-sample losses [B]."""

    target: str = "eps"
    weighting: str = "uniform"
    time: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    t_lo: float | None = None
    t_hi: float | None = None
    gamma: float = 5.0
    bias: float = 2.0
    coupling: str = "independent"

    def __post_init__(self):
        choose("target", self.target, TARGETS)
        choose("weighting", self.weighting, WEIGHTINGS + ("likelihood",))
        choose("time density", self.time, TIME_DENSITIES)
        likelihood_ok = noise_scaled(self.target) and self.time in ("uniform", "logsnr_uniform")
        if self.weighting == "likelihood" and not likelihood_ok:
            raise UnifuseError("the likelihood weighting is written for eps/score targets with time 'uniform' or "
                               f"'logsnr_uniform' (importance sampling); got target {self.target!r}, "
                               f"time {self.time!r}")

    # --- the pieces ---------------------------------------------------------------------------
    def sample_time(self, n: int, path, generator=None, device=None) -> torch.Tensor:
        """Native training times [n] (float64)."""
        kw = dict(generator=generator, device=device)
        if self.time in ("uniform", "logsnr_uniform"):
            return TIME_DENSITIES[self.time](n, path, self.t_lo, self.t_hi, **kw)
        if self.time == "index":
            return TIME_DENSITIES["index"](n, path, **kw)
        return TIME_DENSITIES[self.time](n, path, self.mean, self.std, **kw)

    def weight(self, model: DiffusionModel, t: torch.Tensor, c) -> torch.Tensor:
        """Per-sample weight [B] (float64) on the target's MSE."""
        path = model.path
        if self.weighting != "likelihood":
            if (self.weighting == "edm" and not defined_at_zero_snr(self.target) and c.alpha.device.type == "cpu"
                    and bool((c.alpha == 0).any())):
                raise UnifuseError("weighting 'edm' charges x0 errors, which are infinite for an eps/score target at "
                                   "SNR = 0; use weighting 'snr', 'min_snr' or 'sigmoid', or an x0/v/velocity target")
            return loss_weight(self.weighting, self.target, path, t, c, sigma_data=model.sigma_data,
                               gamma=self.gamma, bias=self.bias)
        # Likelihood weighting: 0.5 * (-d lambda / dt) / p(t) on eps-MSE, so that the expected loss is the
        # diffusion term of the continuous-time ELBO per dimension (Kingma et al. 2021; Song et al. 2021b).
        if self.time == "logsnr_uniform":
            lam_lo, lam_hi = logsnr_range(path, self.t_lo, self.t_hi)
            w = torch.full_like(t, 0.5 * (lam_hi - lam_lo), dtype=F64)
        else:
            lo, hi = training_range(path, self.t_lo, self.t_hi)
            a, s, da, ds = (v.reshape(-1).to(F64) for v in c)
            w = -(da / a - ds / s) * (hi - lo)  # 0.5 * (-d lambda/dt), lambda = 2 log(a/s)
        return kind_weight(self.target, c, model.sigma_data, None, lambda: w)  # eps or score (checked above)

    def errors(self, model: DiffusionModel, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: dict):
        """(coefficients at t, per-sample MSE [B] of the target kind) for one network evaluation."""
        x_t = model.path.interpolate(x, noise, t).to(x.dtype)
        ev = model.evaluate(x_t, t, **cond)
        c = model.coefficients(t, x_t)
        xc, nc, xtc = (v.to(ev.x0.dtype) for v in (x, noise, x_t))
        pred = from_pair(self.target, ev.x0, ev.eps, xtc, c, model.sigma_data)
        true = from_pair(self.target, xc, nc, xtc, c, model.sigma_data)
        return c, mean_dims((pred - true) ** 2)

    def __call__(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *,
                 generator=None, step: int = 0) -> torch.Tensor:
        t = self.sample_time(x.shape[0], model.path, generator, x.device)
        noise = couple(self.coupling, x, draw_noise(x, generator))
        c, mse = self.errors(model, x, noise, t, cond or {})
        return self.weight(model, t, c).to(mse.dtype) * mse


@dataclass(frozen=True)
class DDPMLoss(DenoisingLoss):
    """DDPM L_simple: ||eps - eps_hat||^2 at a uniform integer step (Ho et al. 2020); target x0 or v also allowed."""

    time: str = "index"


@dataclass(frozen=True)
class DSMLoss(DenoisingLoss):
    """Continuous denoising score matching, VP or VE (Song et al. 2021a): lambda(t) = sigma^2 is unit weight
    on eps; weighting='likelihood' gives g^2/sigma^2 (Song et al. 2021b), time='logsnr_uniform' its
    importance-sampled form."""

    t_lo: float | None = 1e-5


@dataclass(frozen=True)
class EDMLoss(DenoisingLoss):
    """EDM: lambda(sigma) ||D(x + sigma n) - x||^2 = ||F - F_target||^2, log sigma ~ N(-1.2, 1.2^2)
    (Karras et al. 2022)."""

    target: str = "edm"
    time: str = "log_normal"
    mean: float = -1.2
    std: float = 1.2


@dataclass(frozen=True)
class FlowMatchingLoss(DenoisingLoss):
    """Flow matching / rectified flow: ||u_hat - (noise - x)||^2, t logit-normal(0, 1) (SD3) or uniform."""

    target: str = "velocity"
    time: str = "logit_normal"


@dataclass(frozen=True)
class TrigFlowLoss(DenoisingLoss):
    """TrigFlow diffusion: ||F_hat - F||^2 = ||sigma_d F_hat - dx_t/dt||^2 / sigma_d^2, tau ~ N(P_mean, P_std^2),
    t = arctan(e^tau / sigma_d) (Lu & Song 2024)."""

    target: str = "trigflow"
    time: str = "log_normal"
    mean: float = -1.0
    std: float = 1.4


class HybridLoss:
    """Improved DDPM: L_simple + lambda_vlb * N * L_t with the variance learned through the VLB term only
    (stop-gradient on the mean), integer steps uniform or importance-sampled (Nichol & Dhariwal 2021).

    The VLB term L_t is the KL between q(x_{t-1} | x_t, x) and the model's Gaussian reverse step, or the
    decoder NLL at t = 0 (`decoder`: "discrete" for 8-bit images, "gaussian" for continuous data), in bits
    per dimension (unifuse.vlb)."""

    def __init__(self, lambda_vlb: float = 1e-3, timesteps: str = "uniform", history: int = 10,
                 decoder: str = "discrete"):
        self.lambda_vlb = float(lambda_vlb)
        self.timesteps = choose("timesteps", timesteps, ("uniform", "importance"))
        self.decoder = choose("decoder", decoder, ("discrete", "gaussian"))
        self.history = int(history)
        self.sampler: ImportanceSampler | None = None

    def _sampler(self, path) -> ImportanceSampler:
        if self.sampler is None:
            self.sampler = ImportanceSampler(path.N, self.history)
        return self.sampler

    def __call__(self, model: DiffusionModel, x: torch.Tensor, cond: dict | None = None, *,
                 generator=None, step: int = 0) -> torch.Tensor:
        from ..vlb import reverse_log_variance, vlb_term

        if not model.learned_variance:
            raise UnifuseError("HybridLoss needs a model with learned_variance=True (a 2C-channel network)")
        path, B = model.path, x.shape[0]
        if self.timesteps == "importance":
            t, w = self._sampler(path).sample(B, generator=generator, device=x.device)
        else:
            t, w = TIME_DENSITIES["index"](B, path, generator=generator, device=x.device), None
        noise = draw_noise(x, generator)
        x_t = path.interpolate(x, noise, t).to(x.dtype)
        ev = model.evaluate(x_t, t, **(cond or {}))
        mse = mean_dims((ev.eps - noise.to(ev.eps.dtype)) ** 2)
        # Stop-gradient on the mean: the VLB term teaches the variance only.
        log_var = reverse_log_variance(path, t - 1, t, ev.var_frac).to(ev.x0.dtype)
        vb = vlb_term(path, x.to(ev.x0.dtype), x_t.to(ev.x0.dtype), t - 1, t, ev.x0.detach(), log_var,
                      decoder=self.decoder) / math.log(2.0)
        loss = mse + self.lambda_vlb * path.N * vb
        if w is not None:
            self._record(t, loss.detach())
            loss = loss * w.to(loss.dtype)
        return loss

    def _record(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Update the importance sampler with every process's (step, loss) pairs so all ranks agree."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            ls = [torch.empty_like(losses) for _ in range(dist.get_world_size())]
            dist.all_gather(ts, t), dist.all_gather(ls, losses)
            t, losses = torch.cat(ts), torch.cat(ls)
        self.sampler.update(t, losses)

    def state_dict(self) -> dict:
        return {} if self.sampler is None else self.sampler.state_dict()

    def load_state_dict(self, state: dict, path=None) -> None:
        if state:
            if self.sampler is None:
                self.sampler = ImportanceSampler(state["counts"].numel(), self.history)
            self.sampler.load_state_dict(state)

    def __repr__(self) -> str:
        return f"HybridLoss(lambda_vlb={self.lambda_vlb}, timesteps={self.timesteps!r}, decoder={self.decoder!r})"


__all__ = ["DenoisingLoss", "DDPMLoss", "DSMLoss", "EDMLoss", "FlowMatchingLoss", "TrigFlowLoss", "HybridLoss",
           "TARGETS", "mean_dims", "draw_noise"]

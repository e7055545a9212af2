"""The Gaussian-mixture oracle: exact answers for every quantity a diffusion library computes
(GAUSSIAN_ORACLE.md). Data p(x) = sum_k pi_k N(mu_k, diag s_k^2); under x_t = a x + sg noise the noisy
marginal, score, denoiser and class posterior have closed forms, and for one Gaussian so does the
probability-flow ODE. Written independently of `unifuse.parameterization` so tests can check it.
"""
from __future__ import annotations

import torch

from ..data.toy import MixtureDensity
from ..errors import UnifuseError
from ..paths.base import Path, as_time

F64 = torch.float64


class GaussianMixture(MixtureDensity):
    """Exact oracle for a diagonal Gaussian mixture in R^D (data may carry any shape with D elements).

    weights [K], means [K, D], stds [K, D], [K] or a scalar. Component k is class k. Sampling, the noisy
    log-density and the class posterior come from the toy sets' `MixtureDensity`; the rest is here.
    """

    def _weights_for(self, logw, labels):
        if labels is None:
            return torch.softmax(logw, 1)
        return torch.nn.functional.one_hot(torch.as_tensor(labels).reshape(-1).expand(logw.shape[0]), self.K).to(logw.dtype)

    def score(self, x, alpha, sigma, labels=None):
        """grad_x log q_t(x) (of component `labels` when given)."""
        shape = x.shape
        x, _, v, d, logw = self._parts(x, alpha, sigma)
        r = self._weights_for(logw, labels)
        return (-(r[..., None] * d / v).sum(1)).reshape(shape)

    def x0_hat(self, x, alpha, sigma, labels=None):
        """E[x0 | x_t] (given the class when `labels` is given)."""
        shape = x.shape
        x, a, v, d, logw = self._parts(x, alpha, sigma)
        r = self._weights_for(logw, labels)
        m = self.means[None] + a * self.stds[None] ** 2 / v * d
        return (r[..., None] * m).sum(1).reshape(shape)

    def eps_hat(self, x, alpha, sigma, labels=None):
        """E[noise | x_t] = -sigma * score."""
        sg = as_time(sigma).to(dtype=self.means.dtype)
        sg = sg.reshape((-1,) + (1,) * (x.ndim - 1)) if sg.ndim == 1 else sg
        return -sg * self.score(x, alpha, sigma, labels)

    def posterior_cov_trace(self, x, alpha, sigma):
        """tr Cov[x0 | x_t] per sample."""
        x, a, v, d, logw = self._parts(x, alpha, sigma)
        r = torch.softmax(logw, 1)
        m = self.means[None] + a * self.stds[None] ** 2 / v * d
        second = (r[..., None] * (self.stds[None] ** 2 * (v - a * a * self.stds[None] ** 2) / v + m * m)).sum(1)
        mean = (r[..., None] * m).sum(1)
        return (second - mean * mean).sum(-1)

    # --- probability-flow ODE ---------------------------------------------------------------
    def pf_ode_map(self, x, a_from, s_from, a_to, s_to):
        """Exact PF-ODE flow of a single Gaussian between any two times (GAUSSIAN_ORACLE section 4)."""
        if self.K != 1:
            raise UnifuseError("the closed-form PF-ODE map exists for a single Gaussian only (K = 1)")
        shape = x.shape
        x = x.reshape(x.shape[0], -1).to(self.means.dtype)
        mu, s2 = self.means[0], self.stds[0] ** 2
        col = lambda c: as_time(c).to(x.dtype).reshape(-1, 1) if as_time(c).ndim == 1 else as_time(c).to(x.dtype)
        af, sf, at, st = map(col, (a_from, s_from, a_to, s_to))
        v_from, v_to = af * af * s2 + sf * sf, at * at * s2 + st * st
        return (at * mu + torch.sqrt(v_to / v_from) * (x - af * mu)).reshape(shape)

    def velocity_divergence(self, x, path: Path, t):
        """Exact div_x of the PF-ODE velocity u = alpha' x0_hat + sigma' eps_hat (GAUSSIAN_ORACLE 6)."""
        a, s, da, ds = path.coefficients(t)
        tr = self.posterior_cov_trace(x, a, s)
        return self.D * ds / s + (da - a * ds / s) * (a / s**2) * tr

    # --- the oracle as a model ----------------------------------------------------------------
    def model(self, path: Path, prediction: str = "x0", sigma_data: float = 0.5, conditional: bool = False):
        """A `DiffusionModel` whose network is this oracle predicting `prediction` exactly.

        With conditional=True the network takes `class_labels` ([batch] ints; -1 = unconditional)."""
        from ..model import DiffusionModel

        return DiffusionModel(OracleNet(self, path, prediction, sigma_data, conditional), path, prediction, sigma_data=sigma_data)


class OracleNet(torch.nn.Module):
    """net(x, t, class_labels=None) returning the exact prediction of one kind (formulas of
    GAUSSIAN_ORACLE section 3, written out here rather than taken from the library's converter)."""

    def __init__(self, gm: GaussianMixture, path: Path, kind: str, sigma_data: float, conditional: bool):
        super().__init__()
        self.gm, self.path, self.kind, self.sd, self.conditional = gm, path, kind, sigma_data, conditional

    def forward(self, x_in, t, class_labels=None):
        t = t.to(F64)
        a, s, da, ds = self.path.coefficients(t)
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        A, S, dA, dS = (c.to(F64).reshape(shape) for c in (a, s, da, ds))
        r = torch.sqrt(S * S + (A * self.sd) ** 2)
        x = x_in.to(F64) * (r if self.kind in ("edm", "trigflow", "consistency") else 1.0)
        if class_labels is None or not self.conditional:
            x0 = self.gm.x0_hat(x, a, s)
        else:
            labels = torch.as_tensor(class_labels).reshape(-1).expand(x.shape[0])
            uncond = self.gm.x0_hat(x, a, s)
            cond = self.gm.x0_hat(x, a, s, labels.clamp(min=0))
            x0 = torch.where((labels >= 0).reshape(shape), cond, uncond)
        if self.kind == "x0":
            return x0
        eps = (x - A * x0) / S
        if self.kind == "eps":
            return eps
        if self.kind == "v":
            return A * eps - S * x0
        if self.kind == "score":
            return -eps / S
        if self.kind == "velocity":
            return dA * x0 + dS * eps
        if self.kind in ("edm", "trigflow"):
            # EDM in its own units: x_edm = x/alpha, sigma_edm = S/A; F = (x0 - c_skip x_edm)/c_out
            se = S / A
            c_skip, c_out = self.sd**2 / (se**2 + self.sd**2), se * self.sd / torch.sqrt(se**2 + self.sd**2)
            F = (x0 - c_skip * x / A) / c_out
            return F if self.kind == "edm" else -F
        if self.kind == "consistency":
            raise UnifuseError("use GaussianMixture.consistency_model for the exact consistency function")
        raise UnifuseError(f"the oracle cannot predict {self.kind!r}")


class LearnableGaussian(torch.nn.Module):
    """A trainable Gaussian base for reward fine-tuning checks: data N(mean, diag std^2) with learnable mean and
    log std, the network predicting the exact denoiser E[x0 | x_t] of that Gaussian on `path` (prediction "x0").
    Its KL-regularised optimum under a quadratic reward is again a Gaussian (`tilted_gaussian`)."""

    def __init__(self, path: Path, mean, std):
        super().__init__()
        self.path = path
        self.mean = torch.nn.Parameter(torch.as_tensor(mean, dtype=F64).clone())
        self.log_std = torch.nn.Parameter(torch.as_tensor(std, dtype=F64).log().clone())

    def forward(self, x_in, t, **cond):
        a, s, _, _ = self.path.coefficients(t.to(F64))
        shape = (-1,) + (1,) * (x_in.ndim - 1)
        a, s = a.reshape(shape), s.reshape(shape)
        var = torch.exp(2 * self.log_std)
        x = x_in.to(F64)
        return (self.mean + a * var / (a * a * var + s * s) * (x - a * self.mean)).to(x_in.dtype)

    def model(self):
        from ..model import DiffusionModel

        return DiffusionModel(self, self.path, "x0")


def tilted_gaussian(mean, std, center, rho, kl: float):
    """(mean*, std*) of p_base(x) exp(r(x) / kl) / Z for p_base = N(mean, std^2) and r(x) = -(x - center)^2 / (2 rho^2),
    per dimension: precision P = 1/std^2 + 1/(kl rho^2), mean* = (mean/std^2 + center/(kl rho^2)) / P
    (research/post-training.md, check 9)."""
    m, s, c, r = (torch.as_tensor(v, dtype=F64) for v in (mean, std, center, rho))
    precision = 1 / s**2 + 1 / (kl * r**2)
    return (m / s**2 + c / (kl * r**2)) / precision, precision.rsqrt()

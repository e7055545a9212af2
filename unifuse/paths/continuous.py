"""Continuous-time families: VP (Song et al. 2021), VE, EDM (Karras et al. 2022), rectified flow
(Liu et al. 2022; SD3 time direction) and TrigFlow (Lu & Song 2024). Formulas: NOTATION section 4."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Path, log1mexp

HALF_PI = math.pi / 2


class _VariancePreserving(Path):
    """alpha^2 + sigma^2 = 1: subclasses give log(alpha) and its derivative; the rest follows."""

    def _log_alpha(self, t): raise NotImplementedError
    def _d_log_alpha(self, t): raise NotImplementedError

    def _alpha(self, t): return torch.exp(self._log_alpha(t))
    def _sigma(self, t): return torch.exp(0.5 * log1mexp(2.0 * self._log_alpha(t)))
    def _d_alpha(self, t): return self._d_log_alpha(t) * self._alpha(t)

    def _d_sigma(self, t):
        # sigma' = -alpha alpha' / sigma  (differentiate alpha^2 + sigma^2 = 1)
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def _log_snr(self, t):
        la2 = 2.0 * self._log_alpha(t)
        return la2 - log1mexp(la2)


@dataclass(frozen=True, repr=False)
class VP(_VariancePreserving):
    """VP-SDE with beta(t) linear in t: log alpha = -t^2 (b1 - b0)/4 - t b0/2 (NOTATION 4.4)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 0.0
    t_max: float = 1.0
    t_eps: float = 1e-3
    name = "vp-linear"

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> VP:
        return cls(beta_min, beta_max)

    @classmethod
    def cosine(cls, s: float = 0.008) -> VPCosine:
        return VPCosine(s)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_alpha(self, t):
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _d_log_alpha(self, t):
        return -0.5 * self.beta(t)

    def _t_from_log_snr(self, lam):
        # L = -log alpha^2 = softplus(-lambda); solve (b1-b0) t^2/2 + b0 t = L (stable root).
        L = torch.nn.functional.softplus(-lam)
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * L / (b0 + torch.sqrt(b0 * b0 + 2.0 * db * L))

    def _c_noise(self, t):
        return 1000.0 * t


@dataclass(frozen=True, repr=False)
class VPCosine(_VariancePreserving):
    """Continuous cosine schedule (Nichol & Dhariwal 2021): alpha = cos(phi(t)) / cos(phi(0)),
    phi(t) = (t + s)/(1 + s) * pi/2. alpha(1) = 0 exactly: zero terminal SNR."""

    s: float = 0.008
    t_min: float = 0.0
    t_max: float = 1.0
    t_eps: float = 1e-3
    name = "vp-cosine"

    def _log_alpha(self, t):
        # cos(phi) written as sin(pi/2 - phi) so that alpha(1) is exactly 0.
        k = HALF_PI / (1.0 + self.s)
        return (torch.log(torch.sin((1.0 - t) * k)) - math.log(math.cos(self.s * k))).clamp(max=0.0)

    def _d_log_alpha(self, t):
        k = HALF_PI / (1.0 + self.s)
        return -k / torch.tan((1.0 - t) * k)

    def _d_alpha(self, t):
        k = HALF_PI / (1.0 + self.s)
        return -k * torch.cos((1.0 - t) * k) / math.cos(self.s * k)

    def _t_from_log_snr(self, lam):
        k = HALF_PI / (1.0 + self.s)
        alpha = torch.exp(0.5 * torch.nn.functional.logsigmoid(lam))
        return 1.0 - torch.arcsin((alpha * math.cos(self.s * k)).clamp(max=1.0)) / k

    def _c_noise(self, t):
        return 1000.0 * t


@dataclass(frozen=True, repr=False)
class VE(Path):
    """Variance exploding: alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^t (NOTATION 4.6).
    Time extends to t_min = -inf, where sigma = 0 (the data end); samplers evaluate t >= 0."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = -math.inf
    t_max: float = 1.0
    t_eps: float = 0.0
    name = "ve"

    @property
    def _log_ratio(self):
        return math.log(self.sigma_max / self.sigma_min)

    def _alpha(self, t): return torch.ones_like(t)
    def _sigma(self, t): return self.sigma_min * torch.exp(t * self._log_ratio)
    def _d_alpha(self, t): return torch.zeros_like(t)
    def _d_sigma(self, t): return self._sigma(t) * self._log_ratio
    def _log_snr(self, t): return -2.0 * (math.log(self.sigma_min) + t * self._log_ratio)

    def _t_from_log_snr(self, lam):
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def _c_noise(self, t):
        return 250.0 * torch.log(self._sigma(t))


@dataclass(frozen=True, repr=False)
class EDM(Path):
    """EDM: alpha = 1, sigma = t, t in [0, sigma_max]; samplers stop at sigma_min (NOTATION 4.7)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    name = "edm"

    @property
    def t_min(self): return 0.0

    @property
    def t_max(self): return self.sigma_max

    @property
    def t_eps(self): return self.sigma_min

    def _alpha(self, t): return torch.ones_like(t)
    def _sigma(self, t): return t
    def _d_alpha(self, t): return torch.zeros_like(t)
    def _d_sigma(self, t): return torch.ones_like(t)
    def _log_snr(self, t): return -2.0 * torch.log(t)
    def _t_from_log_snr(self, lam): return torch.exp(-0.5 * lam)

    def _c_noise(self, t):
        # 1000 * 0.25 log(sigma): the consistency-models convention, so every path's input spans ~[-1500, 1100].
        return 250.0 * torch.log(t)


@dataclass(frozen=True, repr=False)
class RectifiedFlow(Path):
    """Linear path x_t = (1 - t) x + t noise, t = 0 data, t = 1 noise (NOTATION 4.8)."""

    t_min: float = 0.0
    t_max: float = 1.0
    t_eps: float = 0.0
    name = "rf"

    def _alpha(self, t): return 1.0 - t
    def _sigma(self, t): return t
    def _d_alpha(self, t): return -torch.ones_like(t)
    def _d_sigma(self, t): return torch.ones_like(t)
    def _log_snr(self, t): return 2.0 * (torch.log1p(-t) - torch.log(t))
    def _t_from_log_snr(self, lam): return torch.sigmoid(-0.5 * lam)
    def _c_noise(self, t): return 1000.0 * t


@dataclass(frozen=True, repr=False)
class TrigFlow(Path):
    """TrigFlow (Lu & Song 2024): alpha = cos t, sigma = sigma_d sin t, t in [0, pi/2] (NOTATION 4.9).
    The noise has std sigma_d and data stay in their own units; alpha(pi/2) = 0 exactly."""

    sigma_d: float = 0.5
    t_min: float = 0.0
    t_max: float = HALF_PI
    t_eps: float = 0.0
    name = "trigflow"

    def _alpha(self, t): return torch.where(t >= HALF_PI, torch.zeros_like(t), torch.cos(t))
    def _sigma(self, t): return self.sigma_d * torch.sin(t)
    def _d_alpha(self, t): return -torch.sin(t)
    def _d_sigma(self, t): return self.sigma_d * torch.cos(t)
    def _log_snr(self, t): return 2.0 * (torch.log(self._alpha(t)) - torch.log(self._sigma(t)))
    def _t_from_log_snr(self, lam): return torch.arctan(torch.exp(-0.5 * lam) / self.sigma_d)
    def _c_noise(self, t): return (1000.0 / HALF_PI) * t

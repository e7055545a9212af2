"""Discrete DDPM paths (Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2023), NOTATION 4.1-4.3.

Native time is the step index n = 0..N-1 (index 0 is the least noisy step) with x_n =
sqrt(abar_n) x + sqrt(1 - abar_n) noise. Index -1 is the data itself (abar_{-1} = 1, the convention
of the DDIM code), so t_min = -1 and every sampler can end exactly on data.

Between integer steps alpha = sqrt(abar) is the monotone cubic (Fritsch-Carlson PCHIP) through the
knots n = -1..N-1: exact at every integer step, C^1, strictly decreasing, with a closed-form derivative
and an exact inverse, and it reaches alpha = 0 for zero-terminal-SNR tables.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError
from .base import Path, as_time


def _pchip_slopes(y: torch.Tensor) -> torch.Tensor:
    """Fritsch-Carlson derivatives for unit-spaced knots (monotone-preserving)."""
    d = y[1:] - y[:-1]
    m = torch.empty_like(y)
    m[0], m[-1] = d[0], d[-1]
    inner = 2.0 / (1.0 / d[:-1] + 1.0 / d[1:])  # harmonic mean; same-sign slopes only
    m[1:-1] = torch.where(d[:-1] * d[1:] > 0, inner, torch.zeros_like(inner))
    return m


class DDPM(Path):
    """Discrete-time DDPM path from a beta table (any user table; see the constructors)."""

    t_eps = 0.0

    def __init__(self, betas, name: str = "ddpm"):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise UnifuseError(f"DDPM betas must be a table of at least 2 values in (0, 1], got {betas[:4].tolist()}...")
        self.name = name
        self.betas = betas
        log_abar = torch.cumsum(torch.log1p(-betas.clamp(max=1.0 - 1e-300)), 0)
        abar = torch.exp(log_abar)
        if float(betas[-1]) == 1.0:
            abar[-1] = 0.0
        self.alphas_cumprod = abar
        self.N = betas.numel()
        self.t_min, self.t_max = -1.0, float(self.N - 1)
        self._knots = torch.cat([torch.ones(1, dtype=torch.float64), abar.sqrt()])
        self._slopes = _pchip_slopes(self._knots)

    # --- constructors ----------------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False):
        """Ho et al. linear betas; endpoints scaled by 1000/T for other T (Improved DDPM)."""
        scale = 1000.0 / T
        path = cls(torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64), "ddpm-linear")
        return path.zero_terminal_snr() if zero_terminal_snr else path

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False):
        """Nichol & Dhariwal cosine table, betas clipped at max_beta (NOTATION 4.2)."""
        tau = torch.arange(T + 1, dtype=torch.float64) / T
        fbar = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - fbar[1:] / fbar[:-1]).clamp(max=max_beta)
        path = cls(betas, "ddpm-cosine")
        return path.zero_terminal_snr() if zero_terminal_snr else path

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, zero_terminal_snr: bool = False):
        """Stable Diffusion's table, linear in sqrt(beta) (NOTATION 4.3)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        path = cls(betas, "ddpm-scaled-linear")
        return path.zero_terminal_snr() if zero_terminal_snr else path

    def zero_terminal_snr(self) -> DDPM:
        """Lin et al. (2023) rescaling: shift and scale sqrt(abar) so the last step is pure noise,
        keeping the first step unchanged (ALGORITHMS card 4). Use v, x0 or velocity prediction."""
        a = self.alphas_cumprod.sqrt()
        a0, aT = a[0].clone(), a[-1].clone()
        a = (a - aT) * a0 / (a0 - aT)
        abar = a * a
        alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
        return DDPM(1.0 - alphas, self.name + "-ztsnr")

    # --- the path ----------------------------------------------------------------------------
    def _tables(self, device):
        """(knots, slopes) on `device`; copied once per device so CUDA times index CUDA tables."""
        cache = self.__dict__.setdefault("_by_device", {})
        if device not in cache:
            cache[device] = (self._knots.to(device), self._slopes.to(device))
        return cache[device]

    def _segment(self, k):
        knots, slopes = self._tables(k.device)
        return knots[k], knots[k + 1], slopes[k], slopes[k + 1]

    def _locate(self, t):
        u = (t - self.t_min).clamp(0.0, float(self.N))
        k = u.floor().clamp(max=self.N - 1).long()  # interval [k, k+1] in knot numbering
        return k, u - k

    def _alpha(self, t):
        k, s = self._locate(t)
        y0, y1, m0, m1 = self._segment(k)
        s2, s3 = s * s, s * s * s
        return ((2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * y1 + (s3 - s2) * m1).clamp(0.0, 1.0)

    def _d_alpha(self, t):
        k, s = self._locate(t)
        y0, y1, m0, m1 = self._segment(k)
        s2 = s * s
        return (6 * s2 - 6 * s) * y0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * y1 + (3 * s2 - 2 * s) * m1

    def _sigma(self, t):
        a = self._alpha(t)
        return torch.sqrt((1.0 - a) * (1.0 + a))

    def _d_sigma(self, t):
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def coefficients(self, t):
        """(alpha, sigma, d_alpha, d_sigma) at t, all float64, locating the cubic's interval once."""
        t = as_time(t).to(torch.float64)
        k, u = self._locate(t)
        y0, y1, m0, m1 = self._segment(k)
        u2 = u * u
        u3 = u2 * u
        a = ((2 * u3 - 3 * u2 + 1) * y0 + (u3 - 2 * u2 + u) * m0 + (-2 * u3 + 3 * u2) * y1 + (u3 - u2) * m1).clamp(0.0, 1.0)
        da = (6 * u2 - 6 * u) * y0 + (3 * u2 - 4 * u + 1) * m0 + (-6 * u2 + 6 * u) * y1 + (3 * u2 - 2 * u) * m1
        s = torch.sqrt((1.0 - a) * (1.0 + a))
        return a, s, da, -a * da / s

    def _log_snr(self, t):
        a = self._alpha(t)
        return 2.0 * torch.log(a) - torch.log((1.0 - a) * (1.0 + a))

    def _t_from_log_snr(self, lam):
        # Invert the monotone cubic: find the knot interval, then safeguarded Newton on that interval's
        # cubic (bisection where a Newton step would leave the bracket); float64, converged to rounding.
        target = torch.exp(0.5 * torch.nn.functional.logsigmoid(lam))
        k = torch.searchsorted(-self._tables(target.device)[0], -target.contiguous(), right=True).clamp(1, self.N) - 1
        y0, y1, m0, m1 = self._segment(k)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        s = ((y0 - target) / (y0 - y1)).clamp(0.0, 1.0)
        for _ in range(8):  # Newton from the linear guess: ~4 steps to rounding; bisection bounds the rest
            s2, s3 = s * s, s * s * s
            f = (2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * y1 + (s3 - s2) * m1 - target
            df = (6 * s2 - 6 * s) * y0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * y1 + (3 * s2 - 2 * s) * m1
            above = f > 0  # alpha above the target: the root lies to the right
            lo, hi = torch.where(above, s, lo), torch.where(above, hi, s)
            newton = s - f / torch.where(df < 0, df, -torch.ones_like(df))
            ok = (df < 0) & (newton >= lo) & (newton <= hi)
            s = torch.where(f == 0, s, torch.where(ok, newton, 0.5 * (lo + hi)))
        return k.to(torch.float64) + self.t_min + s

    def _c_noise(self, t):
        return t

    def __repr__(self):
        return f"DDPM({self.name}, N={self.N})"

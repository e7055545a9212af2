"""The probability-path interface shared by every family (NOTATION section 3).

A path is a small frozen object with `alpha(t)`, `sigma(t)` and their time derivatives in closed form.
Everything else (log-SNR, its inverse, the EDM noise level, interpolation) is derived here once.
Schedules are computed in float64 and cast back to the dtype of `t` (NOTATION rule 5).
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def as_time(t) -> Tensor:
    """A float tensor of times; Python numbers and integer tensors become float64."""
    if not isinstance(t, Tensor):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float64)


def _f64(fn):
    """Evaluate a schedule function in float64 and return it in the caller's dtype."""

    def wrapped(self, t):
        t = as_time(t)
        out = fn(self, t.to(torch.float64))
        return out.to(t.dtype)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


class Path:
    """x_t = alpha(t) x + sigma(t) noise, with t = t_min the data end and t = t_max the noise end.

    Subclasses implement `_alpha`, `_sigma`, `_d_alpha`, `_d_sigma` and `_t_from_log_snr` on float64
    tensors; `_log_snr` may be overridden where a closed form is more accurate.
    Attributes: `t_min` (data end, sigma = 0), `t_max` (noise end), `t_eps` (least-noisy time a
    sampler evaluates the network at; equal to `t_min` where the network is fine there).
    """

    name = "path"
    t_min: float
    t_max: float
    t_eps: float

    # --- closed forms, float64 in and out -------------------------------------------------
    def _alpha(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _sigma(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _d_alpha(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _d_sigma(self, t: Tensor) -> Tensor: raise NotImplementedError
    def _t_from_log_snr(self, lam: Tensor) -> Tensor: raise NotImplementedError

    def _log_snr(self, t: Tensor) -> Tensor:
        return 2.0 * (torch.log(self._alpha(t)) - torch.log(self._sigma(t)))

    def _c_noise(self, t: Tensor) -> Tensor:
        return t

    # --- public, dtype-preserving -----------------------------------------------------------
    @_f64
    def alpha(self, t): return self._alpha(t)

    @_f64
    def sigma(self, t): return self._sigma(t)

    @_f64
    def d_alpha(self, t): return self._d_alpha(t)

    @_f64
    def d_sigma(self, t): return self._d_sigma(t)

    @_f64
    def log_snr(self, t):
        """Full log-SNR lambda = log(alpha^2 / sigma^2), strictly decreasing in t."""
        return self._log_snr(t)

    @_f64
    def t_from_log_snr(self, lam):
        """Inverse of `log_snr`; lambda outside the path's range is clamped to [t_min, t_max]."""
        return self._t_from_log_snr(lam).clamp(self.t_min, self.t_max)

    @_f64
    def c_noise(self, t):
        """The time input this library's networks receive for native time t."""
        return self._c_noise(t)

    @_f64
    def sigma_edm(self, t):
        """EDM noise level sigma/alpha of the equal-SNR point (inf where alpha = 0)."""
        return self._sigma(t) / self._alpha(t)

    def t_from_sigma_edm(self, s):
        """Native time at EDM noise level s (s = 0 gives the data end)."""
        s = as_time(s)
        return self.t_from_log_snr(-2.0 * torch.log(s.to(torch.float64))).to(s.dtype)

    def coefficients(self, t):
        """(alpha, sigma, d_alpha, d_sigma) at t, all float64."""
        t = as_time(t).to(torch.float64)
        return self._alpha(t), self._sigma(t), self._d_alpha(t), self._d_sigma(t)

    @property
    def prior_sigma(self) -> float:
        """Std of x_t at t_max per unit of standard normal noise."""
        return float(self._sigma(torch.tensor(float(self.t_max), dtype=torch.float64)))

    def interpolate(self, x: Tensor, noise: Tensor, t) -> Tensor:
        """x_t = alpha(t) x + sigma(t) noise, with t of shape [] or [batch]."""
        t = as_time(t).to(torch.float64)
        a, s = (broadcast(c, x) for c in (self._alpha(t), self._sigma(t)))
        return a * x + s * noise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def equal_log_snr(path: Path, source: Path, t, alpha=None, sigma=None) -> tuple:
    """(t_source, scale): the time on `source` with the log-SNR of `path` at t, and the factor
    |(alpha_source, sigma_source)| / |(alpha, sigma)| taking x_t on `path` to x on `source` (NOTATION 5).
    alpha, sigma: `path`'s coefficients at t when already known."""
    t_src = source.t_from_log_snr(path.log_snr(t))
    a, s = (path.alpha(t), path.sigma(t)) if alpha is None else (alpha, sigma)
    a_src, s_src = source.alpha(t_src), source.sigma(t_src)
    return t_src, torch.sqrt((a_src**2 + s_src**2) / (a**2 + s**2))


def broadcast(coef: Tensor, x: Tensor) -> Tensor:
    """Shape a [] or [batch] coefficient to broadcast against x, in x's dtype and device."""
    coef = coef.to(device=x.device, dtype=x.dtype if x.is_floating_point() else coef.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

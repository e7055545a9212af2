"""Exact conversions between prediction kinds (NOTATION section 6). The only place they exist.

Every kind is an affine function of the canonical pair (x0_hat, eps_hat) at fixed (x_t, t):

    eps       eps_hat
    x0        x0_hat
    v         alpha eps_hat - sigma x0_hat                  (Salimans & Ho)
    score     -eps_hat / sigma                              (Tweedie)
    velocity  alpha' x0_hat + sigma' eps_hat                (dx_t/dt, the PF-ODE drift)
    edm       (x0_hat - c_skip x_t) / c_out                 (EDM's raw network output F)
    trigflow  -(x0_hat - c_skip x_t) / c_out                (TrigFlow's F; NOTATION 8)

Where a conversion divides by a coefficient that is zero (alpha = 0 for eps -> x0, sigma = 0 for
x0 -> eps), `to_pair` / `from_pair` raise a clear error instead of returning inf or NaN. The check
runs on CPU tensors only, so GPU sampling loops never synchronise.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import UnifuseError, choose
from ..paths.base import Path, as_time, broadcast

KINDS = ("eps", "x0", "v", "score", "velocity")
PRECONDITIONED = ("edm", "trigflow", "consistency")
CONVERTIBLE = KINDS + ("edm", "trigflow")  # the kinds to_pair reads and from_pair writes
VELOCITY_SINGULAR = ("velocity is singular where the path's derivative is infinite (e.g. VP at t = 0); "
                     "evaluate at t > t_min")


class Coefficients(NamedTuple):
    """alpha, sigma, d_alpha, d_sigma at t, shaped to broadcast against x."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Conversions run in float32 at least (float64 when x is float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def coefficients(path: Path, t, like: torch.Tensor) -> Coefficients:
    """The path's coefficients at t (computed in float64), cast to the conversion dtype of `like`."""
    ref = like.to(compute_dtype(like)) if like.dtype != compute_dtype(like) else like
    return Coefficients(*(broadcast(c, ref) for c in path.coefficients(as_time(t).to(like.device))))


def _require(ok: torch.Tensor, message: str) -> None:
    if ok.device.type == "cpu" and not bool(ok.all()):
        raise UnifuseError(message)


def _edm_scalings(c: Coefficients, sigma_data: float):
    """c_skip and c_out of EDM preconditioning written on x_t (alpha != 1 allowed, alpha = 0 safe)."""
    r2 = c.sigma**2 + (c.alpha * sigma_data) ** 2
    return sigma_data**2 * c.alpha / r2, c.sigma * sigma_data / torch.sqrt(r2)


def validate(kind: str, c: Coefficients) -> None:
    """Raise the clear error where converting a `kind` prediction to the pair is singular at c."""
    a, s, da, ds = c
    if kind == "eps":
        _require(a > 0, "eps-prediction cannot give x0 where alpha = 0 (pure noise); use v, x0 or velocity "
                        "prediction, or start sampling below the noise end")
    elif kind == "x0":
        _require(s > 0, "x0-prediction cannot give eps where sigma = 0 (clean data); evaluate at t > t_min")
    elif kind == "score":
        _require((a > 0) & (s > 0),
                 "a score is defined only where 0 < alpha and 0 < sigma; evaluate strictly inside the path")
    elif kind == "velocity":
        _require(torch.isfinite(da) & torch.isfinite(ds), VELOCITY_SINGULAR)
    elif kind in ("edm", "trigflow"):
        _require(s > 0, "eps is undefined at sigma = 0 (clean data); evaluate at t > t_min")


def to_pair(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coefficients, sigma_data: float = 0.5,
            check: bool = True):
    """(x0_hat, eps_hat) from a prediction of the given kind (`check=False`: c was validated already)."""
    if kind not in CONVERTIBLE:
        choose("prediction kind", kind, CONVERTIBLE)
    if check:
        validate(kind, c)
    a, s, da, ds = c
    if kind == "eps":
        return (x_t - s * out) / a, out
    if kind == "x0":
        return out, (x_t - a * out) / s
    if kind == "v":
        n2 = a * a + s * s
        return (a * x_t - s * out) / n2, (s * x_t + a * out) / n2
    if kind == "score":
        return (x_t + s * s * out) / a, -s * out
    if kind == "velocity":
        det = da * s - ds * a  # < 0 wherever log-SNR strictly decreases
        return (s * out - ds * x_t) / det, (da * x_t - a * out) / det
    c_skip, c_out = _edm_scalings(c, sigma_data)
    x0 = c_skip * x_t + c_out * (out if kind == "edm" else -out)
    return x0, (x_t - a * x0) / s


def from_pair(kind: str, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, c: Coefficients,
              sigma_data: float = 0.5):
    """A prediction of the given kind from the pair (x0_hat, eps_hat)."""
    a, s, da, ds = c
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        _require(s > 0, "the score is infinite at sigma = 0 (clean data); evaluate at t > t_min")
        return -eps / s
    if kind == "velocity":
        _require(torch.isfinite(da) & torch.isfinite(ds), VELOCITY_SINGULAR)
        return da * x0 + ds * eps
    if kind in ("edm", "trigflow"):
        c_skip, c_out = _edm_scalings(c, sigma_data)
        _require(c_out > 0, "the preconditioned output F is undefined at sigma = 0; evaluate at t > t_min")
        F = (x0 - c_skip * x_t) / c_out
        return F if kind == "edm" else -F
    choose("prediction kind", kind, CONVERTIBLE)


def convert(out: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, c: Coefficients, sigma_data: float = 0.5):
    """Re-express a prediction of kind `src` as kind `dst` at the same (x_t, t)."""
    if src == dst:
        return out
    x0, eps = to_pair(src, out, x_t, c, sigma_data)
    return from_pair(dst, x0, eps, x_t, c, sigma_data)

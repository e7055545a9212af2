"""What each prediction kind is, where it is defined, and how a network's raw output becomes the pair.

The one home of prediction-kind knowledge outside the conversions themselves (NOTATION sections 6 and 8):
every model kind, where converting a kind to the canonical pair (x0_hat, eps_hat) divides by zero at an end
of the path (alpha = 0 at pure noise, sigma = 0 at clean data), the pair from a raw network output, and the
guarded pair conversion that guidance and thresholding use at those ends. Nothing else switches on a kind.
"""
from __future__ import annotations

import torch

from ..errors import UnifuseError
from .convert import CONVERTIBLE, KINDS, PRECONDITIONED, Coefficients, to_pair, validate
from .precond import x0_from_raw

PREDICTIONS = KINDS + PRECONDITIONED  # every kind a DiffusionModel may predict; CONVERTIBLE: to_pair's and from_pair's

# to the pair divides by alpha (undefined at pure noise, SNR = 0) / by sigma (undefined at clean data)
_DIVIDES_BY_ALPHA = ("eps", "score")
_SINGULAR_AT_DATA = ("score", "edm", "trigflow")  # the whole pair, not just eps, fails at sigma = 0


def preconditioned(kind: str) -> bool:
    """The network output is a preconditioned F (edm, trigflow, consistency): its input is x_t scaled to unit
    variance (EDM's c_in) by default."""
    return kind in PRECONDITIONED


def safe_div(num: torch.Tensor, den: torch.Tensor, fill) -> torch.Tensor:
    """num / den where den > 0, `fill` elsewhere, without a host sync and without inf or NaN in the graph."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), fill)


def defined_at_zero_snr(kind: str) -> bool:
    """Can a `kind` prediction be turned into the pair at alpha = 0 (pure noise)? Not for eps and score."""
    return kind not in _DIVIDES_BY_ALPHA


def noise_scaled(kind: str) -> bool:
    """Is a `kind` prediction the noise estimate times a function of t alone (eps, and the score -eps / sigma)?"""
    return kind in _DIVIDES_BY_ALPHA


def model_pair(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coefficients, sigma_data: float,
               boundary: float, check: bool = True):
    """(x0_hat, eps_hat) from a network's raw output of any model kind (`check=False`: c was validated)."""
    if kind in PRECONDITIONED:
        x0 = x0_from_raw(kind, out, x_t, c, sigma_data, boundary)
        # eps is undefined at sigma = 0 (x_t is the data there); report 0 without a host sync.
        return x0, safe_div(x_t - c.alpha * x0, c.sigma, torch.zeros_like(x0))
    return to_pair(kind, out, x_t, c, sigma_data, check=check)


def valid_times(kind: str, c: Coefficients) -> list:
    """Per time of a grid (c: 1-D coefficients over it): is converting from `kind` to the pair nonsingular there?

    One vectorized check on the CPU grid, so sampling steps can skip it; a time that fails keeps its per-call
    check and error. Preconditioned kinds do no checked division, so they report False everywhere."""
    n = c.alpha.numel()
    if kind in PRECONDITIONED:
        return [False] * n

    def ok(part) -> bool:
        try:
            validate(kind, Coefficients(*(v[part] for v in c)))
            return True
        except UnifuseError:
            return False

    if ok(slice(0, n - 1)):  # the usual case: only the data end (never evaluated) may be singular
        return [True] * (n - 1) + [ok(slice(n - 1, n))]
    return [ok(slice(k, k + 1)) for k in range(n)]


def safe_pair(kind: str, out: torch.Tensor, x_t: torch.Tensor, c: Coefficients, sigma_data: float, fallback):
    """to_pair, except where it divides by zero at an end of the path: there `fallback` (x0, eps) is used."""
    if kind == "x0":
        return out, safe_div(x_t - c.alpha * out, c.sigma, fallback[1])
    if kind == "eps":
        return safe_div(x_t - c.sigma * out, c.alpha, fallback[0]), out
    if kind in _SINGULAR_AT_DATA and c.sigma.device.type == "cpu" and bool((c.sigma == 0).any()):
        return fallback
    return to_pair(kind, out, x_t, c, sigma_data)


__all__ = ["KINDS", "PRECONDITIONED", "PREDICTIONS", "CONVERTIBLE", "safe_div", "defined_at_zero_snr", "noise_scaled",
           "preconditioned", "model_pair", "valid_times", "safe_pair"]

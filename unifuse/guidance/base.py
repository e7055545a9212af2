"""The guided model: a `DiffusionModel` whose `evaluate` returns a guided (x0_hat, eps_hat) (DESIGN rule 7,
after EDM2), so every sampler and every path (`guided.on(other_path)`) works with it unchanged.

Guidance is on inside an interval of EDM noise levels `sigma_lo < sigma/alpha <= sigma_hi` (or of log-SNR
values; Kynkaanniemi et al. 2024, ALGORITHMS card 11b), never a fraction of steps, so it means the same on
every grid, sampler and path. Each guided model counts its network evaluations by role (`cond_evals`,
`uncond_evals`, `weak_evals`, `classifier_evals`; one batched call counts once per role).
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError, choose
from ..model import DiffusionModel, Evaluation, WrappedModel
from ..parameterization.convert import coefficients, compute_dtype, from_pair
from ..parameterization.kinds import CONVERTIBLE, safe_pair
from ..paths.base import as_time

COUNTERS = ("cond_evals", "uncond_evals", "weak_evals", "classifier_evals")


class GuidedModel(WrappedModel):
    """Base of the guided models: a DiffusionModel on `inner.path` whose `evaluate` is guided.

    interval: (sigma_lo, sigma_hi] in EDM noise level sigma/alpha; interval_log_snr: [lam_lo, lam_hi)
    in log-SNR (the same set). Outside it the plain conditional model is returned.
    """

    what = "guidance"

    def __init__(self, inner: DiffusionModel, scale: float, interval=None, interval_log_snr=None, kind: str = "x0"):
        super().__init__(inner)
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise UnifuseError(f"guidance scale must be a number (1 = no guidance), got {scale!r}") from None
        if not math.isfinite(scale):
            raise UnifuseError(f"guidance scale must be finite, got {scale}")
        self.scale, self.kind = scale, choose("guidance kind", kind, CONVERTIBLE)
        self.interval = _interval(interval, interval_log_snr)
        self.reset_counts()

    def reset_counts(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)

    def counts(self) -> dict:
        """Network evaluations so far by role (a batched cond+uncond call counts once for each)."""
        return {name: getattr(self, name) for name in COUNTERS}

    def inside(self, t, batch: int) -> torch.Tensor:
        """[batch] bool on t's own device: where guidance is on (sigma_lo < sigma/alpha <= sigma_hi)."""
        t = as_time(t).to(torch.float64)
        t = t.expand(batch) if t.ndim == 0 else t
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        lo, hi = self.interval
        s = self.path.sigma_edm(t)
        return (s > lo) & (s <= hi)

    def combine(self, x, t, low: Evaluation, high: Evaluation, weight: float) -> Evaluation:
        """low + weight (high - low), taken in prediction kind `self.kind` (card 11; affine, so kind-free)."""
        c = coefficients(self.path, t, x)
        xc = x.to(compute_dtype(x))
        p_low = from_pair(self.kind, low.x0, low.eps, xc, c, self.sigma_data)
        p_high = from_pair(self.kind, high.x0, high.eps, xc, c, self.sigma_data)
        guided = p_low + weight * (p_high - p_low)
        guided = self.adjust(guided, p_high)
        # where `kind` cannot be converted back (eps at alpha = 0, x0 at sigma = 0), the affine
        # combination of the pair itself is the exact answer of plain guidance
        fallback = (low.x0 + weight * (high.x0 - low.x0), low.eps + weight * (high.eps - low.eps))
        x0, eps = safe_pair(self.kind, guided, xc, c, self.sigma_data, fallback)
        return Evaluation(x0, eps, high.var_frac)

    def adjust(self, guided, reference):
        return guided

    def extra_repr(self) -> str:
        return f"scale={self.scale}, interval={self.interval}, kind={self.kind!r}, path={self.path!r}"


def _interval(interval, interval_log_snr):
    """(sigma_lo, sigma_hi] from either form; None when guidance is on everywhere."""
    if interval is not None and interval_log_snr is not None:
        raise UnifuseError("give the guidance interval once: interval=(sigma_lo, sigma_hi) or "
                           "interval_log_snr=(lam_lo, lam_hi)")
    if interval is None and interval_log_snr is None:
        return None
    pair = interval if interval is not None else interval_log_snr
    try:
        a, b = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise UnifuseError(f"a guidance interval is two numbers (low, high), got {pair!r}") from None
    if interval_log_snr is not None:  # lam in [lam_lo, lam_hi)  <=>  sigma_edm = exp(-lam/2) in (e^-hi/2, e^-lo/2]
        if not a < b:
            raise UnifuseError(f"log-SNR interval must have lam_lo < lam_hi, got ({a}, {b})")
        a, b = math.exp(-b / 2), math.exp(-a / 2)
    if a < 0 or b < a:
        raise UnifuseError("guidance interval must satisfy 0 <= sigma_lo <= sigma_hi (EDM sigma = sigma/alpha), "
                           f"got ({a}, {b})")
    return (a, b)


def parse_interval(text: str) -> tuple:
    """"LO,HI" (EDM sigma = sigma/alpha; "inf" allowed) -> (LO, HI), checked."""
    parts = str(text).replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return _interval((float(parts[0]), float(parts[1])), None)
    except ValueError:
        raise UnifuseError(f"guidance interval must be 'LO,HI' in EDM sigma (e.g. 0.3,5), got {text!r}") from None


def where_on(on: torch.Tensor, guided: Evaluation, plain: Evaluation, var_frac) -> Evaluation:
    """The guided pair where guidance is on ([batch] mask `on`), the plain one elsewhere."""
    m = on.to(plain.x0.device).reshape((-1,) + (1,) * (plain.x0.ndim - 1))
    return Evaluation(torch.where(m, guided.x0, plain.x0), torch.where(m, guided.eps, plain.eps), var_frac)


__all__ = ["GuidedModel", "COUNTERS", "parse_interval", "where_on"]

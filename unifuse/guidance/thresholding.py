"""Thresholding of the denoised estimate, as a model-to-model transform that works with every sampler.

Static clipping keeps x0_hat inside the data range [-limit, limit] (`clip_denoised=True` of Ho et al. 2020 and
Nichol & Dhariwal 2021); dynamic thresholding (Saharia et al. 2022, "Imagen", section 2.3) takes per sample
s = max(quantile(|x0_hat|, p), limit) and returns clamp(x0_hat, -s, s) * limit / s. Either way the noise estimate
is recomputed from the thresholded x0_hat, eps_hat = (x_t - alpha x0_hat) / sigma, so the pair stays consistent
and every sampler, in any prediction kind, sees the same model (handbook ALGORITHMS, DDPM step 3).

It matters most for eps-prediction models near zero SNR: there x0_hat = (x_t - sigma eps_hat) / alpha turns a
small error of eps_hat into a huge one (1/alpha is 2e4 at the last step of the cosine DDPM schedule).
For image data in [-1, 1] only; it changes the samples (it is not an identity of the model).
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError
from ..model import DiffusionModel, Evaluation, WrappedModel, batch_times
from ..parameterization.convert import compute_dtype
from ..parameterization.kinds import safe_pair


class Thresholded(WrappedModel):
    """`inner` with x0_hat clipped to [-limit, limit] (statically, or dynamically at quantile `percentile`)."""

    what = "threshold"

    def __init__(self, inner: DiffusionModel, limit: float = 1.0, percentile: float | None = None):
        super().__init__(inner)
        if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0):
            raise UnifuseError(f"threshold limit must be a positive number (the data range, 1 for images in [-1, 1]), "
                               f"got {limit!r}")
        if percentile is not None and not 0.0 < float(percentile) < 1.0:
            raise UnifuseError(f"threshold percentile must be in (0, 1) (Imagen uses 0.995), got {percentile!r}")
        self.limit = float(limit)
        self.percentile = None if percentile is None else float(percentile)

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        """The thresholded denoised estimate (per sample for the dynamic kind)."""
        if self.percentile is None:
            return x0.clamp(-self.limit, self.limit)
        q = torch.quantile(x0.abs().flatten(1).float(), self.percentile, dim=1).to(x0.dtype)
        s = q.clamp_min(self.limit).reshape((-1,) + (1,) * (x0.ndim - 1))
        return torch.maximum(torch.minimum(x0, s), -s) * (self.limit / s)

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        t = batch_times(t, x)
        e = self.inner.evaluate(x, t, **cond)
        x0 = self.clip(e.x0)
        c = self.coefficients(t, x)
        # eps from the clipped x0 where sigma > 0; at sigma = 0 (the data end) eps is not defined: keep the model's
        _, eps = safe_pair("x0", x0, x.to(compute_dtype(x)), c, self.sigma_data, (x0, e.eps))
        return Evaluation(x0, eps, e.var_frac)

    def extra_repr(self) -> str:
        kind = "static" if self.percentile is None else f"dynamic, percentile={self.percentile}"
        return f"limit={self.limit}, {kind}"


def threshold(model: DiffusionModel, limit: float = 1.0, percentile: float | None = None) -> Thresholded:
    """`model` with its denoised estimate clipped to [-limit, limit] (static), or dynamically thresholded at
    quantile `percentile` of |x0_hat| per sample (Imagen: 0.995); eps is recomputed from the clipped x0."""
    return Thresholded(model, limit, percentile)


__all__ = ["Thresholded", "threshold"]

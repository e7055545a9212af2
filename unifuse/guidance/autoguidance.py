"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
D = D_weak + w (D - D_weak), both models with the same condition, inside a noise-level interval.
"""
from __future__ import annotations

import torch

from ..errors import UnifuseError
from ..model import DiffusionModel, Evaluation, batch_times
from .base import GuidedModel, where_on


class AutoGuided(GuidedModel):
    """Autoguidance (Karras et al. 2024): D = D_weak + w (D - D_weak), both with the same condition."""

    def __init__(self, inner, weak: DiffusionModel, scale, interval=None, interval_log_snr=None, kind: str = "x0"):
        super().__init__(inner, scale, interval, interval_log_snr, kind)
        if not isinstance(weak, DiffusionModel):
            raise UnifuseError(f"the weak model must be a uf.DiffusionModel, got {type(weak).__name__}")
        self.weak = weak if weak.path == inner.path else weak.on(inner.path)

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        on = self.inside(t, x.shape[0])  # decided where t lives (CPU for samplers: no device sync)
        t = batch_times(t, x)
        self.cond_evals += 1
        e_c = self.inner.evaluate(x, t, **cond)
        if self.scale == 1.0:
            return e_c
        if on.device.type == "cpu" and not bool(on.any()):
            return e_c
        self.weak_evals += 1
        e_w = self.weak.evaluate(x, t, **cond)
        return where_on(on, self.combine(x, t, e_w, e_c, self.scale), e_c, e_c.var_frac)


def autoguidance(model: DiffusionModel, weak_model: DiffusionModel, scale: float, *, interval=None,
                 interval_log_snr=None, kind: str = "x0") -> AutoGuided:
    """Autoguidance (Karras et al. 2024): guide `model` away from a weaker version of itself."""
    return AutoGuided(model, weak_model, scale, interval, interval_log_snr, kind)


__all__ = ["AutoGuided", "autoguidance"]

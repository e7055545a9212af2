"""Classifier-free guidance (Ho & Salimans 2022; ALGORITHMS card 11): D = D(null) + w (D(c) - D(null)), w = 1 the
conditional model, with the optional rescale of Lin et al. (2023) (card 4) and a noise-level interval of
Kynkaanniemi et al. (2024) (card 11b). The conditional and null inputs go through the network in one batch.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..data.conditions import batch_value, check_condition, conditioning, null_condition, select, stack_conditions
from ..errors import UnifuseError
from ..model import DiffusionModel, Evaluation, batch_times
from .base import GuidedModel, where_on


class ClassifierFree(GuidedModel):
    """Classifier-free guidance: D = D(null) + w (D(c) - D(null)) inside the interval, D(c) outside."""

    def __init__(self, inner, scale, uncond=None, rescale: float = 0.0, interval=None, interval_log_snr=None,
                 kind: str = "x0", batch: bool = True):
        super().__init__(inner, scale, interval, interval_log_snr, kind)
        if not 0.0 <= float(rescale) <= 1.0:
            raise UnifuseError(f"guidance rescale phi must lie in [0, 1] (Lin et al. use 0.7), got {rescale}")
        info = conditioning(inner)
        if info["num_classes"] == 0 and info["text_dim"] == 0:
            raise UnifuseError("classifier-free guidance needs a conditional model, but this one was trained without "
                               "classes or text; train digits-cond / digits-text (or use classifier_guidance)")
        self.uncond, self.rescale, self.batch = uncond, float(rescale), bool(batch)

    def unconditional(self, cond: Mapping, batch: int) -> dict:
        """The null condition for this batch (values with batch 1 are broadcast)."""
        if self.uncond is None:
            out = null_condition(cond, batch)
        elif callable(self.uncond):
            out = dict(self.uncond(cond))
        elif isinstance(self.uncond, Mapping):
            out = {**{k: v for k, v in cond.items() if k not in self.uncond}, **self.uncond}
        else:
            raise UnifuseError("uncond must be a dict of condition values or a callable, "
                               f"got {type(self.uncond).__name__}")
        return {k: (None if v is None else batch_value(v, batch)) for k, v in out.items()}

    def adjust(self, guided, reference):
        """Lin et al. (2023) rescale: match the std of the conditional prediction, blended by phi."""
        if self.rescale == 0.0:
            return guided
        dims = tuple(range(1, guided.ndim))
        ratio = reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        return self.rescale * guided * ratio + (1 - self.rescale) * guided

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        """Guided (x0_hat, eps_hat) at (x_t, t); cond and null batched in one call where possible."""
        check_condition(self.inner, **cond)
        on = self.inside(t, x.shape[0])  # decided where t lives (CPU for samplers: no device sync)
        t = batch_times(t, x)
        if self.scale == 1.0:  # exactly the conditional model
            self.cond_evals += 1
            return self.inner.evaluate(x, t, **cond)
        B = x.shape[0]
        uncond = self.unconditional(cond, B)
        if self.scale == 0.0:  # exactly the unconditional model
            self.uncond_evals += 1
            return self.inner.evaluate(x, t, **uncond)
        if on.device.type == "cpu" and not bool(on.any()):
            self.cond_evals += 1
            return self.inner.evaluate(x, t, **cond)
        if on.device.type != "cpu" or bool(on.all()):
            idx = None
        else:
            idx = on.nonzero().reshape(-1)
        xu, tu, cu = (x, t, uncond) if idx is None else (x[idx], t[idx], select(uncond, idx, B))
        if self.batch:
            both = stack_conditions(cu, cond, xu.shape[0], B)
            ev = self.inner.evaluate(torch.cat([xu, x]), torch.cat([tu, t]), **both)
            n = xu.shape[0]
            e_u = Evaluation(ev.x0[:n], ev.eps[:n], None if ev.var_frac is None else ev.var_frac[:n])
            e_c = Evaluation(ev.x0[n:], ev.eps[n:], None if ev.var_frac is None else ev.var_frac[n:])
        else:
            e_u, e_c = self.inner.evaluate(xu, tu, **cu), self.inner.evaluate(x, t, **cond)
        self.cond_evals += 1
        self.uncond_evals += 1
        if idx is None:
            out = self.combine(x, t, e_u, e_c, self.scale)
            if on.device.type != "cpu":  # a device-side mask: keep the conditional output outside
                out = where_on(on, out, e_c, out.var_frac)
            return out
        sub = self.combine(x[idx], t[idx], e_u, _take(e_c, idx), self.scale)
        x0, eps = e_c.x0.clone(), e_c.eps.clone()
        x0[idx], eps[idx] = sub.x0, sub.eps
        return Evaluation(x0, eps, e_c.var_frac)


def _take(e: Evaluation, idx) -> Evaluation:
    return Evaluation(e.x0[idx], e.eps[idx], None if e.var_frac is None else e.var_frac[idx])


def classifier_free(model: DiffusionModel, scale: float, *, uncond=None, rescale: float = 0.0, interval=None,
                    interval_log_snr=None, kind: str = "x0", batch: bool = True) -> ClassifierFree:
    """Classifier-free guidance of `model` with scale w (1 = conditional, 0 = unconditional; Ho & Salimans 2022).

    uncond: the null condition (default: class -1, the encoding of "" for text), as a dict or cond -> dict.
    rescale: Lin et al. (2023) phi in [0, 1], applied in prediction `kind`.
    interval: (sigma_lo, sigma_hi] in EDM sigma = sigma/alpha; interval_log_snr: [lam_lo, lam_hi).
    kind: the prediction kind the combination is taken in (plain CFG gives the same result in every kind).
    batch: evaluate the conditional and null inputs in one forward pass.
    """
    return ClassifierFree(model, scale, uncond, rescale, interval, interval_log_snr, kind, batch)


__all__ = ["ClassifierFree", "classifier_free"]

"""Classifier guidance (Dhariwal & Nichol 2021; ALGORITHMS card 10): score_y = score + s grad_x log p(y | x_t)
with a noise-conditional classifier (`unifuse.nets.classifier`), evaluated on its own path at equal log-SNR.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.conditions import batch_value
from ..errors import UnifuseError
from ..model import DiffusionModel, Evaluation, batch_times
from ..parameterization.convert import coefficients, compute_dtype
from ..parameterization.kinds import safe_div
from ..paths.base import equal_log_snr
from .base import GuidedModel, where_on


class ClassifierGuided(GuidedModel):
    """Classifier guidance (Dhariwal & Nichol 2021): score_y = score + s grad_x log p(y | x_t), i.e.
    eps -= s sigma grad and x0 += s (sigma^2 / alpha) grad (ALGORITHMS card 10)."""

    def __init__(self, inner, classifier: Callable, scale, interval=None, interval_log_snr=None,
                 pass_labels: bool = False):
        super().__init__(inner, scale, interval, interval_log_snr, "eps")
        if not callable(classifier):
            raise UnifuseError("classifier must be callable as classifier(x_t, t) -> logits, "
                               f"got {type(classifier).__name__}")
        self.classifier, self.pass_labels = classifier, bool(pass_labels)

    def log_prob_grad(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, **cond) -> torch.Tensor:
        """grad_x log p(y | x_t) from the classifier's logits (on its own path when it has one)."""
        path = getattr(self.classifier, "path", None)
        with torch.enable_grad():
            xg = x.detach().to(compute_dtype(x)).requires_grad_(True)
            xin, tin = xg, t
            if path is not None and path != self.path:  # equal log-SNR, x rescaled (NOTATION section 5)
                tin, scale = equal_log_snr(self.path, path, t)
                xin = xg * scale.to(xg.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            logits = self.classifier(xin, tin, **cond)
            logp = torch.log_softmax(logits.to(xg.dtype), dim=-1)
            picked = logp.gather(1, labels.clamp(min=0).reshape(-1, 1)).reshape(-1)
            picked = torch.where(labels >= 0, picked, torch.zeros_like(picked))  # -1: no guidance
            (grad,) = torch.autograd.grad(picked.sum(), xg)
        self.classifier_evals += 1
        return grad.detach()

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        on = self.inside(t, x.shape[0])  # decided where t lives (CPU for samplers: no device sync)
        t = batch_times(t, x)
        if cond.get("class_labels") is None:
            raise UnifuseError("classifier guidance needs the target classes: pass class_labels (--class)")
        labels = batch_value(cond["class_labels"], x.shape[0]).to(x.device).long()
        rest = {k: v for k, v in cond.items() if k != "class_labels"}
        self.cond_evals += 1
        e = self.inner.evaluate(x, t, **(cond if self.pass_labels else rest))
        if self.scale == 0.0:
            return e
        if on.device.type == "cpu" and not bool(on.any()):
            return e
        grad = self.log_prob_grad(x, t, labels, **rest) * self.scale
        c = coefficients(self.path, t, x)
        eps = e.eps - c.sigma * grad
        # at alpha = 0 (pure noise) p(y | x_t) is the prior and the gradient vanishes
        x0 = e.x0 + safe_div(c.sigma**2, c.alpha, torch.zeros_like(c.alpha)) * grad
        return where_on(on, Evaluation(x0, eps), e, e.var_frac)


def classifier_guidance(model: DiffusionModel, classifier: Callable, scale: float = 1.0, *, interval=None,
                        interval_log_snr=None, pass_labels: bool = False) -> ClassifierGuided:
    """Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier(x_t, t) -> logits.

    The target classes come from `class_labels` at sampling time (-1 = no guidance for that sample);
    pass_labels=True also gives them to `model` (guidance on top of a class-conditional model).
    """
    return ClassifierGuided(model, classifier, scale, interval, interval_log_snr, pass_labels)


__all__ = ["ClassifierGuided", "classifier_guidance"]

"""Guidance as model -> model transforms (DESIGN rule 7, after EDM2): each guided object is a `DiffusionModel`
whose `evaluate` returns the guided (x0_hat, eps_hat), so every sampler and every path works with it unchanged.

- `classifier_free`: Ho & Salimans (2022), `D = D_u + w (D_c - D_u)` (ALGORITHMS cards 4, 11, 11b).
- `autoguidance`: Karras et al. (2024), `D = D_weak + w (D - D_weak)`.
- `classifier_guidance`: Dhariwal & Nichol (2021), score += s * grad_x log p(y | x_t) (card 10).
- `threshold`: static or dynamic clipping of the denoised estimate (Saharia et al. 2022).

Conditions (the null condition, dropout, checks) live in `unifuse.data.conditions` and are re-exported here.
"""
from ..data.conditions import check_condition, conditioning, drop_condition, null_condition, stack_conditions
from .autoguidance import AutoGuided, autoguidance
from .base import COUNTERS, GuidedModel, parse_interval
from .classifier import ClassifierGuided, classifier_guidance
from .classifier_free import ClassifierFree, classifier_free
from .thresholding import Thresholded, threshold

__all__ = ["classifier_free", "autoguidance", "classifier_guidance", "threshold", "GuidedModel", "ClassifierFree",
           "AutoGuided", "ClassifierGuided", "Thresholded", "COUNTERS", "null_condition", "drop_condition",
           "parse_interval", "stack_conditions", "check_condition", "conditioning"]

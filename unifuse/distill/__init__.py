"""Distillation: a many-step teacher of any family into a student that needs one to four network evaluations
(ALGORITHMS cards 14-20). Every method is a dataclass of hyperparameters implementing `base.Context`'s protocol;
`distill.loop.distill` runs any of them on any teacher run.

    progressive   Salimans & Ho 2022: two teacher DDIM steps in one, halving the steps each round
    cd            consistency distillation with the teacher's own ODE step (Song et al. 2023)
    cft           consistency fine-tuning of the pre-trained model (ECT, Geng et al. 2024)
    scd, sct      continuous-time consistency on TrigFlow, distilled or fine-tuned (Lu & Song 2024)
    reflow        2-rectified flow on the teacher's ODE pairs (Liu et al. 2022)
    instaflow     reflow, then one-step distillation of the straight flow (Liu et al. 2023)
    dmd           distribution matching with a fake score in its own loop (DMD2, Yin et al. 2024)
"""
from __future__ import annotations

from ..registry import construct, lazy_class
from .base import Context, frozen_copy, surrogate

# name -> (module, class): imported when first asked for
METHODS = {
    "progressive": ("progressive", "ProgressiveDistillation"),
    "cd": ("consistency", "ConsistencyDistillation"),
    "cft": ("consistency", "ConsistencyFineTuning"),
    "scd": ("scm", "SCD"),
    "sct": ("scm", "SCT"),
    "reflow": ("reflow", "Reflow"),
    "instaflow": ("reflow", "InstaFlow"),
    "dmd": ("dmd", "DMD"),
}


def method_class(name: str):
    return lazy_class(__name__, METHODS, "distillation method", name)


def get(name: str, **options):
    """A distillation method by name with keyword options (e.g. get("cd", solver="heun"))."""
    return construct(method_class(name), "distillation method", name, options)


__all__ = ["METHODS", "Context", "frozen_copy", "get", "method_class", "surrogate"]

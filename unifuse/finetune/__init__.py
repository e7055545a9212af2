"""Reward fine-tuning: a trained model of any family toward what a reward prefers, with a KL regulariser to the
base stated in nats (ALGORITHMS cards 21-22). Every method is a dataclass of hyperparameters implementing
`base.Context`'s protocol; `finetune.loop.finetune` runs any of them on any base run.

    ddpo        policy gradient on the sampler's own stochastic steps, PPO-clipped (Black et al. 2023)
    dpok        DDPO with the KL to the base in every step (Fan et al. 2023), sigma-scaled
    grpo        group-relative policy gradient on the Flow-GRPO SDE (Liu et al. 2025): ODE families too
    draft       reward backpropagation through the last K sampler steps (DRaFT-K, Clark et al. 2023)
    draft-lv    DRaFT-1 with extra re-noised samples of the last step (lower variance)
    refl        one-step prediction at a random late step (ReFL, Xu et al. 2023)
    alignprop   full backpropagation with randomized truncation and checkpointing (Prabhudesai et al. 2023)
    dpo, ipo    Diffusion-DPO on preference pairs (Wallace et al. 2023), and its IPO variant
"""
from __future__ import annotations

from ..registry import construct, lazy_class
from .base import Context, advantages, step_kl

# name -> (module, class): imported when first asked for
METHODS = {
    "ddpo": ("policy", "DDPO"),
    "dpok": ("policy", "DPOK"),
    "grpo": ("policy", "GRPO"),
    "draft": ("backprop", "DRaFT"),
    "draft-lv": ("backprop", "DRaFTLV"),
    "refl": ("backprop", "ReFL"),
    "alignprop": ("backprop", "AlignProp"),
    "dpo": ("dpo", "DiffusionDPO"),
    "ipo": ("dpo", "DiffusionIPO"),
}


def method_class(name: str):
    return lazy_class(__name__, METHODS, "fine-tuning method", name)


def get(name: str, **options):
    """A fine-tuning method by name with keyword options (e.g. get("draft", k=1, kl=0.01))."""
    return construct(method_class(name), "fine-tuning method", name, options)


__all__ = ["METHODS", "Context", "advantages", "get", "method_class", "step_kl"]

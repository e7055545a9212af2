"""Training objectives: callables `loss(model, x, cond, generator=, step=) -> per-sample losses [B]`.

An objective holds only hyperparameters (EDM's `loss.py`); time densities are plain `rand_*` functions;
weightings are functions of log-SNR; couplings pair data with noise. `get(name, **options)` builds one by
name (the names the training configs use). `ClassifierLoss` trains the noise-conditional classifier of
classifier guidance; `AutoencoderLoss` ("autoencoder") trains the autoencoder of latent diffusion.
"""
from ..errors import UnifuseError, choose
from ..paths.grids import karras_sigmas
from .autoencoder import AutoencoderLoss, kl_divergence
from .classifier import ClassifierLoss
from .consistency import ConsistencyTrainingLoss, ect_r, ict_steps, pseudo_huber
from .couplings import COUPLINGS, couple
from .losses import (
    TARGETS,
    DDPMLoss,
    DenoisingLoss,
    DSMLoss,
    EDMLoss,
    FlowMatchingLoss,
    HybridLoss,
    TrigFlowLoss,
    draw_noise,
    mean_dims,
)
from .meanflow import MeanFlowLoss
from .scm import SCTLoss
from .shortcut import ShortcutLoss
from .time import (
    TIME_DENSITIES,
    ImportanceSampler,
    rand_index,
    rand_log_normal,
    rand_logit_normal,
    rand_logsnr_uniform,
    rand_uniform,
)
from .weighting import WEIGHTINGS, eps_weight, equivalent_x0_weight, loss_weight, x0_weight

OBJECTIVES = {
    "ddpm": DDPMLoss,
    "dsm": DSMLoss,
    "edm": EDMLoss,
    "flow": FlowMatchingLoss,
    "trigflow": TrigFlowLoss,
    "hybrid": HybridLoss,
    "ct": ConsistencyTrainingLoss,
    "sct": SCTLoss,
    "meanflow": MeanFlowLoss,
    "shortcut": ShortcutLoss,
    "regression": DenoisingLoss,
    "autoencoder": AutoencoderLoss,
}


def get(name: str, **options):
    """An objective by name with keyword options (e.g. get("flow", time="uniform"))."""
    choose("objective", name, OBJECTIVES)
    try:
        return OBJECTIVES[name](**options)
    except TypeError as err:
        raise UnifuseError(f"bad option for objective {name!r}: {err}") from None


__all__ = ["OBJECTIVES", "get", "DenoisingLoss", "DDPMLoss", "DSMLoss", "EDMLoss", "FlowMatchingLoss",
           "TrigFlowLoss", "HybridLoss", "ConsistencyTrainingLoss", "SCTLoss", "MeanFlowLoss", "ShortcutLoss",
           "ClassifierLoss", "AutoencoderLoss", "kl_divergence", "TARGETS",
           "WEIGHTINGS", "TIME_DENSITIES",
           "COUPLINGS", "ImportanceSampler", "rand_uniform", "rand_index", "rand_log_normal", "rand_logit_normal",
           "rand_logsnr_uniform", "x0_weight", "eps_weight", "loss_weight", "equivalent_x0_weight", "couple",
           "pseudo_huber", "ict_steps", "karras_sigmas", "ect_r", "mean_dims", "draw_noise"]

"""unifuse: every diffusion-family model as a path, a parameterization, an objective and a sampler.

    import unifuse as uf
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")     # or: model, cfg = uf.load("runs/d")
    x = uf.sample(model, torch.randn(16, 1, 8, 8), sampler="dpmpp_2m", nfe=10)
"""
from . import data, guidance, interop, metrics, nets, objectives, parameterization, paths, samplers, thresholding
from .errors import UnifuseError
from .likelihood import bits_per_dim, log_likelihood
from .model import DiffusionModel
from .sampling import sample

__version__ = "0.1.0"


def load(run, ema=True, device="cpu"):
    """(DiffusionModel in eval mode, its Config) of a trained run folder, its ckpt/ folder or a step folder.

    ema: True for the EMA weights (what sampling uses), False for the raw ones, or a float sigma_rel for post-hoc
    EMA. A thin wrapper over `unifuse.training.load_model`, imported on call: the core never imports training."""
    from .training import load_model

    return load_model(run, ema=ema, device=device)


__all__ = ["paths", "parameterization", "samplers", "guidance", "thresholding", "objectives", "nets", "data", "metrics",
           "interop", "DiffusionModel", "sample", "load", "log_likelihood", "bits_per_dim", "UnifuseError", "__version__"]

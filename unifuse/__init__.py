"""unifuse: every diffusion-family model as a path, a parameterization, an objective and a sampler.

    import unifuse as uf
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")
    x = uf.sample(model, torch.randn(16, 1, 8, 8), sampler="dpmpp_2m", nfe=10)
"""
from . import data, guidance, metrics, nets, objectives, parameterization, paths, samplers, thresholding
from .errors import UnifuseError
from .likelihood import bits_per_dim, log_likelihood
from .model import DiffusionModel
from .sampling import sample

__version__ = "0.1.0"

__all__ = ["paths", "parameterization", "samplers", "guidance", "thresholding", "objectives", "nets", "data", "metrics",
           "DiffusionModel", "sample", "log_likelihood", "bits_per_dim", "UnifuseError", "__version__"]

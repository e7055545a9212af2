"""unifuse: every diffusion-family model as a path, a parameterization, an objective and a sampler.

    import unifuse as uf
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")
    x = uf.sample(model, torch.randn(16, 1, 8, 8), sampler="dpmpp_2m", nfe=10)
"""
from . import parameterization, paths
from .errors import UnifuseError
from .model import DiffusionModel

__version__ = "0.1.0"

__all__ = ["paths", "parameterization", "DiffusionModel", "UnifuseError", "__version__"]

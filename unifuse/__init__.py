"""unifuse: every diffusion-family model as a path, a parameterization, an objective and a sampler.

    import unifuse as uf
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")
    x = uf.sample(model, torch.randn(16, 1, 8, 8), sampler="dpmpp_2m", nfe=10)
"""
from . import parameterization, paths
from .errors import UnifuseError
from .likelihood import bits_per_dim, log_likelihood
from .model import DiffusionModel
from . import samplers  # noqa: E402
from .sampling import sample  # noqa: E402
from . import guidance  # noqa: E402  (classifier_free, autoguidance, classifier_guidance)
from . import objectives  # noqa: E402  (losses, time densities, weightings; training lives in unifuse.training)
from . import data, metrics, nets  # noqa: E402  (data sets; FD / precision-recall / toy distances; architectures)

__version__ = "0.1.0"

__all__ = ["paths", "parameterization", "DiffusionModel", "UnifuseError", "__version__"]

"""Probability paths: one convention for every diffusion family.

    x_t = alpha(t) * x + sigma(t) * noise,    noise ~ N(0, I)

`t = path.t_min` is data (alpha = 1, sigma = 0) and `t = path.t_max` is noise, for every path:
DDPM index 0 is the least noisy step (index -1 is data), rectified flow t = 1 is noise and TrigFlow
t = pi/2 is noise. A family is only a choice of (alpha, sigma) and a time domain; all conversions,
samplers and objectives are written once against this interface (NOTATION.md).
"""
from __future__ import annotations

from ..errors import UnifuseError, choose
from .base import Path, as_time, broadcast
from .continuous import EDM, VE, VP, RectifiedFlow, TrigFlow, VPCosine
from .ddpm import DDPM
from .grids import SPACINGS, time_grid, user_grid

PATHS = {
    "ddpm-linear": DDPM.linear,
    "ddpm-cosine": DDPM.cosine,
    "ddpm-scaled-linear": DDPM.scaled_linear,
    "vp-linear": VP.linear,
    "vp-cosine": VP.cosine,
    "ve": VE,
    "edm": EDM,
    "rf": RectifiedFlow,
    "trigflow": TrigFlow,
}


def get(name: str, **kw) -> Path:
    """Build a path from its name (`uf.paths.get("vp-linear", beta_max=20)`)."""
    choose("path", name, PATHS)
    try:
        return PATHS[name](**kw)
    except TypeError as err:
        raise UnifuseError(f"bad option for path {name!r}: {err}") from None


__all__ = ["Path", "DDPM", "VP", "VPCosine", "VE", "EDM", "RectifiedFlow", "TrigFlow", "PATHS", "SPACINGS",
           "get", "time_grid", "user_grid", "as_time", "broadcast", "UnifuseError"]

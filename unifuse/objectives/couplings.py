"""Couplings of data and noise for the regression objectives.

independent   noise ~ N(0, I) drawn independently of x (every diffusion paper)
ot            mini-batch optimal transport: the batch's noise is re-paired with the data by the exact
              assignment minimising the summed squared distance (Pooladian et al. 2023; Tong et al. 2023),
              which straightens flow-matching paths; the marginals of x and of noise are unchanged.
"""
from __future__ import annotations

import torch

from ..errors import choose

COUPLINGS = ("independent", "ot")


def couple(name: str, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The noise re-ordered so that (x[i], noise[i]) follows the coupling `name`."""
    choose("coupling", name, COUPLINGS)
    if name == "independent" or x.shape[0] < 2:
        return noise
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.detach().flatten(1).to(torch.float64), noise.detach().flatten(1).to(torch.float64)) ** 2
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


__all__ = ["COUPLINGS", "couple"]

"""Loss weightings as functions of log-SNR (Kingma & Gao 2023; Hang et al. 2023; Karras et al. 2022).

Every regression loss is `w_x0(lambda) ||x0_hat - x0||^2` (NOTATION 6.5). A weighting names w_x0; the
loss is then computed in the space of its target (eps, v, velocity, EDM's F, ...) with the weight
`w_x0 / k`, where k is the x0-weight that unit weight on that target already carries
(`parameterization.weights.equivalent_x0_weight`). Written this way, no weighting divides by SNR:

    uniform   1 on the target's own MSE (no reweighting: L_simple, flow matching, EDM's unit F loss)
    snr       w_x0 = SNR                    (= uniform eps-MSE)
    min_snr   w_x0 = min(SNR, gamma)        (Hang et al. 2023; on eps: min(1, gamma / SNR), 1 at SNR = 0)
    edm       w_x0 = SNR + 1 / sigma_d^2    (= lambda(sigma) of EDM; uniform on EDM's F)
    sigmoid   w_eps = sigmoid(bias - lambda) (Kingma & Gao 2023; w_x0 = SNR sigmoid(bias - lambda))

Each is finite at SNR = 0 on every target that is finite there, except `edm` on eps/score targets: an
eps-network has no finite x0 at SNR = 0, so a weighting that charges x0 errors there is infinite; the
objective refuses that combination on paths that reach SNR = 0.
"""
from __future__ import annotations

import torch

from ..errors import UnifuseError, choose
from ..parameterization.convert import Coefficients
from ..parameterization.weights import equivalent_x0_weight, kind_weight, target_coefficients
from ..paths.base import Path

WEIGHTINGS = ("uniform", "snr", "min_snr", "edm", "sigmoid")
F64 = torch.float64


def x0_weight(name: str, lam: torch.Tensor, *, gamma: float = 5.0, sigma_data: float = 0.5, bias: float = 2.0):
    """w_x0(lambda): the weight on ||x0_hat - x0||^2 (float64)."""
    lam = lam.to(F64)
    if name == "uniform":
        raise UnifuseError("'uniform' is unit weight on the target's own MSE; it has no single x0 weight")
    if name == "snr":
        return torch.exp(lam)
    if name == "min_snr":
        return torch.exp(lam).clamp(max=gamma)
    if name == "edm":
        return torch.exp(lam) + 1.0 / sigma_data**2
    if name == "sigmoid":
        return torch.exp(lam + torch.nn.functional.logsigmoid(bias - lam))
    choose("weighting", name, WEIGHTINGS)


def eps_weight(name: str, lam: torch.Tensor, *, gamma: float = 5.0, sigma_data: float = 0.5, bias: float = 2.0):
    """w_eps(lambda) = w_x0 / SNR: the same weighting on ||eps_hat - eps||^2, in closed form (finite at SNR = 0)."""
    lam = lam.to(F64)
    if name in ("uniform", "snr"):
        return torch.ones_like(lam)
    if name == "min_snr":
        return torch.exp(torch.clamp(torch.log(torch.tensor(gamma, dtype=F64)) - lam, max=0.0))
    if name == "edm":
        return 1.0 + torch.exp(-lam) / sigma_data**2
    if name == "sigmoid":
        return torch.sigmoid(bias - lam)
    choose("weighting", name, WEIGHTINGS)


def loss_weight(name: str, kind: str, path: Path, t: torch.Tensor, c: Coefficients, *, sigma_data: float = 0.5,
                gamma: float = 5.0, bias: float = 2.0) -> torch.Tensor:
    """Weight [B] on the per-sample MSE of target `kind` that realises weighting `name` (float64)."""
    choose("weighting", name, WEIGHTINGS)
    if name == "uniform":
        return torch.ones_like(t, dtype=F64)
    lam = path.log_snr(t.to(F64))
    hp = dict(gamma=gamma, sigma_data=sigma_data, bias=bias)
    return kind_weight(kind, c, sigma_data, lambda: x0_weight(name, lam, **hp), lambda: eps_weight(name, lam, **hp))


__all__ = ["WEIGHTINGS", "x0_weight", "eps_weight", "equivalent_x0_weight", "target_coefficients", "loss_weight"]

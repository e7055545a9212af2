"""Exponential moving averages of the weights: EDM's half-life EMA (Karras et al. 2022) and EDM2's
power-function EMA with post-hoc reconstruction of any profile (Karras et al. 2024, section 3).

    EMA        theta_ema <- beta theta_ema + (1 - beta) theta,  beta = 0.5^(batch / h),
               h = min(halflife, rampup * images seen)                       (half-life in images)
    PowerEMA   beta_t = (1 - 1/t)^(gamma + 1) at step t, which averages theta(tau) with weight ~ tau^gamma;
               its relative width sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
    posthoc    snapshots of two PowerEMAs at many steps are combined by least squares in the space of
               averaging profiles, giving the EMA of any other sigma_rel after training.
"""
from __future__ import annotations

import copy
import glob
import math
import os
import re

import numpy as np
import torch

from ..errors import UnifuseError
from ..io import atomic_write


def _lerp_(avg: torch.nn.Module, net: torch.nn.Module, weight: float) -> None:
    """avg <- avg + weight (net - avg) for parameters; buffers are copied."""
    with torch.no_grad():
        for a, p in zip(avg.parameters(), net.parameters()):
            a.lerp_(p.detach().to(a.dtype), weight)
        for a, b in zip(avg.buffers(), net.buffers()):
            a.copy_(b)


class EMA:
    """EDM's EMA with the half-life in images and a ramp-up that shortens it early in training."""

    def __init__(self, net: torch.nn.Module, halflife: float = 10000.0, rampup: float = 0.1):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife, self.rampup = float(halflife), float(rampup)

    def beta(self, images_seen: int, batch: int) -> float:
        h = self.halflife
        if self.rampup > 0:
            h = min(h, self.rampup * images_seen)
        return 0.5 ** (batch / max(h, 1e-8)) if h > 0 else 0.0

    def update(self, net: torch.nn.Module, images_seen: int, batch: int) -> None:
        _lerp_(self.net, net, 1.0 - self.beta(images_seen, batch))


# --- EDM2 power-function EMA ---------------------------------------------------------------------

def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma with (gamma+1) / ((gamma+2)^2 (gamma+3)) = sigma_rel^2: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s), s = sigma_rel^-2."""
    if not 0 < sigma_rel < 0.28:
        raise UnifuseError(f"sigma_rel must be in (0, 0.28) (the width of the averaging profile), got {sigma_rel}")
    s = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class PowerEMA:
    """Power-function EMAs of the weights for a few sigma_rel values (EDM2 uses 0.05 and 0.10)."""

    def __init__(self, net: torch.nn.Module, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.nets = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    def update(self, net: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based)."""
        for avg, gamma in zip(self.nets, self.gammas):
            _lerp_(avg, net, 1.0 - (1.0 - 1.0 / step) ** (gamma + 1))

    def state_dict(self) -> dict:
        return {f"{i}.{k}": v for i, avg in enumerate(self.nets) for k, v in avg.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for i, avg in enumerate(self.nets):
            avg.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")})

    def snapshot(self, folder: str, step: int) -> list:
        """Write each average as `phema-<sigma_rel>-<step>.safetensors` under folder (`unifuse.io.atomic_write`)."""
        from safetensors.torch import save_file

        paths = []
        for avg, s in zip(self.nets, self.sigma_rels):
            state = {k: v.detach().cpu().contiguous().clone() for k, v in avg.state_dict().items()}
            path = os.path.join(folder, f"phema-{s:.4f}-{step:08d}.safetensors")
            paths.append(atomic_write(path, lambda tmp, state=state: save_file(state, tmp)))
        return paths


def _profile_products(g1, t1, g2, t2):
    """Integral over tau of p(tau; g1, t1) p(tau; g2, t2), p = (g+1) tau^g / t^(g+1) on (0, t] (log-space)."""
    m = np.minimum(t1, t2)
    log = (np.log(g1 + 1) + np.log(g2 + 1) + (g1 + g2 + 1) * np.log(m) - np.log(g1 + g2 + 1)
           - (g1 + 1) * np.log(t1) - (g2 + 1) * np.log(t2))
    return np.exp(log)


def posthoc_coefficients(gammas, steps, gamma, step) -> np.ndarray:
    """Least-squares weights x with sum_i x_i p(.; gammas_i, steps_i) closest to p(.; gamma, step) in L2."""
    g, t = np.asarray(gammas, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    A = _profile_products(g[:, None], t[:, None], g[None, :], t[None, :])
    b = _profile_products(g, t, np.float64(gamma), np.float64(step))
    return np.linalg.lstsq(A, b, rcond=None)[0]


def posthoc_ema(run_dir: str, sigma_rel: float, step: int | None = None) -> dict:
    """The weights of a power-function EMA with width sigma_rel at the last snapshot at or before `step`
    (default: the last one), reconstructed from the run's snapshots under RUN/ema/ (EDM2's post-hoc EMA)."""
    from safetensors.torch import load_file

    found = []
    for path in glob.glob(os.path.join(run_dir, "ema", "phema-*.safetensors")):
        m = re.match(r"phema-([0-9.]+)-([0-9]+)\.safetensors$", os.path.basename(path))
        if m:
            found.append((float(m.group(1)), int(m.group(2)), path))
    if not found:
        raise UnifuseError(f"no post-hoc EMA snapshots under {os.path.join(run_dir, 'ema')}; train with "
                           "--set optim.posthoc_ema=true")
    if step is not None:  # the newest snapshots at or before `step` (extrapolating past them is unstable)
        found = [f for f in found if f[1] <= int(step)]
        if not found:
            raise UnifuseError(f"no post-hoc EMA snapshot at or before step {step} under "
                               f"{os.path.join(run_dir, 'ema')}")
    step = max(s for _, s, _ in found)
    x = posthoc_coefficients([sigma_rel_to_gamma(s) for s, _, _ in found], [s for _, s, _ in found],
                             sigma_rel_to_gamma(sigma_rel), step)
    out = None
    for weight, (_, _, path) in zip(x, found):
        state = load_file(path)
        if out is None:
            out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
        for k, v in state.items():
            out[k] += float(weight) * v.to(torch.float64)
    ref = load_file(found[0][2])
    return {k: v.to(ref[k].dtype) for k, v in out.items()}


__all__ = ["EMA", "PowerEMA", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "posthoc_coefficients", "posthoc_ema"]

"""Time grids for sampling (ALGORITHMS cards 4, 6, 7; NOTATION 4.8).

`time_grid(path, steps, spacing)` returns a float64 tensor t_0 > t_1 > ... > t_steps in the path's
native time. It always ends exactly on the data end `path.t_min` (sigma = 0), so a sampler's last step
returns the denoised estimate; the points before it lie in [t_eps, t_max].

Spacings:
  uniform   uniform in native time from t_max to t_eps (DPM-Solver "time_uniform")
  leading, trailing, linspace   the DDPM/DDIM index conventions of diffusers (Lin et al. 2023),
            on the path's own table for DDPM paths, else on a virtual 1000-step index of native time
  karras    EDM's rho-schedule in sigma_edm = sigma/alpha (rho = 7; `rho_ramp`, also iCT's `karras_sigmas`)
  logsnr    uniform in log-SNR
  shift     rectified-flow time shift t' = shift t / (1 + (shift - 1) t) of a uniform grid in the
            equal-SNR rectified-flow time (SD3; shift = 3)
  renoise   for multistep consistency sampling: the noise end, then sigma_edm = 0.8, 0.4, 0.2, ... (halving, or evenly
            in log-sigma down to the least noisy level when halving would pass it; from
            ECT's two-step level 0.821, Geng et al. 2024; images in [-1, 1]). A consistency student's second
            evaluation refines far better from sigma ~ 0.8 than from the Karras grid's 2.5 (digits: FD 0.23
            against 0.42 at 2 steps, docs/benchmarks/distill-digits.md)
A tensor passed as the spacing is taken as the user's grid: it must decrease strictly; the data end is
appended if it is missing.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError, choose
from .base import Path
from .ddpm import DDPM

SPACINGS = ("uniform", "leading", "trailing", "linspace", "karras", "logsnr", "shift", "renoise")
RENOISE_SIGMA = 0.8
F64 = torch.float64


def rho_ramp(start: float, end: float, ramp: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    """EDM's rho-spacing (Karras et al. 2022, eq. 5): (start^(1/rho) + ramp (end^(1/rho) - start^(1/rho)))^rho."""
    return (start ** (1 / rho) + ramp * (end ** (1 / rho) - start ** (1 / rho))) ** rho


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """sigma_1 < ... < sigma_n, EDM's rho-spacing (float64)."""
    return rho_ramp(sigma_min, sigma_max, torch.arange(n, dtype=F64) / max(n - 1, 1), rho)


def _edm_range(path: Path, sigma_min: float | None, sigma_max: float | None, t_max: float | None):
    """Clip the path's sigma_edm range to finite values (80 and 0.002 where the path is unbounded)."""
    top = float(path.sigma_edm(t_max if t_max is not None else path.t_max))
    bottom = float(path.sigma_edm(path.t_eps))
    hi = min(top, sigma_max if sigma_max is not None else (top if math.isfinite(top) else 80.0))
    lo = max(bottom, sigma_min if sigma_min is not None else (bottom if bottom > 0 else 0.002))
    if not lo < hi:
        raise UnifuseError(f"empty sigma range [{lo}, {hi}] for {path!r}; check sigma_min/sigma_max")
    return lo, hi


def _index_grid(n_train: int, steps: int, spacing: str, steps_offset: int = 0) -> torch.Tensor:
    """diffusers DDIM/DDPM timesteps (ALGORITHMS card 4 table), descending integers."""
    if spacing == "leading":
        idx = torch.arange(0, steps, dtype=F64) * (n_train // steps) + steps_offset
        return idx.flip(0)
    if spacing == "linspace":
        return torch.linspace(0, n_train - 1, steps, dtype=F64).round().flip(0)
    # trailing: round(arange(N, 0, -N/K)) - 1
    return (torch.arange(n_train, 0, -n_train / steps, dtype=F64).round() - 1)[:steps]


def time_grid(path: Path, steps: int, spacing="uniform", *, rho: float = 7.0, shift: float = 3.0,
              sigma_min: float | None = None, sigma_max: float | None = None, t_max: float | None = None,
              steps_offset: int = 0, device=None) -> torch.Tensor:
    """Descending native times t_0 > ... > t_steps = path.t_min for `steps` sampler steps."""
    if isinstance(spacing, (torch.Tensor, list, tuple)):
        return user_grid(path, spacing, device)
    if not isinstance(steps, int) or steps < 1:
        raise UnifuseError(f"steps must be a positive integer, got {steps!r}")
    choose("spacing", spacing, SPACINGS)
    top = float(path.t_max if t_max is None else t_max)
    end_is_data = path.t_eps == path.t_min  # the network may be evaluated up to the data end
    n_pts = steps + 1 if end_is_data else steps
    if spacing == "uniform":
        ts = torch.linspace(top, path.t_eps, n_pts, dtype=F64)
    elif spacing in ("leading", "trailing", "linspace"):
        if isinstance(path, DDPM):
            ts = _index_grid(path.N, steps, spacing, steps_offset)
        else:  # a virtual 1000-step table: index n <-> t_eps + (n + 1)/1000 (t_max - t_eps)
            n = _index_grid(1000, steps, spacing, steps_offset)
            ts = path.t_eps + (n + 1) / 1000 * (top - path.t_eps)
        ts = torch.cat([ts, torch.tensor([path.t_min], dtype=F64)])
        return _finish(path, ts, device)
    elif spacing == "karras":
        lo, hi = _edm_range(path, sigma_min, sigma_max, t_max)
        ts = path.t_from_sigma_edm(rho_ramp(hi, lo, torch.linspace(0, 1, steps, dtype=F64), rho))
        n_pts = steps
    elif spacing == "renoise":
        lo, hi = _edm_range(path, sigma_min, sigma_max, t_max)
        top = min(RENOISE_SIGMA, 0.5 * hi)
        ratio = max(0.5, (lo / top) ** (1.0 / max(steps - 2, 1)))  # halving, or evenly in log down to lo
        sig = torch.tensor([hi] + [top * ratio**k for k in range(steps - 1)], dtype=F64)
        ts = path.t_from_sigma_edm(sig)
        n_pts = steps
    elif spacing == "logsnr":
        lo, hi = _edm_range(path, sigma_min, sigma_max, t_max)
        lam = torch.linspace(-2 * math.log(hi), -2 * math.log(lo), steps, dtype=F64)
        ts = path.t_from_log_snr(lam)
        n_pts = steps
    else:  # shift: uniform in rectified-flow time, shifted toward noise, mapped at equal SNR
        lo, hi = _edm_range(path, sigma_min, sigma_max, t_max) if not end_is_data else (0.0, float(path.sigma_edm(top)))
        # the shift maps [0, 1] onto itself; invert it at both ends so the grid spans exactly [lo, hi]
        unshift = lambda v: v / (shift - (shift - 1) * v)
        rf_hi = hi / (1 + hi) if math.isfinite(hi) else 1.0
        rf_lo = lo / (1 + lo)
        u = torch.linspace(unshift(rf_hi), unshift(rf_lo), n_pts, dtype=F64)
        u = shift * u / (1 + (shift - 1) * u)
        ts = path.t_from_sigma_edm(u / (1 - u))
    if n_pts == steps:
        ts = torch.cat([ts, torch.tensor([path.t_min], dtype=F64)])
    return _finish(path, ts, device)


def user_grid(path: Path, ts, device=None) -> torch.Tensor:
    """Validate a user-given grid: strictly decreasing, inside [t_min, t_max]; append the data end."""
    ts = torch.as_tensor(ts, dtype=F64).flatten().cpu()
    if ts.numel() < 1:
        raise UnifuseError("a time grid needs at least one time")
    if float(ts[-1]) != path.t_min:
        ts = torch.cat([ts, torch.tensor([path.t_min], dtype=F64)])
    return _finish(path, ts, device)


def _finish(path: Path, ts: torch.Tensor, device) -> torch.Tensor:
    diffs = ts[1:] - ts[:-1]
    if not bool((diffs < 0).all()):
        bad = int(torch.nonzero(diffs >= 0)[0])
        raise UnifuseError(
            f"time grid must decrease strictly; t[{bad}]={float(ts[bad])} -> t[{bad + 1}]={float(ts[bad + 1])}"
            " (too many steps for this spacing? use fewer steps or another spacing)")
    if float(ts[0]) > path.t_max + 1e-12 or float(ts[-2 if ts.numel() > 1 else -1]) < path.t_min:
        raise UnifuseError(f"time grid leaves the path's domain [{path.t_min}, {path.t_max}]: {ts.tolist()[:3]}...")
    return ts.to(device) if device is not None else ts

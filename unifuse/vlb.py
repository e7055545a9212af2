"""The discrete-time variational bound of DDPM (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2-3).

For a chain t_K > ... > t_1 > t_0 = t_min (t_min is the data end, sigma = 0) of any path:

    -log p(x) <= L_prior + sum_{i=2..K} L_i + L_1                                     (nats)
    L_prior = KL( q(x_{t_K} | x) || N(0, prior_std^2 I) )
    L_i     = E_q KL( q(x_{t_{i-1}} | x_{t_i}, x) || p(x_{t_{i-1}} | x_{t_i}) )        Gaussian KL
    L_1     = E_q -log p(x | x_{t_1})      discretized Gaussian decoder on 256 levels in [-1, 1]

p(x_s | x_t) = N(c_x0 x0_hat + c_xt x_t, var) uses the posterior coefficients of `paths.posterior`;
var is "small" (beta_tilde), "large" (beta) or learned (Improved DDPM: a log-space interpolation).
For a DDPM path the default chain is every step of its table (index -1 is the data), which is the
bound of the papers; `steps=K` gives the bound of a respaced K-step chain (improved-diffusion's
respacing). The decoder's bins have half-width 1/255 around the values -1 + 2k/255 and the edge bins
reach +-inf, so the bound is a code length for 8-bit data: bits/dim = nats / (D ln 2), no offset.

Building blocks for training losses (Improved DDPM hybrid loss): `normal_kl`,
`discretized_gaussian_log_likelihood`, `reverse_log_variance` and `vlb_term`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.special import log_ndtr

from .errors import UnifuseError, choose
from .paths.base import Path, broadcast, log1mexp
from .paths.ddpm import DDPM
from .paths.grids import time_grid, user_grid
from .paths.posterior import Posterior, learned_log_variance, posterior

Tensor = torch.Tensor
VARIANCES = ("small", "large")
DECODERS = ("discrete", "gaussian")
BIN = 1.0 / 255.0  # half-width of a decoder bin: the 256 values -1 + 2k/255 are 2/255 apart
LOG_2PI = math.log(2.0 * math.pi)


# --- the three building blocks --------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) per element, in nats (broadcasts)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_prob_between(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for finite lo < hi, accurate in both tails (reflect into the lower tail)."""
    flip = (lo + hi) > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    lb = log_ndtr(b)
    return lb + log1mexp((log_ndtr(a) - lb).clamp(max=0.0))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log P(x) per element of N(mean, exp(log_var)) integrated over x's 8-bit bin (Ho et al. sec. 3.3).

    x holds values of the 256-level grid -1 + 2k/255 in [-1, 1]; the bin of x is [x - 1/255, x + 1/255],
    except that the bin of -1 extends to -inf and the bin of 1 to +inf, so the 256 probabilities sum to 1.
    Computed with the exact normal CDF in log space (no clamping), stable in both tails."""
    inv = torch.exp(-0.5 * log_var)
    c = x - mean
    hi, lo = (c + BIN) * inv, (c - BIN) * inv
    low_edge, high_edge = x < -1.0 + 0.5 * BIN, x > 1.0 - 0.5 * BIN
    # each branch gets finite arguments only, so no inf * 0 reaches a gradient
    inner = _log_prob_between(torch.where(low_edge | high_edge, hi - 1.0, lo), hi)
    return torch.where(low_edge, log_ndtr(hi), torch.where(high_edge, log_ndtr(-lo), inner))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, exp(log_var)) per element (the continuous decoder, for non-image data)."""
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _times(t) -> Tensor:
    """Times as CPU float64: path tables live on the CPU; coefficients move to the data's device after."""
    return torch.as_tensor(t).detach().to("cpu", torch.float64)


def _is_data_end(path: Path, s: Tensor) -> Tensor:
    return s <= path.t_min


def _clipped(path: Path, s: Tensor, t: Tensor, t_next: Tensor) -> Posterior:
    """posterior(path, s, t) with var_small = 0 at the data end replaced by that of the step (t, t_next)
    (improved-diffusion's `posterior_log_variance_clipped`: beta_tilde_1 at step 0)."""
    post = posterior(path, s, t)
    end = _is_data_end(path, s)
    if not bool(end.any()):
        return post
    nxt = posterior(path, t, t_next.clamp(max=path.t_max))
    return Posterior(post.c_x0, post.c_xt, torch.where(end, nxt.var_small, post.var_small), post.var_large)


def reverse_log_variance(path: Path, s, t, frac: Tensor | None = None, variance: str = "small",
                         t_next=None) -> Tensor:
    """log-variance of p(x_s | x_t): "small" (beta_tilde), "large" (beta) or, given `frac` (the model's
    `var_frac`, Improved DDPM eq. 15), frac log(beta) + (1 - frac) log(beta_tilde).

    s, t: scalars or [batch] times with s < t. At the data end (s = t_min) beta_tilde = 0 is replaced by
    the beta_tilde of the step (t, t_next) (default t_next = 2t - s, i.e. step 1 for DDPM step 0), and
    "large" uses that value too (improved-diffusion's likelihood convention). Returns float64, shaped
    like `frac` when given, else like t."""
    s, t = torch.broadcast_tensors(_times(s), _times(t))
    t_next = 2 * t - torch.where(torch.isfinite(s), s, t - 1) if t_next is None else _times(t_next)
    post = _clipped(path, s, t, t_next)
    if frac is not None:
        post = Posterior(*(broadcast(c, frac.to(torch.float64)) for c in post))
        return learned_log_variance(post, frac.to(torch.float64))
    choose("variance", variance, VARIANCES)
    if variance == "small":
        return torch.log(post.var_small)
    return torch.log(torch.where(_is_data_end(path, s), post.var_small, post.var_large))


def vlb_term(path: Path, x: Tensor, x_t: Tensor, s, t, x0_hat: Tensor, log_var: Tensor, *,
             decoder: str = "discrete", reduce: str = "mean") -> Tensor:
    """One term of the bound per sample [B]: L = KL(q(x_s | x_t, x) || N(mu_theta, exp(log_var))) with
    mu_theta = c_x0 x0_hat + c_xt x_t, or, where s is the data end, the decoder's -log p(x | x_t).

    s, t: scalars or [batch] times (s < t); log_var broadcastable to x (e.g. from `reverse_log_variance`).
    For Improved DDPM's hybrid loss pass x0_hat computed from a detached eps_hat. `reduce`: "mean"
    (nats per dimension, improved-diffusion's `mean_flat`) or "sum" (nats per sample)."""
    choose("decoder", decoder, DECODERS)
    choose("reduction", reduce, ("mean", "sum"))
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, x_t, x0_hat = x.to(dt), x_t.to(dt), x0_hat.to(dt)
    log_var = torch.as_tensor(log_var).to(device=x.device, dtype=dt)
    s, t = _times(s), _times(t)
    post = posterior(path, s, t)
    c_x0, c_xt, var_q = (broadcast(c.to(x.device), x) for c in (post.c_x0, post.c_xt, post.var_small))
    end = _is_data_end(path, s).to(x.device)
    end = end.reshape(end.shape + (1,) * (x.ndim - end.ndim)) if end.ndim else end
    mean_p = c_x0 * x0_hat + c_xt * x_t
    logvar_q = torch.log(torch.where(end, torch.ones_like(var_q), var_q))  # safe: unused at the data end
    kl = normal_kl(c_x0 * x + c_xt * x_t, logvar_q, mean_p, log_var)
    if decoder == "discrete":
        nll = -discretized_gaussian_log_likelihood(x, mean_p, log_var)
    else:
        nll = -gaussian_log_likelihood(x, mean_p, log_var)
    out = torch.where(end, nll, kl).flatten(1)
    return out.mean(1) if reduce == "mean" else out.sum(1)


def prior_kl(path: Path, x: Tensor, t=None, prior_std: float | None = None, reduce: str = "sum") -> Tensor:
    """L_prior = KL( q(x_t | x) || N(0, prior_std^2 I) ) per sample, t = t_max by default (Ho et al. L_T).

    prior_std defaults to `path.prior_sigma`, the std the library's samplers start from (sqrt(1 - abar_T)
    for DDPM); pass 1.0 for the papers' N(0, I). Linear DDPM: 2.0e-5 nats per dimension at |x| = 1."""
    choose("reduction", reduce, ("mean", "sum"))
    t = torch.as_tensor(path.t_max if t is None else t, dtype=torch.float64)
    std = path.prior_sigma if prior_std is None else float(prior_std)
    a, sg = path.alpha(t), path.sigma(t)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    kl = normal_kl(broadcast(a, x) * x, broadcast(2 * torch.log(sg), x), torch.zeros_like(x),
                   torch.full_like(x, 2 * math.log(std)))
    return kl.flatten(1).mean(1) if reduce == "mean" else kl.flatten(1).sum(1)


# --- the whole bound --------------------------------------------------------------------------
class VLB(NamedTuple):
    """The bound per sample (nats, summed over dimensions) and its parts."""

    total: Tensor      # [B]
    prior: Tensor      # [B]  L_prior
    terms: Tensor      # [K, B]  L_K ... L_1 (the last row is the decoder term)
    times: Tensor      # [K + 1] the chain t_K > ... > t_0 = t_min


def chain(path: Path, steps=None, spacing: str = "linspace") -> Tensor:
    """The chain of times the bound runs over: every DDPM step by default, else `time_grid`."""
    if isinstance(steps, (torch.Tensor, list, tuple)):
        return user_grid(path, steps)
    if steps is None:
        if not isinstance(path, DDPM):
            raise UnifuseError(f"the variational bound of a continuous path ({path!r}) needs a chain: pass steps=K "
                               "(e.g. steps=1000)")
        return torch.arange(path.N - 1, -2, -1, dtype=torch.float64)  # N-1, ..., 0 and the data end -1
    return time_grid(path, int(steps), spacing)


def check_images(x: Tensor, what: str = "x") -> None:
    """Require 8-bit images scaled to [-1, 1] (values -1 + 2k/255)."""
    if not x.is_floating_point():
        raise UnifuseError(f"{what} must be a float tensor in [-1, 1] (uint8 images k map to k/127.5 - 1), "
                           f"got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise UnifuseError(f"{what} has values in [{lo:.4g}, {hi:.4g}], outside [-1, 1]; "
                           "scale 8-bit images as k/127.5 - 1")
    k = (x.to(torch.float64) + 1) * 127.5
    off = float((k - k.round()).abs().max())
    if off > 1e-3:
        raise UnifuseError(f"{what} is not on the 256-level grid k/127.5 - 1 (off by {off / 127.5:.3g}); the "
                           "discretized decoder needs 8-bit data (use decoder='gaussian' for continuous data)")


def ddpm_vlb(model, x: Tensor, *, steps=None, spacing: str = "linspace", variance: str = "small",
             decoder: str = "discrete", clip: bool = False, prior_std: float | None = None,
             generator: torch.Generator | None = None, progress: bool = False, **cond) -> VLB:
    """The variational bound (Ho et al. eq. 5) of each x, one noise draw per term, in nats per sample.

    model: a DiffusionModel (any prediction kind; learned variance is used when the model has it).
    x: [B, ...] data; 8-bit images in [-1, 1] for decoder="discrete". steps: None (every DDPM step),
    K (a K-step chain by `spacing`) or a tensor of times. variance: "small" or "large" for fixed-variance
    models. clip: clamp x0_hat to [-1, 1]. Costs one network call per chain step per sample."""
    from tqdm.auto import tqdm

    choose("decoder", decoder, DECODERS)
    choose("variance", variance, VARIANCES)
    if x.ndim < 2:
        raise UnifuseError(f"x must be a batch [B, ...], got shape {tuple(x.shape)}")
    if decoder == "discrete":
        check_images(x)
    path = model.path
    ts = chain(path, steps, spacing)
    learned = bool(getattr(model, "learned_variance", False))
    B = x.shape[0]
    terms = []
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()  # dropout off for evaluation; restored below
    try:
        with torch.no_grad():
            prior = prior_kl(path, x, ts[0], prior_std)
            for i in tqdm(range(ts.numel() - 1), disable=not progress, desc="vlb", leave=False):
                t, s = ts[i], ts[i + 1]
                t_next = ts[i - 1] if i > 0 else 2 * t - s
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x_t = path.interpolate(x, noise, t)
                e = model.evaluate(x_t, t.expand(B), **cond)
                x0 = e.x0.clamp(-1, 1) if clip else e.x0
                frac = e.var_frac if learned else None
                log_var = reverse_log_variance(path, s, t, frac, variance, t_next=t_next)
                terms.append(vlb_term(path, x, x_t, s, t, x0, log_var.to(x0.dtype) if frac is not None else log_var,
                                      decoder=decoder, reduce="sum"))
    finally:
        if was_training:
            model.train()
    terms = torch.stack(terms)
    return VLB(prior + terms.sum(0), prior, terms, ts)


def vlb_bits_per_dim(model, x: Tensor, **options) -> Tensor:
    """`ddpm_vlb` in bits per dimension [B] (the discrete decoder makes it a code length: no offset)."""
    D = x[0].numel()
    return ddpm_vlb(model, x, **options).total / (D * math.log(2.0))

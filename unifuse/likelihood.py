"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, sec. 4.3 and app. D.2).

The PF-ODE dx/dt = u(x, t) = alpha' x0_hat + sigma' eps_hat carries the data end to the noise end, and
the instantaneous change of variables (Chen et al. 2018, thm. 1) gives

    log p_{t_start}(x) = log p_prior(x_{t_end}) + int_{t_start}^{t_end} div_x u(x_t, t) dt

(density falls along the flow where div u > 0; ALGORITHMS card 5). The divergence is exact (one
autograd pass per dimension, for small D) or the Hutchinson-Skilling estimate z^T (du/dx) z with
probes z (Rademacher or Gaussian) drawn once per solve and averaged over `n_probes`.

Integration variable. Every path is first re-expressed at equal log-SNR on the unit-angle path
alpha = cos(phi), sigma = sin(phi) (`model.on(TrigFlow(sigma_d=1))`; the state is z = x / sqrt(alpha^2 +
sigma^2)), where the velocity -sin(phi) x0_hat + cos(phi) eps_hat is bounded at both ends for every
family (VP's infinite sigma'(0), EDM's growing scale and alpha = 0 noise ends all disappear), and the
solver steps in psi = phi^(1/7), which concentrates steps near the data end like EDM's rho = 7 grid.
Solvers: adaptive Dormand-Prince 5(4) ("dopri5", rtol/atol; the step of `samplers.dormand_prince`, shared with
the adaptive sampler; one step size for the whole batch, so a sample's value depends on its batch only at the
level of the tolerance) or fixed RK4.

Conventions (stated once):
- Data end: the ODE starts at t_start > t_min, so the result is log q_{t_start}(x), the density of
  alpha x + sigma noise at t_start (score_sde's eps). Default: the model's `t_eps` where it exceeds
  `t_min`, i.e. sigma/alpha = 0.0100 (DDPM-linear step 0), 0.0064 (DDPM-cosine step 0, VP-cosine),
  0.029 (DDPM-scaled-linear step 0), 0.0105 (VP-linear, t = 1e-3), 0.01 (VE), 0.002 (EDM); else
  sigma/alpha = 1e-3 (RF, TrigFlow). Pass `t_start=` or `sigma_start=` (sigma/alpha) to choose; compare
  models at equal sigma_start.
- Prior at t_end = the model's noise end: N(0, sigma(t_end)^2 I), the distribution samplers start
  from. It ignores alpha(t_end) x. With r = alpha/sigma at t_end (DDPM-linear 0.0064, VP-linear 0.0066,
  EDM 0.0125, VE 0.02, DDPM-scaled-linear 0.068; 0 for RF, TrigFlow and the cosine paths) the error
  per sample is about r x.noise (first order, zero mean over the noise) and its mean over data is
  -KL(q_T || prior), about -0.5 r^2 E[x^2] per dimension. `data_std=` uses N(0, alpha^2 data_std^2 +
  sigma^2) instead; `prior=` takes any log-density of x_{t_end} (the tests pass the exact q_T).
- Noise end for eps/score models on paths with alpha(t_max) = 0: x0 is undefined there, so the ODE
  stops at sigma/alpha = 1e4 (r = 1e-4 in the prior error above).
- Bits per dimension (`bits_per_dim`): 8-bit images k in {0..255} scaled to [-1, 1]; uniform
  dequantization y = (k + u)/128 - 1, u ~ U[0, 1)^D, so each of the 256 bins has width 2/256 = 1/128 and
  log P(k) >= E_u log p(y) - 7 D ln 2, i.e. bpd = -log p(y) / (D ln 2) + 7.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from .errors import UnifuseError, choose
from .parameterization.kinds import defined_at_zero_snr
from .paths.continuous import TrigFlow
from .samplers.dormand_prince import B5, E, dormand_prince_step, error_norm, step_factor
from .vlb import check_images, vlb_bits_per_dim

Tensor = torch.Tensor
RHO = 7.0                 # psi = phi^(1/RHO) is the solver's variable
SIGMA_START = 1e-3        # default sigma/alpha at the data end where t_eps = t_min
SIGMA_CAP = 1e4           # eps/score models stop at this sigma/alpha on alpha = 0 paths
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("dopri5", "rk4")
EXACT_MAX_DIM = 32        # "auto" uses the exact divergence up to this many dimensions

class Likelihood(NamedTuple):
    """Per-sample results of one PF-ODE solve (nats)."""

    log_prob: Tensor   # [B] log q_{t_start}(x)
    prior: Tensor      # [B] log p_prior(x_{t_end})
    delta: Tensor      # [B] integral of div u (the change of log-density along the flow)
    x_end: Tensor      # x at t_end
    nfe: int           # network evaluations per sample
    t_start: float
    t_end: float


# --- prior ----------------------------------------------------------------------------------------
def prior_log_prob(path, x: Tensor, t=None, *, prior_std: float | None = None,
                   data_std: float | None = None) -> Tensor:
    """log N(x; 0, std^2 I) per sample with std = sigma(t), or sqrt(alpha^2 data_std^2 + sigma^2)."""
    t = torch.as_tensor(path.t_max if t is None else t, dtype=torch.float64)
    a, sg = float(path.alpha(t)), float(path.sigma(t))
    std = prior_std if prior_std is not None else math.sqrt(sg**2 + (a * data_std) ** 2 if data_std else sg**2)
    x = x.flatten(1).to(torch.float64)
    D = x.shape[1]
    return -0.5 * (x * x).sum(1) / std**2 - D * math.log(std) - 0.5 * D * math.log(2 * math.pi)


# --- divergence -------------------------------------------------------------------------------------
def hutchinson_probes(x: Tensor, n: int, kind: str = "rademacher",
                      generator: torch.Generator | None = None) -> Tensor:
    """n probes shaped like x with E[z z^T] = I: Rademacher (+-1) or standard Gaussian."""
    choose("probe", kind, PROBES)
    z = torch.randn((n,) + tuple(x.shape), generator=generator, dtype=x.dtype, device=x.device)
    return torch.sign(z) + (z == 0) if kind == "rademacher" else z


def jacobian_trace(fn: Callable[[Tensor], Tensor], z: Tensor, probes: Tensor | None = None):
    """(f(z), div_z f(z)) per sample: exact trace of the Jacobian (one autograd pass per dimension),
    or the Hutchinson estimate mean_k p_k^T (df/dz) p_k when probes [n, *z.shape] are given."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        f = fn(z)
        if probes is not None:
            div = 0.0
            for k, p in enumerate(probes):
                (g,) = torch.autograd.grad(f, z, p.to(f.dtype), retain_graph=k < len(probes) - 1)
                div = div + (g * p).flatten(1).sum(1)
            return f.detach(), (div / len(probes)).detach()
        flat = f.flatten(1)
        D = flat.shape[1]
        div = torch.zeros(z.shape[0], dtype=f.dtype, device=f.device)
        for i in range(D):
            (g,) = torch.autograd.grad(flat[:, i].sum(), z, retain_graph=i < D - 1)
            div = div + g.flatten(1)[:, i]
        return f.detach(), div.detach()


# --- solvers on an augmented state (z, delta) -----------------------------------------------------
def _rk4(field, z, r0: float, r1: float, steps: int, bar):
    """Classical fixed-step RK4 from r0 to r1; returns (z, delta, evaluations)."""
    h = (r1 - r0) / steps
    delta = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    r = r0
    for _ in range(steps):
        k1, d1 = field(r, z)
        k2, d2 = field(r + h / 2, z + h / 2 * k1)
        k3, d3 = field(r + h / 2, z + h / 2 * k2)
        k4, d4 = field(r + h, z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
        r += h
        bar.update(h)
    return z, delta, 4 * steps


def _weighted(y, h: float, weights, slopes):
    """y + h sum_j w_j k_j (h sum_j w_j k_j when y is None), zero weights skipped."""
    total = h * sum(w * k for w, k in zip(weights, slopes) if w != 0.0)
    return total if y is None else y + total


def _dopri5(field, z, r0: float, r1: float, rtol: float, atol: float, max_steps: int, bar):
    """Adaptive Dormand-Prince 5(4) (`samplers.dormand_prince`) on the augmented state (z, delta); the error
    norm is the largest per-sample RMS over the batch, so every sample meets the tolerance. Raises when
    `max_steps` attempts do not reach r1."""
    span = r1 - r0
    delta = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    r, h, nfe, attempts = r0, span / 64, 1, 0
    k, d = field(r, z)
    while r < r1 - 1e-12 * span:
        if attempts >= max_steps:
            raise UnifuseError(f"the adaptive PF-ODE solver did not reach the noise end in max_steps={max_steps} "
                               f"steps (at {100 * (r - r0) / span:.1f}% with rtol={rtol}, atol={atol}); "
                               "raise max_steps, "
                               "loosen rtol/atol, or use solver='rk4'")
        attempts += 1
        h = min(h, r1 - r)
        z_new, ks, ds, err_z = dormand_prince_step(field, r, z, (k, d), h, _weighted)
        nfe += 6
        d_new = delta + h * sum(b * dj for b, dj in zip(B5, ds))
        err_d = _weighted(None, h, E, ds)
        err_d = (err_d / (atol + rtol * torch.maximum(delta.abs(), d_new.abs()))).abs()
        per_sample = torch.maximum(error_norm(err_z, z, z_new, rtol, atol), err_d.to(err_z.dtype))
        err = float(per_sample.max())
        if not math.isfinite(err):
            if not bool(torch.isfinite(z).all()):
                raise UnifuseError("the PF-ODE state became non-finite; check the model and the data range")
            h *= 0.25
            if h < 1e-10 * span:
                raise UnifuseError(f"the PF-ODE velocity is not finite near r = {r:.4g}; check the model and data")
            continue
        if err <= 1.0:
            r += h
            bar.update(h)
            z, delta, k, d = z_new, d_new, ks[6], ds[6]
        h *= step_factor(err, 10.0)
        if h < 1e-10 * span:
            raise UnifuseError(f"the adaptive PF-ODE solver's step underflowed near {100 * (r - r0) / span:.1f}% "
                               "of the way "
                               f"(rtol={rtol}, atol={atol}); the model's velocity may be discontinuous there")
    return z, delta, nfe


# --- the likelihood ----------------------------------------------------------------------------------
def T(t) -> Tensor:
    """A float64 scalar time."""
    return torch.tensor(float(t), dtype=torch.float64)


def _rows(cond: dict, lo: int, size: int, n: int) -> dict:
    """The rows lo:lo+size of every conditioning tensor with n rows (other values pass unchanged)."""
    take = lambda v: isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n
    return {k: (v[lo:lo + size] if take(v) else v) for k, v in cond.items()}


def _sem(v: Tensor) -> float:
    return float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")


def _data_end(model, t_start, sigma_start) -> float:
    path = model.path
    if t_start is not None and sigma_start is not None:
        raise UnifuseError("give t_start or sigma_start, not both")
    if sigma_start is not None:
        t_start = float(path.t_from_sigma_edm(torch.tensor(float(sigma_start), dtype=torch.float64)))
    if t_start is None:
        t_eps = float(model.t_eps)
        default = float(path.t_from_sigma_edm(torch.tensor(SIGMA_START, dtype=torch.float64)))
        t_start = t_eps if t_eps > path.t_min else default
    t_start = float(t_start)
    if not t_start > path.t_min or not float(path.sigma(torch.tensor(t_start, dtype=torch.float64))) > 0:
        raise UnifuseError(f"t_start = {t_start} must lie strictly after the data end t_min = {path.t_min} "
                           "(sigma = 0 there, where the PF-ODE divergence is singular); e.g. sigma_start=1e-3")
    return t_start


def _noise_end(model, t_end) -> float:
    path = model.path
    if t_end is None:
        t_end = float(model.t_max)
        at_zero_snr = float(path.alpha(torch.tensor(t_end, dtype=torch.float64))) == 0.0
        if at_zero_snr and not defined_at_zero_snr(model.prediction):
            t_end = float(path.t_from_sigma_edm(torch.tensor(SIGMA_CAP, dtype=torch.float64)))
    return float(t_end)


class _Ends(NamedTuple):
    """The solve's two ends: native times, unit-angle solver variable psi = phi^(1/RHO), and state norms."""

    t0: float
    t1: float
    r0: float
    r1: float
    s0: float
    s1: float


def _ends(model, t_start, sigma_start, t_end) -> _Ends:
    """The data end t_start and noise end t_end as native times, solver variables and norms |(alpha, sigma)|."""
    path = model.path
    t0, t1 = _data_end(model, t_start, sigma_start), _noise_end(model, t_end)
    if not t0 < t1 <= float(path.t_max) + 1e-9:
        raise UnifuseError(f"need t_start < t_end <= t_max = {path.t_max}; got t_start = {t0}, t_end = {t1}")
    phi0, phi1 = math.atan(float(path.sigma_edm(T(t0)))), math.atan(float(path.sigma_edm(T(t1))))
    if phi1 >= math.pi / 2 - 1e-15:
        phi1 = math.pi / 2
    s0, s1 = (math.hypot(float(path.alpha(T(t))), float(path.sigma(T(t)))) for t in (t0, t1))
    return _Ends(t0, t1, phi0 ** (1 / RHO), phi1 ** (1 / RHO), s0, s1)


def _check_inputs(x, divergence, solver, n_probes, steps) -> None:
    choose("divergence", divergence, DIVERGENCES)
    choose("solver", solver, SOLVERS)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise UnifuseError(f"x must be a float tensor [batch, ...], got {getattr(x, 'dtype', type(x).__name__)} "
                           f"of shape {tuple(getattr(x, 'shape', ()))}")
    if not bool(torch.isfinite(x).all()):
        raise UnifuseError("x contains NaN or inf")
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise UnifuseError(f"n_probes must be a positive integer, got {n_probes!r}")
    if solver == "rk4" and not (isinstance(steps, int) and steps >= 1):
        raise UnifuseError(f"steps must be a positive integer for solver='rk4', got {steps!r}")


def _solve(unit, xb: Tensor, cond: dict, probes, ends: _Ends, solver: str, options: dict, bar):
    """Integrate one batch from the data end to the noise end: (x at t_end, integral of div u, NFE)."""

    def velocity(phi: float, z: Tensor) -> Tensor:
        e = unit.evaluate(z, T(phi).expand(z.shape[0]), **cond)
        return (-math.sin(phi) * e.x0 + math.cos(phi) * e.eps).to(z.dtype)

    def field(r: float, z: Tensor):
        phi = min(r**RHO, math.pi / 2)
        dphi = RHO * r ** (RHO - 1)  # dphi/dpsi
        f, div = jacobian_trace(lambda zz: velocity(phi, zz), z, probes)
        return dphi * f, dphi * div.to(torch.float64)

    z = xb / ends.s0
    try:  # a wrong data shape or dtype surfaces here as one clear message
        if solver == "rk4":
            z1, delta, nfe = _rk4(field, z, ends.r0, ends.r1, options["steps"], bar)
        else:
            z1, delta, nfe = _dopri5(field, z, ends.r0, ends.r1, options["rtol"], options["atol"],
                                     options["max_steps"], bar)
    except RuntimeError as err:
        raise UnifuseError(f"the model could not be evaluated on x of shape {tuple(xb.shape)} and dtype "
                           f"{xb.dtype} "
                           f"(is it the model's data shape and parameter dtype?): {err}") from None
    return z1 * ends.s1, delta, nfe


def log_likelihood(model, x: Tensor, *, t_start=None, sigma_start: float | None = None, t_end=None,
                   divergence: str = "auto", n_probes: int = 1, probe: str = "rademacher",
                   solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, steps: int = 64,
                   max_steps: int = 2000, prior_std: float | None = None, data_std: float | None = None,
                   prior: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None,
                   batch_size: int | None = None, progress: bool = False, return_details: bool = False, **cond):
    """log q_{t_start}(x) in nats per sample [B] by the PF-ODE and the instantaneous change of variables.

    model: a DiffusionModel of any path and prediction kind. x: [B, ...] data in the model's units.
    divergence: "exact" (D autograd passes per evaluation), "hutchinson" (`n_probes` probes of kind
    `probe`, fixed per solve, averaged) or "auto" (exact for D <= 32). solver: "dopri5" (adaptive; rtol,
    atol, max_steps attempts) or "rk4" (`steps` steps, 4 evaluations each). Prior: see the module
    docstring. return_details: a `Likelihood` with the prior term, the integral, x at t_end and the NFE.
    cond: passed to the network (class_labels=..., shape [B])."""
    from tqdm.auto import tqdm

    _check_inputs(x, divergence, solver, n_probes, steps)
    path = model.path
    ends = _ends(model, t_start, sigma_start, t_end)
    D, B = x[0].numel(), x.shape[0]
    exact = divergence == "exact" or (divergence == "auto" and D <= EXACT_MAX_DIM)
    size = B if batch_size is None else int(batch_size)
    if size < 1:
        raise UnifuseError(f"batch_size must be positive, got {batch_size!r}")
    # the unit-angle path: phi = arctan(sigma/alpha); the state z = x / sqrt(alpha^2 + sigma^2)
    unit = model.on(TrigFlow(sigma_d=1.0))
    options = dict(steps=steps, rtol=rtol, atol=atol, max_steps=max_steps)
    # dropout off: the ODE needs a deterministic velocity (restored afterwards)
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()
    results = []
    bar = tqdm(total=(ends.r1 - ends.r0) * math.ceil(B / size), disable=not progress, desc="log-likelihood",
               leave=False, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
    try:
        for lo in range(0, B, size):
            xb = x[lo:lo + size]
            probes = None if exact else hutchinson_probes(xb, n_probes, probe, generator)
            x1, delta, nfe = _solve(unit, xb, _rows(cond, lo, size, B), probes, ends, solver, options, bar)
            if prior is not None:
                lp = torch.as_tensor(prior(x1), dtype=torch.float64).reshape(-1)
            else:
                lp = prior_log_prob(path, x1, ends.t1, prior_std=prior_std, data_std=data_std)
            logp = lp + D * math.log(ends.s1) + delta - D * math.log(ends.s0)
            results.append((logp, lp, delta, x1, nfe))
    finally:
        bar.close()
        if was_training:
            model.train()
    logp = torch.cat([r[0] for r in results])
    if not return_details:
        return logp
    return Likelihood(logp, torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results]),
                      torch.cat([r[3] for r in results]), max(r[4] for r in results), ends.t0, ends.t1)


# --- images: dequantization and bits per dimension -------------------------------------------------------
def image_levels(images: Tensor) -> Tensor:
    """Integer levels k in {0..255} of uint8 images or of float images k/127.5 - 1 in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.long()
    check_images(images, "images")
    return ((images.to(torch.float64) + 1) * 127.5).round().long()


def dequantize(images: Tensor, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Uniform dequantization: y = (k + u)/128 - 1, u ~ U[0, 1), so y fills k's bin of width 1/128 in [-1, 1)."""
    k = image_levels(images)
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64, device=k.device)
    return ((k + u) / 128.0 - 1.0).to(dtype)


def bits_per_dim(model, images: Tensor, *, n_dequant: int = 1, generator: torch.Generator | None = None,
                 dtype=torch.float32, return_details: bool = False, **options):
    """Bits per dimension [B] of 8-bit images (uint8 0..255, or float k/127.5 - 1 in [-1, 1]).

    bpd = -log p(y) / (D ln 2) + 7 with y the uniformly dequantized image in [-1, 1) (bins of width
    1/128); with n_dequant > 1 the importance-weighted bound -log2 mean_j p(y_j) (tighter, still an
    upper bound on -log2 P(k) in expectation). options: those of `log_likelihood`."""
    if not (isinstance(n_dequant, int) and n_dequant >= 1):
        raise UnifuseError(f"n_dequant must be a positive integer, got {n_dequant!r}")
    D = images[0].numel()
    logs, details = [], []
    for _ in range(n_dequant):
        y = dequantize(images, generator, dtype)
        out = log_likelihood(model, y, generator=generator, return_details=True, **options)
        logs.append(out.log_prob)
        details.append(out)
    lp = torch.logsumexp(torch.stack(logs), 0) - math.log(n_dequant)
    bpd = -lp / (D * math.log(2.0)) + 7.0
    return (bpd, details) if return_details else bpd


def nll_report(model, images: Tensor, *, batch_size: int = 64, vlb: bool | None = None, vlb_steps=None,
               pad: int = 0, cond: dict | None = None, seed: int = 0, progress: bool = True, **options) -> dict:
    """Bits/dim of 8-bit images by the PF-ODE (and, for DDPM paths, the discrete VLB): a JSON-ready dict
    for `unifuse eval --nll`.

    images: [N, C, H, W] as the model sees them, float k/127.5 - 1 (e.g. `Dataset.images`) or uint8 k.
    pad: pixels of constant padding per side (MNIST: 2); "bits_per_unpadded_dim" divides the same code
    length by the unpadded size (an upper bound on the model's bits per original pixel). cond: network
    conditioning with N rows (e.g. {"class_labels": labels}), split into batches alongside the images.
    vlb_steps: the VLB chain (None = every DDPM step). options: those of `bits_per_dim`/`log_likelihood`."""
    from tqdm.auto import tqdm

    from .paths.ddpm import DDPM

    if not isinstance(images, Tensor) or images.ndim < 2 or images.shape[0] < 1:
        raise UnifuseError(f"images must be a non-empty tensor [N, C, H, W], got {tuple(getattr(images, 'shape', ()))}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UnifuseError(f"batch_size must be a positive integer, got {batch_size!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = images.shape[0]
    cond = dict(cond or {})
    vlb = isinstance(model.path, DDPM) if vlb is None else vlb
    bpds, nfes, start = [], [], time.perf_counter()
    info = None
    for lo in tqdm(range(0, n, batch_size), disable=not progress, desc="nll (pf-ode)"):
        bpd, det = bits_per_dim(model, images[lo:lo + batch_size], generator=g, return_details=True, **options,
                                **_rows(cond, lo, batch_size, n))
        bpds.append(bpd)
        nfes.append(det[0].nfe)
        info = det[0]
    ode_s = time.perf_counter() - start
    bpd = torch.cat(bpds)
    report = {
        "bpd": float(bpd.mean()), "bpd_sem": _sem(bpd),
        "n_images": n, "seconds_per_image": ode_s / n, "nfe_mean": sum(nfes) / len(nfes),
        "method": "pf-ode", "solver": options.get("solver", "dopri5"),
        "rtol": options.get("rtol", 1e-5), "atol": options.get("atol", 1e-5),
        "divergence": options.get("divergence", "auto"), "n_probes": options.get("n_probes", 1),
        "t_start": info.t_start, "sigma_start": float(model.path.sigma_edm(T(info.t_start))),
        "t_end": info.t_end, "dequantization": f"uniform x{options.get('n_dequant', 1)}",
        "convention": "8-bit images in [-1,1]; bpd = -log p(y)/(D ln 2) + 7 with y uniformly dequantized",
    }
    D = images[0].numel()
    inner = D if not pad else images[0, ..., pad:-pad, pad:-pad].numel()
    if pad:
        report["bits_per_unpadded_dim"] = report["bpd"] * D / inner
    if vlb:
        start, vals = time.perf_counter(), []
        x = (image_levels(images).to(torch.float64) / 127.5 - 1.0).to(options.get("dtype", torch.float32))
        for lo in tqdm(range(0, n, batch_size), disable=not progress, desc="nll (vlb)"):
            vals.append(vlb_bits_per_dim(model, x[lo:lo + batch_size], steps=vlb_steps, generator=g,
                                         **_rows(cond, lo, batch_size, n)))
        v = torch.cat(vals)
        report.update({"vlb_bpd": float(v.mean()), "vlb_bpd_sem": _sem(v),
                       "vlb_seconds_per_image": (time.perf_counter() - start) / n,
                       "vlb_steps": "all" if vlb_steps is None else vlb_steps})
        if pad:
            report["vlb_bits_per_unpadded_dim"] = report["vlb_bpd"] * D / inner
    return report

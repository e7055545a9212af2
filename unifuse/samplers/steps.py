"""One-step functions: a single sampler step from time s to a less noisy time t, as a function of the model.

Stochastic steps return their Gaussian transition (`GaussianStep`, with `log_prob`, for reward fine-tuning
and likelihood diagnostics): DDIM with eta and DDPM (Song et al. 2020; Ho et al. 2020; card 4), SDE-DPM-Solver++
(Lu et al. 2022b, card 8), Euler-Maruyama and the Langevin corrector (Song et al. 2021, card 5), and the reverse SDE
with the PF-ODE's marginals at any noise level (`step_flow_sde`: Flow-GRPO's sampler, Liu et al. 2025, on any path).
Deterministic steps return the new state: Euler and Heun on the PF-ODE in native time (Karras et al. 2022,
Algorithm 1), DDIM with eta = 0 (= DPM-Solver-1) and DPM-Solver++(2M) given the previous denoised estimate.

The deterministic steps and `step_ddim` take s and t as Python numbers (one time for the batch) or as [batch]
tensors (a time per sample, e.g. "one teacher step from s_i to t_i" for a distillation batch); the other
stochastic steps take one time for the batch. The coefficients come from the same float64 functions as the
`sample_*` loops, computed one time at a time; a step to the data end (sigma_t = 0) returns the denoised
estimate, as the loops' final step does.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import UnifuseError, choose
from ..parameterization.convert import compute_dtype
from .ancestral import VARIANCES, check_eta, ddim_coefficients, ddpm_coefficients, ddpm_std
from .base import Schedule, coefs_at, linear, schedule
from .multistep import dpmpp_weights, sde_dpmpp_weights
from .ode import native_coefficients
from .sde import em_coefficients, langevin_step_size

F64 = torch.float64


class GaussianStep(NamedTuple):
    """One stochastic step x_next ~ N(mean, std^2), std a float or a tensor broadcasting against mean."""

    mean: torch.Tensor
    std: object

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std * noise (noise standard normal, shaped like mean)."""
        if isinstance(self.std, float):
            return self.mean if self.std == 0.0 else self.mean.add(noise.to(self.mean.dtype), alpha=self.std)
        return self.mean + self.std * noise.to(self.mean.dtype)

    def log_prob(self, x_next: torch.Tensor) -> torch.Tensor:
        """log N(x_next; mean, std^2) summed over all but the batch dimension -> [batch]."""
        std = self.std
        if isinstance(std, float):
            if std == 0.0:
                raise UnifuseError("this step is deterministic (std = 0, e.g. the final step to the data); "
                                   "it has no density")
            std = torch.tensor(std, dtype=self.mean.dtype, device=self.mean.device)
        d = (x_next.to(self.mean.dtype) - self.mean) / std
        lp = -0.5 * d * d - torch.log(std) - 0.5 * math.log(2 * math.pi)
        lp = lp.expand_as(self.mean) if lp.shape != self.mean.shape else lp
        return lp.reshape(lp.shape[0], -1).sum(1)


# --- times per sample ------------------------------------------------------------------------------------
def _floats(v, batch: int, what: str):
    """A Python float (one time) or a list of `batch` floats (a time per sample)."""
    v = torch.as_tensor(v, dtype=F64)
    if v.ndim == 0:
        return float(v)
    if v.shape != (batch,):
        raise UnifuseError(f"{what} must be a number or have shape [batch] = [{batch}], got {tuple(v.shape)}")
    return v.tolist()


def _step_times(s, t, batch: int):
    """(s, t) as two floats, or as two lists of `batch` floats when either is given per sample."""
    s, t = _floats(s, batch, "s"), _floats(t, batch, "t")
    if isinstance(s, list) or isinstance(t, list):
        s = s if isinstance(s, list) else [s] * batch
        t = t if isinstance(t, list) else [t] * batch
    return s, t


def _per_sample(fn, *times):
    """fn(*floats) for one time, or the tuple of per-sample lists of fn's results for times given per sample
    (fn is called once per distinct tuple of times: a batch drawn from a grid shares its coefficients)."""
    if not isinstance(times[0], list):
        return fn(*times)
    seen = {}
    rows = [seen[ts] if ts in seen else seen.setdefault(ts, fn(*ts)) for ts in zip(*times)]
    return tuple(map(list, zip(*rows)))


def _column(v, like: torch.Tensor):
    """A float (kept) or a list of per-sample floats as a [batch, 1, ...] tensor in like's compute dtype."""
    if not isinstance(v, list):
        return v
    col = torch.tensor(v, dtype=F64).to(like.device, compute_dtype(like))
    return col.reshape((-1,) + (1,) * (like.ndim - 1))


def _affine(x: torch.Tensor, cx, terms) -> torch.Tensor:
    """cx x + sum_k c_k y_k with float coefficients (`linear`) or per-sample coefficient columns."""
    if not isinstance(cx, list) and not any(isinstance(c, list) for c, _ in terms):
        return linear(x, cx, terms)
    out = x * _column(cx, x)
    for c, y in terms:
        out = out + _column(c, x) * y
    return out


def _to_data(sigma_t, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x0_hat where sigma_t = 0 (the final step to the data end), the step's result elsewhere."""
    if not isinstance(sigma_t, list):
        return x0 if sigma_t == 0.0 else x
    return torch.where(_column([float(v == 0.0) for v in sigma_t], x) > 0, x0, x)


def _evaluate(model, x: torch.Tensor, s, cond):
    return model.evaluate(x, torch.tensor(s, dtype=F64), **(cond or {}))


def _native_coefficients(path, s: float, t: float) -> tuple:
    """The Euler and Heun weights of a native-time step from s to t (`sample_heun`'s), and sigma_t."""
    _, _, da_s, ds_s, _ = coefs_at(path, s)
    _, s_t, da_t, ds_t, _ = coefs_at(path, t)
    return (*native_coefficients(t - s, da_s, ds_s, da_t, ds_t), s_t)


# --- deterministic steps: the new state ----------------------------------------------------------------
def step_euler(model, x, s, t, *, cond=None) -> torch.Tensor:
    """One Euler step of the PF-ODE dx/dt = alpha' x0_hat + sigma' eps_hat from s to t (native time)."""
    s, t = _step_times(s, t, x.shape[0])
    c = _per_sample(lambda a, b: _native_coefficients(model.path, a, b), s, t)
    e = _evaluate(model, x, s, cond)
    return _to_data(c[6], e.x0, _affine(x.to(e.x0.dtype), 1.0, [(c[0], e.x0), (c[1], e.eps)]))


def step_heun(model, x, s, t, *, cond=None) -> torch.Tensor:
    """One Heun step (EDM Algorithm 1) from s to t: the Euler predictor, then the trapezoidal corrector."""
    s, t = _step_times(s, t, x.shape[0])
    c = _per_sample(lambda a, b: _native_coefficients(model.path, a, b), s, t)
    e = _evaluate(model, x, s, cond)
    if not isinstance(t, list) and c[6] == 0.0:
        return e.x0
    xs = x.to(e.x0.dtype)
    x_e = _affine(xs, 1.0, [(c[0], e.x0), (c[1], e.eps)])
    # a sample stepping to the data end is evaluated at s instead (its corrector is discarded)
    t_eval = [b if sg > 0.0 else a for a, b, sg in zip(s, t, c[6])] if isinstance(t, list) else t
    e2 = _evaluate(model, x_e.to(x.dtype), t_eval, cond)
    x_next = _affine(xs, 1.0, [(c[2], e.x0), (c[3], e.eps), (c[4], e2.x0), (c[5], e2.eps)])
    return _to_data(c[6], e.x0, x_next)


def step_dpmpp_2m(model, x, s, t, *, previous=None, variant: str = "midpoint", cond=None) -> torch.Tensor:
    """One DPM-Solver++(2M) step from s to t (card 8); previous = (t_prev, x0_hat at t_prev) gives the
    second-order step, None the first-order one (= DDIM with eta = 0)."""
    choose("DPM-Solver++ variant", variant, ("midpoint", "heun"))
    s, t = _step_times(s, t, x.shape[0])
    times, hist = [s, t], []
    if previous is not None:
        t_prev = _floats(previous[0], x.shape[0], "previous time")
        t_prev = [t_prev] * len(s) if isinstance(s, list) and not isinstance(t_prev, list) else t_prev
        times, hist = [t_prev, s, t], [previous[1]]

    def weights(*ts):
        sch = Schedule(list(ts), *map(list, zip(*(coefs_at(model.path, v) for v in ts))))
        if sch.ends_on_data:  # the step returns x0_hat (see `_to_data`)
            return (0.0, 1.0) + (0.0,) * (len(ts) - 2) + (0.0,)
        cx, w = dpmpp_weights(sch, len(ts) - 2, len(ts) - 1, variant)
        return (cx, *w, sch.sigma[-1])

    c = _per_sample(weights, *times)
    e = _evaluate(model, x, s, cond)
    hist = [e.x0] + [h.to(e.x0.dtype) for h in hist]
    return _to_data(c[-1], e.x0, _affine(x.to(e.x0.dtype), c[0], list(zip(c[1:-1], hist))))


# --- stochastic steps: the Gaussian transition ---------------------------------------------------------
def step_ddim(model, x, s, t, *, eta: float = 1.0, cond=None) -> GaussianStep:
    """One DDIM step from s to t as a Gaussian: mean and std (eta = 1: the DDPM posterior step; eta = 0:
    deterministic DDIM, std = 0, the mean is the step)."""
    eta = check_eta(eta)
    s, t = _step_times(s, t, x.shape[0])
    c_x, c_0, std = _per_sample(lambda a, b: ddim_coefficients(*_ends(model.path, a, b), eta), s, t)
    e = _evaluate(model, x, s, cond)
    xs = x.to(e.x0.dtype)
    return GaussianStep(xs * _column(c_x, xs) + e.x0 * _column(c_0, xs), _column(std, xs))


def _ends(path, s: float, t: float):
    """(alpha_s, sigma_s, lambda_s, alpha_t, sigma_t, lambda_t): the arguments of the DDIM/DDPM coefficients."""
    a_s, s_s, _, _, l_s = coefs_at(path, s)
    a_t, s_t, _, _, l_t = coefs_at(path, t)
    return a_s, s_s, l_s, a_t, s_t, l_t


def step_ddpm(model, x, s, t, *, variance: str = "small", cond=None) -> GaussianStep:
    """One DDPM ancestral step from s to t as a Gaussian (fixed small/large or learned variance)."""
    choose("DDPM variance", variance, VARIANCES)
    args = _ends(model.path, float(s), float(t))
    coef = ddpm_coefficients(*args)
    e = _evaluate(model, x, float(s), cond)
    xs = x.to(e.x0.dtype)
    std = 0.0 if args[4] == 0.0 else ddpm_std(coef, e.var_frac, variance, 1e-300)
    return GaussianStep(xs * coef[0] + e.x0 * coef[1], std)


def step_dpmpp_sde(model, x, s, t, *, previous=None, cond=None, variant: str = "midpoint") -> GaussianStep:
    """One SDE-DPM-Solver++ step from s to t as a Gaussian; previous = (t_prev, x0_hat_prev) gives 2M."""
    times = [previous[0], s, t] if previous is not None else [s, t]
    sch = schedule(model.path, times)
    e = _evaluate(model, x, float(s), cond)
    if sch.sigma[-1] == 0.0:
        return GaussianStep(e.x0, 0.0)
    cx, w, std = sde_dpmpp_weights(sch, len(times) - 2, 2 if previous is not None else 1, variant)
    hist = [e.x0] + ([previous[1].to(e.x0.dtype)] if previous is not None else [])
    return GaussianStep(linear(x.to(e.x0.dtype), cx, list(zip(w, hist))), std)


def step_euler_maruyama(model, x, s, t, *, cond=None) -> GaussianStep:
    """One Euler-Maruyama step of the reverse SDE from s to t as a Gaussian."""
    a_s, s_s, da_s, ds_s, l_s = coefs_at(model.path, s)
    a_t, s_t, _, _, l_t = coefs_at(model.path, t)
    e = _evaluate(model, x, float(s), cond)
    if s_t == 0.0:
        return GaussianStep(e.x0, 0.0)
    c_x, c_e, std = em_coefficients(a_s, s_s, da_s, ds_s, l_s, a_t, s_t, l_t, float(t) - float(s))
    xs = x.to(e.x0.dtype)
    mean = xs * c_e[0] + e.x0 * c_e[1] if c_x is None else xs * c_x + e.eps * c_e
    return GaussianStep(mean, std)


def flow_sde_coefficients(path, s: float, t: float, eta: float) -> tuple:
    """(c_x, c_0, c_eps, std) of the Flow-GRPO SDE step from s to t: x_t = c_x x_s + c_0 x0_hat + c_eps eps_hat + std z.

    h = s - t, u = alpha'(s) x0_hat + sigma'(s) eps_hat, g^2 = eta^2 g_mem^2 with
    g_mem^2 = d(sigma^2)/ds - 2 (alpha'/alpha) sigma^2:   c_x = 1, c_0 = -h alpha', c_eps = -h (sigma' + g^2 / (2 sigma_s)),
    std = g sqrt(h). The data end (sigma_t = 0): (0, 1, 0, 0). From alpha_s = 0 (zero SNR, g_mem infinite) with
    eta > 0: the exact DDIM step with eta' = min(eta, 1) (same marginals; eta' = 1 is the posterior step)."""
    a_s, s_s, da_s, ds_s, l_s = coefs_at(path, s)
    a_t, s_t, _, _, l_t = coefs_at(path, t)
    if s_t == 0.0:
        return 0.0, 1.0, 0.0, 0.0
    h = s - t
    if a_s == 0.0 and eta > 0.0:
        c_x, c_0, std = ddim_coefficients(a_s, s_s, l_s, a_t, s_t, l_t, min(eta, 1.0))
        return c_x, c_0, 0.0, std
    g2 = 0.0 if eta == 0.0 else eta * eta * max(2.0 * s_s * ds_s - 2.0 * (da_s / a_s) * s_s * s_s, 0.0)
    return 1.0, -h * da_s, -h * (ds_s + 0.5 * g2 / s_s), math.sqrt(g2 * h)


def step_flow_sde(model, x, s, t, *, eta: float = 1.0, cond=None) -> GaussianStep:
    """One step of the reverse SDE with the PF-ODE's marginals at noise level eta (Flow-GRPO, Liu et al. 2025,
    generalised to any path) from s to t < s, h = s - t, as a Gaussian:

        x_t = x_s - h [u - (g^2 / 2) score] + g sqrt(h) z,   u = alpha' x0_hat + sigma' eps_hat, score = -eps_hat / sigma_s,
        g^2 = eta^2 (d(sigma^2)/ds - 2 (alpha'/alpha) sigma^2)     (eta = 1: the forward SDE's, memoryless).

    On rf g = a sqrt(sigma / (1 - sigma)) with Flow-GRPO's a = eta sqrt(2) (their a = 0.7: eta ~ 0.495); eta = 0 is
    the Euler step. The step to the data end returns x0_hat (std 0); a step from zero SNR (alpha_s = 0, where g is
    infinite) is the exact DDIM step with eta clamped to 1. s, t: numbers or [batch] per-sample times."""
    eta = _check_sde_eta(eta)
    s, t = _step_times(s, t, x.shape[0])
    c = _per_sample(lambda a, b: flow_sde_coefficients(model.path, a, b, eta), s, t)
    e = _evaluate(model, x, s, cond)
    xs = x.to(e.x0.dtype)
    return GaussianStep(_affine(xs, c[0], [(c[1], e.x0), (c[2], e.eps)]), _column(c[3], xs))


def _check_sde_eta(eta) -> float:
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise UnifuseError(f"the SDE's eta must be a number >= 0, got {eta!r}") from None
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise UnifuseError(f"the SDE's eta must be finite and >= 0 (0 = the Euler ODE step, 1 = memoryless), got {eta}")
    return eta


def step_langevin(model, x, t, *, snr: float = 0.16, z=None, rule: str = "norms", cond=None) -> GaussianStep:
    """One Langevin corrector step at time t as a Gaussian (step size from the norms of z and the score)."""
    _, s_t, _, _, _ = coefs_at(model.path, t)
    e = _evaluate(model, x, float(t), cond)
    z = torch.randn_like(e.x0) if z is None else z
    step = langevin_step_size(e.x0, e, s_t, snr, z, rule)
    return GaussianStep(x.to(e.x0.dtype) - (step / s_t) * e.eps, torch.sqrt(2.0 * step))


__all__ = ["GaussianStep", "step_euler", "step_heun", "step_ddim", "step_dpmpp_2m", "step_ddpm", "step_dpmpp_sde",
           "step_euler_maruyama", "step_flow_sde", "step_langevin"]

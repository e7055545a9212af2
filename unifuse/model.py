"""A network bound to a path and a parameterization: `uf.DiffusionModel(net, path, prediction)`.

The model answers one question, "what are E[x0 | x_t] and E[noise | x_t]?", and every prediction kind
is read off that pair by `parameterization.convert`. `model.on(other_path)` re-expresses the model on
another path at equal log-SNR (NOTATION section 5): the pair is invariant, only time and scale change.
Transforms (`WrappedModel` subclasses such as guidance and thresholding, and `on()`) implement `evaluate` and
nothing else. One network evaluation is `network_input` (the part that depends on t alone) followed by
`evaluate_network`; sampler plans (`samplers.plan`) compute the first once per grid time.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .errors import UnifuseError, choose
from .parameterization.convert import CONVERTIBLE, Coefficients, coefficients, compute_dtype, from_pair
from .parameterization.kinds import PREDICTIONS, model_pair, preconditioned
from .parameterization.precond import input_scale
from .paths.base import Path, as_time, equal_log_snr


class Evaluation(NamedTuple):
    """One network evaluation: the canonical pair, and the learned-variance fraction when present."""

    x0: torch.Tensor
    eps: torch.Tensor
    var_frac: torch.Tensor | None = None


class NetworkInput(NamedTuple):
    """The part of one network evaluation that depends on t alone (a sampler plan computes it once per grid
    time: `samplers.plan`)."""

    t: torch.Tensor
    coef: Coefficients
    t_in: torch.Tensor
    x_scale: torch.Tensor | None
    checked: bool = False  # the conversion at this time was validated in advance


def batch_times(t, x: torch.Tensor) -> torch.Tensor:
    """t as a float64 tensor of shape [batch] on x's device."""
    t = as_time(t).to(device=x.device, dtype=torch.float64)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise UnifuseError(f"t must be a scalar or have shape [batch] = [{x.shape[0]}], got {tuple(t.shape)}")
    return t


class DiffusionModel(nn.Module):
    """`net(x, t, **cond)` predicting `prediction` on `path`.

    prediction: "eps", "x0", "v", "score", "velocity" (dx_t/dt), or a preconditioned form "edm",
        "trigflow" (network output F, input x_t / sqrt(sigma^2 + alpha^2 sigma_data^2)) or
        "consistency" (EDM scalings with the boundary condition x0 = x_t at sigma_edm = boundary).
    time_input: maps native t to what the network receives (default: native t, as the API says;
        the library's trained networks use `path.c_noise`).
    scale_input: feed x_t / sqrt(sigma^2 + alpha^2 sigma_data^2) to the network (always on for the
        preconditioned forms); keeps a network's input at unit scale on VE/EDM paths.
    learned_variance: the network returns 2C channels, [prediction, v] with v in [-1, 1] giving the
        Improved-DDPM interpolation between beta and beta_tilde (ALGORITHMS card 3).
    """

    def __init__(self, net: Callable, path: Path, prediction: str = "eps", *, sigma_data: float = 0.5,
                 time_input: Callable | None = None, scale_input: bool | None = None,
                 learned_variance: bool = False, boundary: float | None = None):
        super().__init__()
        if not callable(net):
            raise UnifuseError(f"net must be callable as net(x, t, **cond), got {type(net).__name__}")
        if not isinstance(path, Path):
            raise UnifuseError(f"path must be a unifuse path (e.g. uf.paths.get('vp-linear')), got {path!r}")
        self.net = net
        self.path = path
        self.prediction = choose("prediction", prediction, PREDICTIONS)
        self.sigma_data = float(sigma_data)
        self.time_input = time_input
        self.scale_input = preconditioned(self.prediction) if scale_input is None else bool(scale_input)
        self.learned_variance = bool(learned_variance)
        if boundary is None:
            boundary = float(path.sigma_edm(path.t_eps)) if path.t_eps > path.t_min else 0.0
        self.boundary = float(boundary)

    # --- the range of times the model may be evaluated at ----------------------------------
    @property
    def t_max(self) -> float:
        return float(self.path.t_max)

    @property
    def t_eps(self) -> float:
        return float(self.path.t_eps)

    # --- evaluation ------------------------------------------------------------------------
    def coefficients(self, t, x: torch.Tensor) -> Coefficients:
        return coefficients(self.path, t, x)

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        """Call the network once at (x_t, t) and return (x0_hat, eps_hat, var_frac)."""
        return evaluate_network(self, x, network_input(self, t, x), **cond)

    def pair(self, x: torch.Tensor, t, **cond):
        """(x0_hat, eps_hat) at (x_t, t)."""
        e = self.evaluate(x, t, **cond)
        return e.x0, e.eps

    def predict(self, x: torch.Tensor, t, kind: str = "x0", **cond) -> torch.Tensor:
        """Any prediction kind (eps, x0, v, score, velocity, edm, trigflow), converted exactly."""
        choose("prediction kind", kind, CONVERTIBLE)
        t = batch_times(t, x)
        x0, eps = self.pair(x, t, **cond)
        return from_pair(kind, x0, eps, x.to(x0.dtype), self.coefficients(t, x), self.sigma_data)

    def denoise(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """E[x0 | x_t]."""
        return self.pair(x, t, **cond)[0]

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.denoise(x, t, **cond)

    def on(self, path: Path) -> DiffusionModel:
        """The same model seen on `path`: time change and rescaling at equal log-SNR."""
        return ReexpressedModel(self, path)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, prediction={self.prediction!r}"


def rebind(model: DiffusionModel, net) -> DiffusionModel:
    """`net` bound exactly like `model` (path, prediction kind, input scaling, time input, boundary); a re-expressed
    model is rebuilt on its source's path and re-expressed the same way, so a copy of the student's network (a
    target, a round's teacher, a fake score) computes what the student computes with those weights."""
    if isinstance(model, ReexpressedModel):
        return rebind(model.source, net).on(model.path)
    return DiffusionModel(net, model.path, model.prediction, sigma_data=model.sigma_data, time_input=model.time_input,
                          scale_input=model.scale_input, learned_variance=model.learned_variance,
                          boundary=model.boundary)


class WrappedModel(DiffusionModel):
    """Base of the model -> model transforms (guidance, thresholding): the path, prediction kind and options of
    `inner`, whose `evaluate` a subclass changes."""

    what = "a model transform"

    def __init__(self, inner: DiffusionModel):
        nn.Module.__init__(self)
        if not isinstance(inner, DiffusionModel):
            raise UnifuseError(f"{self.what} wraps a uf.DiffusionModel, got {type(inner).__name__}")
        self.inner = inner
        self.path, self.prediction, self.sigma_data = inner.path, inner.prediction, inner.sigma_data
        self.learned_variance, self.boundary = inner.learned_variance, inner.boundary
        self.time_input, self.scale_input = None, False

    @property
    def net(self):
        return self.inner.net

    @property
    def t_max(self) -> float:
        return self.inner.t_max

    @property
    def t_eps(self) -> float:
        return self.inner.t_eps


class ReexpressedModel(DiffusionModel):
    """`source` evaluated on another path at equal log-SNR (NOTATION section 5):
    t_A = t_from_log_snr_A(log_snr_B(t_B)), x_A = x_B * |(alpha_A, sigma_A)| / |(alpha_B, sigma_B)|,
    and (x0_hat, eps_hat) are the same on both paths."""

    def __init__(self, source: DiffusionModel, path: Path):
        nn.Module.__init__(self)
        while isinstance(source, ReexpressedModel):  # map from the original path, once
            source = source.source
        if not isinstance(path, Path):
            raise UnifuseError(f"on() needs a unifuse path, got {path!r}")
        self.source, self.path = source, path
        self.prediction, self.sigma_data = source.prediction, source.sigma_data
        self.learned_variance = source.learned_variance
        self.time_input, self.scale_input, self.boundary = None, False, source.boundary

    @property
    def net(self):
        return self.source.net

    @property
    def t_max(self) -> float:
        lam = self.source.path.log_snr(torch.tensor(self.source.t_max, dtype=torch.float64))
        return min(float(self.path.t_max), float(self.path.t_from_log_snr(lam)))

    @property
    def t_eps(self) -> float:
        lam = self.source.path.log_snr(torch.tensor(self.source.t_eps, dtype=torch.float64))
        t = float(self.path.t_from_log_snr(lam))
        return max(float(self.path.t_eps), t if math.isfinite(t) else float(self.path.t_eps))

    def check_times(self, t: torch.Tensor) -> None:
        """Refuse times beyond the source's noise end (checked on CPU times only: no device sync)."""
        if t.device.type == "cpu" and bool((t > self.t_max + 1e-9).any()):
            raise UnifuseError(f"t = {float(t.max())} is beyond the noise end of the source model on this path "
                               f"(t_max = {self.t_max}); sample from model.t_max or below")

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        """The source's evaluation at the equal-log-SNR time, on the rescaled state."""
        t = batch_times(t, x)
        self.check_times(t)
        t_src, scale = equal_log_snr(self.path, self.source.path, t)
        return self.source.evaluate(x * scale.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), t_src, **cond)

    def extra_repr(self) -> str:
        return f"source={self.source.path!r} -> path={self.path!r}, prediction={self.prediction!r}"


# --- one network evaluation, split at what depends on t alone --------------------------------------------
def network_input(model: DiffusionModel, t, x: torch.Tensor) -> NetworkInput:
    """Everything a network evaluation of `model` at times t needs that does not depend on x's values."""
    t = batch_times(t, x)
    c = model.coefficients(t, x)
    x_scale = input_scale(c, model.sigma_data).to(x.dtype) if model.scale_input else None
    t_in = model.time_input(t) if model.time_input is not None else t
    t_in = t_in.to(x.dtype if x.dtype == torch.float64 else torch.float32)
    return NetworkInput(t, c, t_in, x_scale)


def evaluate_network(model: DiffusionModel, x: torch.Tensor, inp: NetworkInput, **cond) -> Evaluation:
    """Call `model.net` once at (x_t, t) with the time-only part `inp` done in advance; the pair it predicts."""
    out = model.net(x * inp.x_scale if inp.x_scale is not None else x, inp.t_in, **cond)
    if not isinstance(out, torch.Tensor):
        raise UnifuseError(f"the network must return a tensor, got {type(out).__name__}")
    var_frac = None
    if model.learned_variance:
        if out.ndim < 2 or out.shape[1] != 2 * x.shape[1]:
            raise UnifuseError(f"a learned-variance network must return 2C = {2 * x.shape[1]} channels, "
                               f"got shape {tuple(out.shape)}")
        out, v = out.chunk(2, dim=1)
        var_frac = (v.to(compute_dtype(x)) + 1) / 2
    if out.shape != x.shape:
        raise UnifuseError(f"the network returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                           "it must return a tensor shaped like x")
    cd = compute_dtype(x)
    xc = x if x.dtype == cd else x.to(cd)  # skip no-op casts: they cost as much as the arithmetic here
    out = out if out.dtype == cd else out.to(cd)
    x0, eps = model_pair(model.prediction, out, xc, inp.coef, model.sigma_data, model.boundary, check=not inp.checked)
    return Evaluation(x0, eps, var_frac)

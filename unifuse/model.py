"""A network bound to a path and a parameterization: `uf.DiffusionModel(net, path, prediction)`.

The model answers one question, "what are E[x0 | x_t] and E[noise | x_t]?", and every prediction kind
is read off that pair by `parameterization.convert`. `model.on(other_path)` re-expresses the model on
another path at equal log-SNR (NOTATION section 5): the pair is invariant, only time and scale change.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .errors import UnifuseError, choose
from .parameterization.convert import KINDS, PRECONDITIONED, Coefficients, coefficients, compute_dtype, from_pair, to_pair, validate
from .parameterization.precond import input_scale, x0_from_raw
from .paths.base import Path, as_time

PREDICTIONS = KINDS + PRECONDITIONED


class Evaluation(NamedTuple):
    """One network evaluation: the canonical pair, and the learned-variance fraction when present."""

    x0: torch.Tensor
    eps: torch.Tensor
    var_frac: Optional[torch.Tensor] = None


class Prepared(NamedTuple):
    """The part of one evaluation that depends on t only (see `DiffusionModel.prepare`)."""

    t: torch.Tensor
    coef: Coefficients
    t_in: torch.Tensor
    x_scale: Optional[torch.Tensor]
    checked: bool = False  # the conversion at this time was validated in advance


def _pure(fn) -> bool:
    """A time_input whose output depends on t alone as far as we can tell: none, or a function or method
    that is not a torch module's (a module's parameters may change between calls)."""
    return fn is None or (not isinstance(fn, nn.Module) and not isinstance(getattr(fn, "__self__", None), nn.Module))


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
                 time_input: Optional[Callable] = None, scale_input: Optional[bool] = None,
                 learned_variance: bool = False, boundary: Optional[float] = None):
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
        self.scale_input = prediction in PRECONDITIONED if scale_input is None else bool(scale_input)
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

    def prepare(self, t, x: torch.Tensor) -> "Prepared":
        """Everything `evaluate` needs that depends on t alone; samplers compute it once per grid time."""
        t = batch_times(t, x)
        c = self.coefficients(t, x)
        x_scale = input_scale(c, self.sigma_data).to(x.dtype) if self.scale_input else None
        t_in = self.time_input(t) if self.time_input is not None else t
        t_in = t_in.to(x.dtype if x.dtype == torch.float64 else torch.float32)
        return Prepared(t, c, t_in, x_scale)

    def prepare_grid(self, ts, x: torch.Tensor, coefficients=None) -> list:
        """`prepare` for each time of the 1-D grid `ts` at once (one vectorized schedule computation;
        `coefficients`, the path's (alpha, sigma, d_alpha, d_sigma) at ts if already known)."""
        ts = as_time(ts).to(torch.float64).flatten().cpu()
        n, B, ones = ts.numel(), x.shape[0], (1,) * (x.ndim - 1)
        coefficients = self.path.coefficients(ts) if coefficients is None else coefficients
        checked = self._grid_is_valid(Coefficients(*coefficients))
        coef = torch.stack(tuple(coefficients), 1).to(x.device, compute_dtype(x))  # [n, 4]
        coef = coef.reshape((n * 4, 1) + ones).expand((n * 4, B) + ones).unbind(0)     # 4n views [B, 1, ...]
        t_dev = ts.to(x.device)
        t_in = self.time_input(t_dev) if self.time_input is not None else t_dev
        t_in = t_in.to(x.dtype if x.dtype == torch.float64 else torch.float32)
        times, inputs = t_dev[:, None].expand(n, B).unbind(0), t_in[:, None].expand(n, B).unbind(0)
        out = []
        for k in range(n):
            c = Coefficients(*coef[4 * k:4 * k + 4])
            x_scale = input_scale(c, self.sigma_data).to(x.dtype) if self.scale_input else None
            out.append(Prepared(times[k], c, inputs[k], x_scale, checked[k]))
        return out

    def grid_key(self):
        """Everything `prepare_grid` reads besides the grid and x's batch, dtype and device: samplers keep its
        result under this key (None: not kept, e.g. a subclass's own prepare_grid or a time_input that is a
        module, whose parameters may change between calls)."""
        if type(self).prepare_grid is not DiffusionModel.prepare_grid or not _pure(self.time_input):
            return None
        return (self.path, self.prediction, self.time_input, self.scale_input, self.sigma_data)

    def _grid_is_valid(self, c: Coefficients) -> list:
        """Per grid time: is the conversion from this model's kind nonsingular there? (one vectorized check
        on the CPU grid, so sampling steps skip it; a time that fails keeps its per-call check and error)."""
        kind = self.prediction
        if kind in PRECONDITIONED:  # their path to the pair does no checked division
            return [False] * c.alpha.numel()

        def ok(part) -> bool:
            try:
                validate(kind, Coefficients(*(v[part] for v in c)))
                return True
            except UnifuseError:
                return False

        n = c.alpha.numel()
        if ok(slice(0, n - 1)):  # the usual case: only the data end (never evaluated) may be singular
            return [True] * (n - 1) + [ok(slice(n - 1, n))]
        return [ok(slice(k, k + 1)) for k in range(n)]

    def evaluate(self, x: torch.Tensor, t, **cond) -> Evaluation:
        """Call the network once at (x_t, t) and return (x0_hat, eps_hat, var_frac)."""
        return self.evaluate_prepared(x, self.prepare(t, x), **cond)

    def evaluate_prepared(self, x: torch.Tensor, prepared: "Prepared", **cond) -> Evaluation:
        """`evaluate` with the time-only work done in advance by `prepare(t, x)` (same x shape)."""
        c = prepared.coef
        x_in = x * prepared.x_scale if prepared.x_scale is not None else x
        out = self.net(x_in, prepared.t_in, **cond)
        if not isinstance(out, torch.Tensor):
            raise UnifuseError(f"the network must return a tensor, got {type(out).__name__}")
        var_frac = None
        if self.learned_variance:
            if out.ndim < 2 or out.shape[1] != 2 * x.shape[1]:
                raise UnifuseError(f"a learned-variance network must return 2C = {2 * x.shape[1]} channels, got shape {tuple(out.shape)}")
            out, v = out.chunk(2, dim=1)
            var_frac = (v.to(compute_dtype(x)) + 1) / 2
        if out.shape != x.shape:
            raise UnifuseError(f"the network returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                               "it must return a tensor shaped like x")
        cd = compute_dtype(x)
        xc = x if x.dtype == cd else x.to(cd)  # skip no-op casts: they cost as much as the arithmetic here
        out = out if out.dtype == cd else out.to(cd)
        if self.prediction in PRECONDITIONED:
            x0 = x0_from_raw(self.prediction, out, xc, c, self.sigma_data, self.boundary)
            # eps is undefined at sigma = 0 (x_t is the data there); report 0 without a host sync.
            pos = c.sigma > 0
            eps = torch.where(pos, (xc - c.alpha * x0) / torch.where(pos, c.sigma, torch.ones_like(c.sigma)), torch.zeros_like(x0))
            return Evaluation(x0, eps, var_frac)
        x0, eps = to_pair(self.prediction, out, xc, c, self.sigma_data, check=not prepared.checked)
        return Evaluation(x0, eps, var_frac)

    def pair(self, x: torch.Tensor, t, **cond):
        """(x0_hat, eps_hat) at (x_t, t)."""
        e = self.evaluate(x, t, **cond)
        return e.x0, e.eps

    def predict(self, x: torch.Tensor, t, kind: str = "x0", **cond) -> torch.Tensor:
        """Any prediction kind (eps, x0, v, score, velocity, edm, trigflow), converted exactly."""
        choose("prediction kind", kind, KINDS + ("edm", "trigflow"))
        t = batch_times(t, x)
        x0, eps = self.pair(x, t, **cond)
        return from_pair(kind, x0, eps, x.to(x0.dtype), self.coefficients(t, x), self.sigma_data)

    def denoise(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """E[x0 | x_t]."""
        return self.pair(x, t, **cond)[0]

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.denoise(x, t, **cond)

    def on(self, path: Path) -> "DiffusionModel":
        """The same model seen on `path`: time change and rescaling at equal log-SNR."""
        return ReexpressedModel(self, path)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, prediction={self.prediction!r}"


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
        self.prediction, self.sigma_data, self.learned_variance = source.prediction, source.sigma_data, source.learned_variance
        self.time_input, self.scale_input, self.boundary = None, False, source.boundary

    @property
    def net(self):
        return self.source.net

    def source_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.source.path.t_from_log_snr(self.path.log_snr(t))

    @property
    def t_max(self) -> float:
        lam = self.source.path.log_snr(torch.tensor(self.source.t_max, dtype=torch.float64))
        return min(float(self.path.t_max), float(self.path.t_from_log_snr(lam)))

    @property
    def t_eps(self) -> float:
        lam = self.source.path.log_snr(torch.tensor(self.source.t_eps, dtype=torch.float64))
        t = float(self.path.t_from_log_snr(lam))
        return max(float(self.path.t_eps), t if math.isfinite(t) else float(self.path.t_eps))

    def prepare(self, t, x: torch.Tensor):
        """(x scale, source time, the source's own prepared evaluation or None)."""
        t = batch_times(t, x)
        if t.device.type == "cpu" and bool((t > self.t_max + 1e-9).any()):
            raise UnifuseError(f"t = {float(t.max())} is beyond the noise end of the source model on this path "
                               f"(t_max = {self.t_max}); sample from model.t_max or below")
        t_src = self.source_time(t)
        a, s = self.path.alpha(t), self.path.sigma(t)
        a_src, s_src = self.source.path.alpha(t_src), self.source.path.sigma(t_src)
        scale = torch.sqrt((a_src**2 + s_src**2) / (a**2 + s**2))
        scale = scale.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        # a source with its own evaluate (e.g. a guided model) is called through it
        fast = type(self.source).evaluate is DiffusionModel.evaluate
        return scale, t_src, (self.source.prepare(t_src, x) if fast else None)

    def prepare_grid(self, ts, x: torch.Tensor, coefficients=None) -> list:
        ts = as_time(ts).to(torch.float64).flatten().cpu()
        if bool((ts > self.t_max + 1e-9).any()):
            raise UnifuseError(f"t = {float(ts.max())} is beyond the noise end of the source model on this path "
                               f"(t_max = {self.t_max}); sample from model.t_max or below")
        t_src = self.source_time(ts)
        a, s = (self.path.alpha(ts), self.path.sigma(ts)) if coefficients is None else coefficients[:2]
        a_src, s_src = self.source.path.alpha(t_src), self.source.path.sigma(t_src)
        scale = torch.sqrt((a_src**2 + s_src**2) / (a**2 + s**2)).to(x.device, x.dtype)
        fast = type(self.source).evaluate is DiffusionModel.evaluate
        src = self.source.prepare_grid(t_src, x) if fast else [None] * ts.numel()
        return [(scale[k], t_src[k], src[k]) for k in range(ts.numel())]

    def grid_key(self):
        """Both paths and the source's own key (its prepared evaluations are part of ours)."""
        if type(self).prepare_grid is not ReexpressedModel.prepare_grid:
            return None
        if type(self.source).evaluate is not DiffusionModel.evaluate:  # the source is called through its evaluate
            return (self.path, self.source, self.source.path, None)
        key = self.source.grid_key()
        return None if key is None else (self.path, self.source, self.source.path, key)

    def evaluate_prepared(self, x: torch.Tensor, prepared, **cond) -> Evaluation:
        scale, t_src, src = prepared
        if src is None:
            return self.source.evaluate(x * scale, t_src, **cond)
        return self.source.evaluate_prepared(x * scale, src, **cond)

    def extra_repr(self) -> str:
        return f"source={self.source.path!r} -> path={self.path!r}, prediction={self.prediction!r}"

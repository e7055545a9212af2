"""Forward-mode tangents (Jacobian-vector products) for stop-gradient targets: continuous-time consistency (sCM,
ALGORITHMS card 18) and any method that needs d/dt of a network along a direction.

For f: (p_1, ..., p_n) -> y and a direction v = (v_1, ..., v_n),

    jvp(f, p, v) = (f(p), J_f(p) v),   J_f(p) v = d/de f(p + e v) |_{e=0}

computed without an autograd graph (both results are detached: callers use them as targets). Two methods:

    autodiff  torch.func.jvp: one forward pass carrying dual numbers, exact up to rounding
    fd        central difference (f(p + s v) - f(p - s v)) / 2s, error O(s^2) (the third derivative along v);
              the perturbed inputs p +- s v are formed in float64 and handed to f in each primal's own dtype,
              so a float64 function is exact to ~1e-10 and a float32 network (rounding ~1e-7) keeps ~1e-4;
              s = h * max(1, rms(p)) / rms(v) (h relative to the sizes of primals and tangents), with
              h = `default_h` of f's output dtype: 6e-6 for float64, 1e-4 for float32.
              f(p), f(p + s v) and f(p - s v) run under one random state (torch.random.fork_rng), so dropout
              draws the same masks in all three; the random state then advances as after one call of f.
              Cost on CPU (torch 2.13, a small MLP): autodiff ~8-10 forwards (per-op overhead of the forward-mode
              formulas), fd 3 forwards; jvp="fd" is the faster choice for CPU runs of small networks.
    step      (with fd / auto) an absolute step s along the tangents: the secant (f(p + s v) - f(p - s v)) / 2s,
              the derivative averaged over [-s, s], for targets that must not see a network's high-frequency
              errors (sCM's tangent in log sigma: objectives.scm)
    auto      autodiff; on its first failure (an op without a forward-mode formula raises NotImplementedError
              or RuntimeError) warn once and use fd for the rest of the process (`reset_fallback` forgets).

Data-parallel rule. A forward pass through a DistributedDataParallel module under torch.func.jvp (or no_grad)
does not register the gradient hooks of that pass, and the jvp of a wrapped module skips gradient
synchronisation. Callers therefore: (1) compute the tangent (no gradient) on `unwrap(module)`, the bare network
(DDP's `.module`, torch.compile's `._orig_mod`); (2) run the gradient-carrying forward through the wrapper, so
DDP all-reduces the gradients of the loss as usual. The tangent is a constant of the loss, so each rank's
gradient is that of its own per-sample losses and DDP's mean is the gradient of the global mean loss.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import UnifuseError, choose

METHODS = ("auto", "autodiff", "fd")
_FALLBACK: dict = {"reason": None}  # set once "auto" fell back to finite differences


def unwrap(module):
    """The bare network inside DistributedDataParallel / DataParallel / torch.compile wrappers (nested too)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(module, wrappers):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def reset_fallback() -> None:
    """Forget that "auto" fell back to finite differences (the next "auto" call tries autodiff again)."""
    _FALLBACK["reason"] = None


def default_h(dtype: torch.dtype) -> float:
    """The relative finite-difference step: eps^(1/3) in float64 (6e-6), 0.3 sqrt(eps) in float32 (1e-4). eps^(1/3)
    balances truncation O(h^2 f3) against rounding eps / h when the third derivative f3 ~ f; a trained network's f3
    is not small, and in float32 that step is far too large: on the digits teacher seen on TrigFlow the float32
    tangent with eps^(1/3) = 4.9e-3 was off by 60-100%, with 1e-4 by 0.1-2% (against float64 forward-mode AD)."""
    eps = float(torch.finfo(dtype).eps)
    return eps ** (1.0 / 3.0) if dtype == torch.float64 else 0.3 * eps**0.5


def jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], *,
        method: str = "auto", h: float | None = None, step: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), directional derivative of fn at primals along tangents), both detached.

    primals: floating tensors (pass integer inputs such as class labels through a closure); tangents: one per
    primal, broadcastable to it. method "auto" | "autodiff" | "fd"; h: the relative finite-difference step.
    step: an absolute step s > 0 along the tangents (with method "fd" or "auto"): the secant
    (fn(p + s v) - fn(p - s v)) / 2s, the derivative of fn averaged over the window [-s, s] (`secant`).
    """
    choose("jvp method", method, METHODS)
    primals, tangents = _check(primals, tangents)
    if step is not None:
        if method == "autodiff" or not (step > 0 and math.isfinite(step)):
            raise UnifuseError(f"an absolute step needs method 'fd' or 'auto' and a finite step > 0, got "
                               f"method={method!r}, step={step!r}")
        return _fd(fn, primals, tangents, None, absolute=float(step))
    if method == "fd" or (method == "auto" and _FALLBACK["reason"] is not None):
        return _fd(fn, primals, tangents, h)
    try:
        return _autodiff(fn, primals, tangents)
    except (NotImplementedError, RuntimeError) as err:
        if method == "autodiff":
            raise UnifuseError(f"forward-mode autodiff failed in this network: {err}. Use finite differences: "
                               "set distill.options.jvp=fd (or jvp='auto' to fall back automatically)") from err
        _FALLBACK["reason"] = str(err)
        warnings.warn(f"forward-mode autodiff failed ({str(err)[:200]}); using central finite differences for "
                      "the rest of this run (set distill.options.jvp=fd to skip this attempt)", stacklevel=2)
        return _fd(fn, primals, tangents, h)


def _check(primals, tangents) -> tuple[tuple, tuple]:
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise UnifuseError(f"jvp needs one tangent per primal, got {len(primals)} primals and {len(tangents)} "
                           "tangents")
    for p in primals:
        if not (isinstance(p, torch.Tensor) and p.is_floating_point()):
            raise UnifuseError("jvp primals must be floating tensors; pass other inputs through a closure")
    tangents = tuple(torch.as_tensor(v, device=p.device).to(p.dtype).expand_as(p)
                     for p, v in zip(primals, tangents))
    return tuple(p.detach() for p in primals), tuple(v.detach() for v in tangents)


def _autodiff(fn, primals, tangents):
    with torch.no_grad():
        out, tan = torch.func.jvp(fn, primals, tangents)
    return out.detach(), tan.detach()


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().to(torch.float64).pow(2).mean().sqrt()) if x.numel() else 0.0


def _devices(primals) -> list:
    return sorted({p.device.index or 0 for p in primals if p.device.type == "cuda"})


def _fd(fn, primals, tangents, h, absolute: float | None = None):
    """Central difference along the tangents, the three calls of fn under one random state (step: relative h, or
    `absolute`)."""
    devices = _devices(primals)
    v_scale = max(_rms(v) for v in tangents)
    with torch.no_grad():
        with torch.random.fork_rng(devices=devices):
            out = fn(*primals).detach()
        if v_scale == 0.0 or not math.isfinite(v_scale):
            fill = 0.0 if v_scale == 0.0 else math.nan
            return out, torch.full_like(out, fill)
        if absolute is not None:
            step = absolute
        else:
            step = h if h is not None else default_h(out.dtype)
            step = step * max(1.0, max(_rms(p) for p in primals)) / v_scale
        with torch.random.fork_rng(devices=devices):
            plus = _shifted(fn, primals, tangents, step)
        minus = _shifted(fn, primals, tangents, -step)  # outside a fork: the state advances as after one call
        tan = (plus.to(torch.float64) - minus.to(torch.float64)) / (2.0 * step)
    return out, tan.to(out.dtype)


def _shifted(fn, primals, tangents, step: float) -> torch.Tensor:
    """fn(p + step v), p + step v formed in float64 and cast to each primal's own dtype."""
    shifted = tuple((p.to(torch.float64) + step * v.to(torch.float64)).to(p.dtype)
                    for p, v in zip(primals, tangents))
    return fn(*shifted)


__all__ = ["METHODS", "default_h", "jvp", "reset_fallback", "unwrap"]

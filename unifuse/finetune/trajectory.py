"""Rollouts: the policy's own stochastic sampler, step by step, with what reward fine-tuning needs of each step.

    grid = rollout_grid(model, 20, "ddim")                    # the sampler's grid, noise end -> data end
    r = rollout(model, noise, grid, cond=cond, generator=gens, eta=1.0)
    r.x0          final samples [B, ...]                       r.states  x at every grid time (states[0]: x_T)
    r.log_probs   [S, B] log p(x_{i+1} | x_i) of the S stochastic steps (summed over dimensions)
    r.kl          [S, B] KL(policy step || reference step) per step (when `reference` is given), in nats

Each step is a `GaussianStep` (`samplers.steps`): DDIM with eta (eta = 1: DDPM's posterior step, card 4) or the
Flow-GRPO SDE ("sde", `step_flow_sde`: the reverse SDE with the ODE's marginals at noise level eta, any path).
The last step to the data end is deterministic (the denoised estimate) and carries no log-probability.

Gradients: grad_last=0 samples under no_grad; grad_last=K keeps the graph through the last K steps only (DRaFT-K;
identical parameter gradients to AlignProp's detached model outputs before step N - K); grad_last=None through
every step (full backpropagation), optionally with activation checkpointing per step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import UnifuseError, choose
from ..parameterization.kinds import defined_at_zero_snr
from ..samplers import NoiseSource
from ..samplers.steps import GaussianStep, step_ddim
from .base import step_kl

F64 = torch.float64
ROLLOUT_SAMPLERS = ("ddim", "sde")


class Rollout(NamedTuple):
    x0: torch.Tensor
    states: list
    log_probs: torch.Tensor   # [S, B]
    kl: torch.Tensor | None   # [S, B] or None
    times: torch.Tensor       # the grid, float64 [steps + 1]


def rollout_grid(model, steps: int, sampler: str = "ddim", spacing: str | None = None) -> torch.Tensor:
    """steps + 1 float64 times from the model's noise end to the data end: DDIM's own grid (its default spacing:
    Karras), as `uf.sample(model, noise, "ddim", nfe=steps)` would use; for the SDE on a path that reaches zero SNR
    (rf, TrigFlow) uniform in native time."""
    from ..samplers import get as sampler_spec
    from ..sampling import noise_end_grid

    choose("rollout sampler", sampler, ROLLOUT_SAMPLERS)
    if not isinstance(steps, int) or steps < 2:
        raise UnifuseError(f"a rollout needs at least 2 sampler steps, got {steps!r}; e.g. finetune.steps=20")
    t_max = float(getattr(model, "t_max", model.path.t_max))
    zero_snr = float(model.path.alpha(torch.tensor([t_max], dtype=F64))[0]) == 0.0
    # the SDE is inaccurate on Karras' crowded steps near a zero-SNR end (rf, TrigFlow): uniform there, like flow_grpo
    spacing = spacing or ("uniform" if sampler == "sde" and zero_snr else sampler_spec("ddim").spacing)
    kw = dict(rho=7.0, shift=3.0, sigma_min=None, sigma_max=None, t_max=t_max)
    return noise_end_grid(model.path, steps, spacing, kw, defined_at_zero_snr(getattr(model, "prediction", None)))


def transition(model, x, s, t, *, cond=None, sampler: str = "ddim", eta: float = 1.0) -> GaussianStep:
    """The Gaussian step of the rollout sampler from time s to t (s, t floats or [B] per-sample times)."""
    if sampler == "ddim":
        return step_ddim(model, x, s, t, eta=eta, cond=cond)
    from ..samplers.steps import step_flow_sde

    return step_flow_sde(model, x, s, t, eta=eta, cond=cond)


def rollout(model, noise: torch.Tensor, times: torch.Tensor, *, cond=None, generator=None, sampler: str = "ddim",
            eta: float = 1.0, reference=None, grad_last: int | None = 0, checkpoint: bool = False) -> Rollout:
    """Sample from `model` along `times` with the stochastic steps of `sampler`, recording every state, the
    log-probability of each stochastic step and (with `reference`) its KL to the reference model's step.
    generator: as for `uf.sample` (a list of per-sample generators makes sample i depend on its seed only)."""
    choose("rollout sampler", sampler, ROLLOUT_SAMPLERS)
    ts = times.tolist()
    n = len(ts) - 1
    first_grad = 0 if grad_last is None else n - min(int(grad_last), n)
    source = NoiseSource(generator, noise.shape[0])
    x = noise * float(model.path.sigma(times[:1])[0])
    states, log_probs, kls = [x], [], []
    for i in range(n):
        s, t = ts[i], ts[i + 1]
        with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
            if i < first_grad:
                x = x.detach()
            step = _step(model, x, s, t, cond, sampler, eta, checkpoint and i >= first_grad)
            if isinstance(step.std, float) and step.std == 0.0:  # the deterministic last step
                x = step.mean
            else:
                x_next = step.sample(source(step.mean))
                log_probs.append(step.log_prob(x_next.detach()).detach())
                if reference is not None:  # its weights are frozen; the graph through x carries -d mu_ref/dx dx/dtheta
                    ref = transition(reference, x, s, t, cond=cond, sampler=sampler, eta=eta)
                    kls.append(step_kl(step, ref))
                x = x_next
        states.append(x)
    lp = torch.stack(log_probs) if log_probs else noise.new_zeros(0, noise.shape[0])
    kl = torch.stack(kls) if reference is not None and kls else None
    return Rollout(x, states, lp, kl, times)


def _step(model, x, s, t, cond, sampler, eta, use_checkpoint) -> GaussianStep:
    if not use_checkpoint:
        return transition(model, x, s, t, cond=cond, sampler=sampler, eta=eta)
    fn = lambda y: tuple(transition(model, y, s, t, cond=cond, sampler=sampler, eta=eta))
    mean, std = _checkpoint(fn, x, use_reentrant=False)
    return GaussianStep(mean, std)


def log_probs(model, states: list, times: torch.Tensor, *, cond=None, sampler: str = "ddim", eta: float = 1.0,
              indices=None) -> torch.Tensor:
    """[len(indices), B] log p_model(states[i+1] | states[i]) of the stochastic steps `indices` (default all),
    recomputed with gradients: the policy-gradient methods' new log-probabilities on stored trajectories."""
    ts = times.tolist()
    idx = range(len(ts) - 2) if indices is None else indices
    out = [transition(model, states[i], ts[i], ts[i + 1], cond=cond, sampler=sampler, eta=eta).log_prob(states[i + 1])
           for i in idx]
    return torch.stack(out)


__all__ = ["ROLLOUT_SAMPLERS", "Rollout", "log_probs", "rollout", "rollout_grid", "transition"]

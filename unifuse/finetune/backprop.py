"""Reward backpropagation through the sampler (ALGORITHMS cards 21.3-21.4): DRaFT-K and DRaFT-LV (Clark et al. 2023),
ReFL (Xu et al. 2023, ImageReward) and AlignProp (Prabhudesai et al. 2023).

Each round rolls out the policy with the library's own stochastic steps (`trajectory.rollout`, DDIM with ctx.eta;
eta = 1 is DDPM's posterior step) with reparameterized noise, x_{i+1} = mu_theta(x_i) + std_i z_i, so the gradient
of the differentiable reward flows through the step means, and minimises

    loss = -mean_b r(x0_b) + kl * mean_b sum_i KL_i,    KL_i = ||mu_theta - mu_ref||^2 / (2 std_i^2)   (nats)

The KL term is the KL between the policy's and the reference's path measures; under a memoryless schedule (eta = 1
from near-zero SNR) its minimiser is p_base(x0) exp(r(x0) / kl) / Z (Adjoint Matching, Domingo-Enrich et al. 2024).
Truncation (`grad_last=K`) keeps the graph through the last K steps only: the same parameter gradients as
detaching the model outputs of the earlier steps (AlignProp's `noise_pred.detach()`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnifuseError
from .base import Context, step_kl
from .rewards import require_differentiable
from .trajectory import rollout, transition


def _check_count(value, what: str, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UnifuseError(f"{what} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def _check_weight(value, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise UnifuseError(f"{what} must be a finite number >= 0, got {value!r}")


@dataclass
class _Backprop:
    """What DRaFT, DRaFT-LV and AlignProp share: a rollout with gradients through its last steps, then
    loss = -mean r(x0) + kl * mean sum_i KL_i.

    kl          weight of the summed per-step KL to the reference, in nats per unit reward (0: no regulariser)
    checkpoint  activation checkpointing per step with gradients (memory for recomputation)
    """

    kl: float = 0.0
    checkpoint: bool = False

    differentiable = True
    name = ""

    def setup(self, ctx: Context) -> None:
        require_differentiable(ctx.reward, self.name)
        _check_weight(self.kl, f"{self.name}.kl")

    def _rollout(self, ctx: Context, generator, grad_last):
        """One batch of policy rollouts with the graph through the last grad_last steps (None: all)."""
        noise, gens = ctx.draw(ctx.batch)
        cond = ctx.condition(ctx.batch, generator)
        r = rollout(ctx.policy, noise, ctx.grid(), cond=cond or None, generator=gens, sampler=ctx.sampler,
                    eta=ctx.eta, reference=ctx.reference if self.kl > 0 else None, grad_last=grad_last,
                    checkpoint=self.checkpoint)
        return r, cond

    def _round(self, ctx: Context, generator, grad_last, extra=None) -> dict:
        """Roll out, score, update. extra(r, cond) -> rewards [M] of additional graded copies (DRaFT-LV)."""
        r, cond = self._rollout(ctx, generator, grad_last)
        rewards = ctx.reward(r.x0, cond)
        graded = rewards if extra is None else torch.cat([rewards, extra(r, cond)])
        kl = r.kl.sum(0) if r.kl is not None else torch.zeros_like(rewards)
        loss = -graded.mean() + self.kl * kl.mean()
        norm = ctx.update(loss)
        n = len(ctx.grid()) - 1
        return {"loss": float(loss.detach()), "reward": float(rewards.detach().mean()),
                "kl": float(kl.detach().mean()), "k": n if grad_last is None else min(int(grad_last), n),
                "grad_norm": norm}


@dataclass
class DRaFT(_Backprop):
    """DRaFT-K: backpropagate -r(x0) through the last k sampler steps only (k = 1 works well; None: every step,
    i.e. full backpropagation)."""

    k: int | None = 1

    name = "draft"

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        _check_count(self.k, "draft.k", allow_none=True)

    def step(self, ctx: Context, generator, step: int) -> dict:
        return self._round(ctx, generator, self.k)


@dataclass
class DRaFTLV(_Backprop):
    """DRaFT-LV: DRaFT-1 plus n_extra re-noised copies of the last step. With t_1 the last grid time before the
    data end and x0 the sample, each copy is x_1' = alpha(t_1) x0 + sigma(t_1) eps' (fresh eps', x0 detached: the
    path's interpolate, i.e. a draw of q(x_1 | x0)), denoised by the sampler's own last step with gradients; the
    loss averages the reward over the original and the n_extra copies (Clark et al. 2023, Alg. 3)."""

    n_extra: int = 2

    name = "draft-lv"

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        _check_count(self.n_extra, "draft-lv.n_extra", minimum=0)

    def step(self, ctx: Context, generator, step: int) -> dict:
        return self._round(ctx, generator, 1, extra=lambda r, cond: self._renoised(ctx, r, cond, generator))

    def _renoised(self, ctx: Context, r, cond: dict, generator) -> torch.Tensor:
        """Rewards [n_extra * B] of the re-noised, re-denoised copies of r.x0."""
        ts = r.times.tolist()
        x0 = r.x0.detach()
        t1 = torch.full((x0.shape[0],), ts[-2], dtype=torch.float64, device=x0.device)
        out = []
        for _ in range(self.n_extra):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            x1 = ctx.policy.path.interpolate(x0, eps, t1)
            last = transition(ctx.policy, x1, ts[-2], ts[-1], cond=cond or None, sampler=ctx.sampler, eta=ctx.eta)
            out.append(ctx.reward(last.mean, cond))
        return torch.cat(out) if out else r.x0.new_zeros(0)


@dataclass
class AlignProp(_Backprop):
    """AlignProp: backpropagation through the whole chain with randomized truncation and checkpointing. Each round
    draws K ~ round(N(mean_k * steps, std_k * steps)) clipped into [1, steps - 1] (the paper's 42 and 5 of 50 steps);
    the model outputs of steps i < K are detached, so the gradient flows through the last steps - K steps
    (`grad_last = steps - K`, the same parameter gradients). truncate=False: full backpropagation."""

    mean_k: float = 42 / 50
    std_k: float = 5 / 50
    truncate: bool = True
    checkpoint: bool = True

    name = "alignprop"

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        _check_weight(self.std_k, "alignprop.std_k")
        if not isinstance(self.mean_k, (int, float)) or not 0.0 <= self.mean_k <= 1.0:
            raise UnifuseError(f"alignprop.mean_k is a fraction of the steps in [0, 1], got {self.mean_k!r}")

    def truncation(self, steps: int, generator) -> int | None:
        """grad_last = steps - K for K ~ round(N(mean_k steps, std_k steps)) in [1, steps - 1]; None: no truncation."""
        if not self.truncate:
            return None
        z = float(torch.randn((), generator=generator, dtype=torch.float64))
        k = min(max(round(steps * (self.mean_k + self.std_k * z)), 1), steps - 1)
        return steps - k

    def step(self, ctx: Context, generator, step: int) -> dict:
        return self._round(ctx, generator, self.truncation(len(ctx.grid()) - 1, generator))


@dataclass
class ReFL:
    """ReFL: the steps before a random late step `mid` without gradients, then ONE model evaluation with gradients
    at times[mid]; its denoised estimate x0_hat = E_theta[x0 | x_mid] is the graded image.

        mid ~ U{steps - late, ..., steps - 1}         (late default: the last quarter of the grid, >= 1 step)
        loss = grad_scale * mean(relu(margin - r(x0_hat)))   if margin is not None (ImageReward: margin 2, 1e-3)
             = grad_scale * mean(-r(x0_hat))                  if margin is None (default)
             + pretrain * mean(objective(policy, x, cond))    on a data batch, when pretrain > 0 and ctx.data is set
             + kl * mean KL(policy step || reference step) at mid (when that step is stochastic)

    The paper alternates the reward loss with the pre-training loss; here they are added in one update (pretrain:
    the weight; class labels are the only conditions read from the data set)."""

    late: int | None = None
    margin: float | None = None
    grad_scale: float = 1.0
    pretrain: float = 0.0
    kl: float = 0.0

    differentiable = True
    name = "refl"

    def setup(self, ctx: Context) -> None:
        require_differentiable(ctx.reward, self.name)
        _check_count(self.late, "refl.late", allow_none=True)
        for what in ("grad_scale", "pretrain", "kl"):
            _check_weight(getattr(self, what), f"refl.{what}")

    def graded(self, ctx: Context, generator) -> tuple:
        """(x0_hat with the graph of one evaluation, cond, grid, mid, x_mid)."""
        ts = ctx.grid()
        n = len(ts) - 1
        late = min(self.late or max(1, n // 4), n)
        mid = n - late + int(torch.randint(late, (), generator=generator))
        noise, gens = ctx.draw(ctx.batch)
        cond = ctx.condition(ctx.batch, generator)
        with torch.no_grad():   # steps 0 .. mid - 1: no graph
            x_mid = rollout(ctx.policy, noise, ts[: mid + 1], cond=cond or None, generator=gens, sampler=ctx.sampler,
                            eta=ctx.eta).x0
        return ctx.policy.denoise(x_mid, float(ts[mid]), **(cond or {})), cond, ts, mid, x_mid

    def step(self, ctx: Context, generator, step: int) -> dict:
        x0_hat, cond, ts, mid, x_mid = self.graded(ctx, generator)
        rewards = ctx.reward(x0_hat, cond)
        gap = -rewards if self.margin is None else torch.relu(self.margin - rewards)
        loss = self.grad_scale * gap.mean()
        out = {"reward": float(rewards.detach().mean()), "k": 1}
        if self.kl > 0 and ts[mid + 1] != ts[-1]:
            kl = self._step_kl(ctx, x_mid, float(ts[mid]), float(ts[mid + 1]), cond)
            loss = loss + self.kl * kl.mean()
            out["kl"] = float(kl.detach().mean())
        if self.pretrain > 0 and ctx.data is not None and ctx.objective is not None:
            x, dcond = self._data_batch(ctx, generator)
            pre = ctx.objective(ctx.policy, x, dcond).mean()
            loss = loss + self.pretrain * pre
            out["pretrain"] = float(pre.detach())
        out["grad_norm"] = ctx.update(loss)
        out["loss"] = float(loss.detach())
        return out

    def _step_kl(self, ctx: Context, x, s: float, t: float, cond: dict) -> torch.Tensor:
        """KL in nats of the policy's step s -> t to the reference's from the same x_mid (graph on the policy's)."""
        mine = transition(ctx.policy, x, s, t, cond=cond or None, sampler=ctx.sampler, eta=ctx.eta)
        with torch.no_grad():
            ref = transition(ctx.reference, x, s, t, cond=cond or None, sampler=ctx.sampler, eta=ctx.eta)
        return step_kl(mine, ref)

    @staticmethod
    def _data_batch(ctx: Context, generator) -> tuple:
        data = ctx.data
        idx = torch.randint(len(data), (ctx.batch,), generator=generator)
        x = data.images[idx].to(ctx.device)
        labels = getattr(data, "labels", None)
        cond = {"class_labels": labels[idx].to(ctx.device)} if ctx.conditioning == "class" and labels is not None \
            else {}
        return x, cond


__all__ = ["AlignProp", "DRaFT", "DRaFTLV", "ReFL"]

"""Policy-gradient fine-tuning on the sampler's own stochastic steps (ALGORITHMS cards 21.1-21.2): DDPO (Black et al.
2023), DPOK (Fan et al. 2023) and GRPO on the Flow-GRPO SDE (Liu et al. 2025).

The MDP: state (c, t_i, x_i), action x_{i+1} ~ p_theta(x_{i+1} | x_i, c) = N(mu_theta, std_i^2) (a DDIM step with eta,
or `step_flow_sde`), reward r(x0, c) at the end. One round:

    collect   B rollouts under no_grad: states x_0..x_N, log p_old [S, B] of the S stochastic steps, rewards r [B],
              with kl > 0 the KL_i of each step and the return R = r - kl sum_i KL_i (R = r when kl = 0)
    advantage A = clip((R - mean_g) / (std_g + 1e-8), -5, 5) per condition g (over the batch when unconditional)
    train     for inner_epochs, over random minibatches of samples and a random `timestep_fraction` of the S steps:
                  ratio_i = exp((log p_theta(x_{i+1} | x_i) - log p_old) / D)        (per dimension, D = dims)
                  loss    = mean_i mean_b max(-A ratio_i, -A clip(ratio_i, 1 - eps, 1 + eps))
                          + mean_i mean_b kl / (std_g D) * KL_i(theta)               (DPOK, GRPO with kl > 0)
              one `ctx.update` per minibatch (the timesteps' graphs are freed one by one: backward per timestep).

KL_i = ||mu_theta - mu_ref||^2 / (2 std_i^2) (nats, `step_kl`), differentiated through the policy's mean on the stored
states. The gradient of E[sum_i KL_i] has that pathwise part and a score-function part (the states are the policy's
samples); penalising the return carries the second, so at ratio 1 the loss's gradient is exactly
(1 / (S D std_g)) grad( E[r(x0)] - kl E[sum_i KL_i] ) (normalised advantages, per-dimension ratio, mean over steps),
whose maximiser under a memoryless schedule is p_base(x0) exp(r(x0) / kl) / Z: `kl` is in nats per unit reward, as
in every method here. DPOK as published (kl_return=False) keeps the pathwise part only, and settles elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import UnifuseError, choose
from ..paths import RectifiedFlow, TrigFlow
from .base import Context, advantages, group_stats, step_kl
from .trajectory import ROLLOUT_SAMPLERS, rollout, transition


class Rollouts(NamedTuple):
    """What one round collects: the trajectories (no graph) and what training needs of them."""

    states: list            # N + 1 states [B, ...], states[0] at the noise end
    times: torch.Tensor     # the grid, float64 [N + 1]
    log_probs: torch.Tensor  # [S, B] log p_old of the S stochastic steps (the first S of the N steps)
    rewards: torch.Tensor   # [B]
    advantages: torch.Tensor  # [B], clipped
    scale: torch.Tensor     # [B] the advantages' normaliser std_g + 1e-8 of each sample's group
    cond: dict              # the conditions, batch-first tensors
    kl: torch.Tensor | None  # [B] sum_i KL_i of the rollout (with kl > 0)


@dataclass
class DDPO:
    """DDPO-IS: PPO-clipped policy gradient with per-dimension importance ratios (card 21.1).

    kl                 weight of sum_i KL(policy step || base step), in nats per unit reward (0: DDPO; DPOK: > 0)
    clip               PPO clip range eps of the per-dimension ratio (1e-4, DDPO's)
    inner_epochs       passes over each round's rollouts
    timestep_fraction  fraction of the stochastic steps trained on per minibatch (a random subset; 1.0: all)
    minibatch          samples per update (0: the whole round's batch, one update per epoch)
    adv_clip           advantages are clipped to [-adv_clip, adv_clip]
    group              samples per condition (conditional bases: batch / group conditions, each drawn group times)
    sampler, eta       the rollout's steps ("": ctx.sampler; None: ctx.eta), the same at sampling and training
    kl_return          with kl > 0, the advantages are of the KL-penalised return r - kl sum_i KL_i (the exact gradient:
                       the KL's score-function part); False: reward advantages only (DPOK as published)
    """

    kl: float = 0.0
    clip: float = 1e-4
    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    minibatch: int = 0
    adv_clip: float = 5.0
    group: int = 1
    sampler: str = ""
    eta: float | None = None
    kl_return: bool = True

    differentiable = False
    name = "ddpo"

    def setup(self, ctx: Context) -> None:
        for value, what, low in ((self.inner_epochs, "inner_epochs", 1), (self.minibatch, "minibatch", 0),
                                 (self.group, "group", 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UnifuseError(f"{self.name}.{what} must be an integer >= {low}, got {value!r}")
        for value, what in ((self.kl, "kl"), (self.clip, "clip"), (self.adv_clip, "adv_clip")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise UnifuseError(f"{self.name}.{what} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.timestep_fraction, (int, float)) or not 0.0 < self.timestep_fraction <= 1.0:
            raise UnifuseError(f"{self.name}.timestep_fraction must lie in (0, 1], got {self.timestep_fraction!r}")
        choose("rollout sampler", self.rollout_sampler(ctx), ROLLOUT_SAMPLERS)
        if self.rollout_eta(ctx) <= 0.0:
            raise UnifuseError(f"{self.name} needs stochastic steps (their densities), but eta = {self.rollout_eta(ctx)}; "
                               "set finetune.eta > 0 (1.0: DDPM's posterior step / the memoryless SDE)")
        if ctx.conditioning != "none" and ctx.batch % self.group:
            raise UnifuseError(f"{self.name}: the batch ({ctx.batch}) must be a multiple of group ({self.group}), "
                               "the samples drawn per condition; change finetune.batch or the group option")

    def rollout_sampler(self, ctx: Context) -> str:
        return self.sampler or ctx.sampler

    def rollout_eta(self, ctx: Context) -> float:
        return float(ctx.eta if self.eta is None else self.eta)

    def step(self, ctx: Context, generator, step: int) -> dict:
        """One round: collect rollouts, then the clipped policy-gradient updates."""
        batch = self.collect(ctx, generator)
        out = self.train(ctx, batch, generator)
        out["reward"] = float(batch.rewards.mean())
        out["reward_std"] = float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0
        if batch.kl is not None:
            out["kl"] = float(batch.kl.mean())
        return out

    # --- collection -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, ctx: Context, generator) -> Rollouts:
        """B rollouts of the policy (no graph), their rewards and advantages (per condition where drawn in groups)."""
        n = ctx.batch
        cond, groups = self._conditions(ctx, n, generator)
        noise, gens = ctx.draw(n)
        if any(p.dtype == torch.float64 for p in ctx.params):  # a float64 policy samples in float64
            noise = noise.double()
        r = rollout(ctx.policy, noise, ctx.grid(), cond=cond or None, generator=gens,
                    sampler=self.rollout_sampler(ctx), eta=self.rollout_eta(ctx),
                    reference=ctx.reference if self.kl > 0 else None)
        if r.log_probs.shape[0] == 0:
            raise UnifuseError(f"{self.name}: the rollout has no stochastic steps; use finetune.steps >= 2 and eta > 0")
        rewards = ctx.reward(r.x0, cond).detach()
        kl = r.kl.sum(0) if r.kl is not None else None
        returns = rewards - self.kl * kl if kl is not None and self.kl_return else rewards
        adv = advantages(returns, groups, clip=self.adv_clip)
        return Rollouts([s.detach() for s in r.states], r.times, r.log_probs, rewards, adv,
                        group_stats(returns, groups)[1], cond, kl)

    def _conditions(self, ctx: Context, n: int, generator) -> tuple:
        """(cond, groups): n // group conditions, each repeated group times (groups: the condition index), or the
        conditions as drawn with class labels as groups (per-class advantages). Unconditional: ({}, None)."""
        if ctx.conditioning == "none":
            return {}, None
        if self.group == 1:
            cond = ctx.condition(n, generator)
            return cond, cond.get("class_labels")
        base = ctx.condition(n // self.group, generator)
        cond = {k: v.repeat_interleave(self.group, 0) if torch.is_tensor(v) else v for k, v in base.items()}
        return cond, torch.arange(n // self.group).repeat_interleave(self.group)

    # --- training ---------------------------------------------------------------------------------------
    def train(self, ctx: Context, batch: Rollouts, generator) -> dict:
        """inner_epochs passes of clipped policy-gradient updates over minibatches of batch's samples."""
        n, steps = batch.advantages.shape[0], batch.log_probs.shape[0]
        k = max(1, round(self.timestep_fraction * steps))
        size = self.minibatch or n
        losses, clipped, kls, norms = [], [], [], []
        for _ in range(self.inner_epochs):
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, size):
                idx = perm[start:start + size]
                chosen = torch.randperm(steps, generator=generator)[:k].sort().values.tolist()
                ctx.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for m, i in enumerate(chosen):
                    loss, stats = self.surrogate(ctx, batch, i, idx)
                    loss = loss / k
                    if m < k - 1:  # free this timestep's graph now; the last one goes through ctx.update
                        loss.backward()
                    else:
                        norms.append(ctx.update(loss))
                    total += float(loss.detach())
                    clipped.append(stats["clipped"])
                    kls.append(stats["kl"] * steps)
                losses.append(total)
        out = {"loss": sum(losses) / len(losses), "clip_fraction": sum(clipped) / len(clipped),
               "grad_norm": sum(norms) / len(norms)}
        if self.kl > 0:
            out["kl_train"] = sum(kls) / len(kls)  # sum_i KL_i estimated from the trained steps (nats)
        return out

    def surrogate(self, ctx: Context, batch: Rollouts, i: int, idx: torch.Tensor) -> tuple:
        """(loss, stats) of stochastic step i on the samples idx: the PPO-clipped per-dimension-ratio loss, plus the
        KL term with kl > 0. stats: ratio (mean), clipped (fraction with |ratio - 1| > clip), kl (mean KL_i)."""
        ts = batch.times.tolist()
        x, x_next = batch.states[i][idx], batch.states[i + 1][idx]
        cond = {k: v[idx] if torch.is_tensor(v) else v for k, v in batch.cond.items()} or None
        sampler, eta = self.rollout_sampler(ctx), self.rollout_eta(ctx)
        step = transition(ctx.policy, x, ts[i], ts[i + 1], cond=cond, sampler=sampler, eta=eta)
        dims = x[0].numel()
        ratio = torch.exp((step.log_prob(x_next) - batch.log_probs[i, idx].to(x_next.dtype)) / dims)
        adv = batch.advantages[idx].to(ratio.dtype)
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - self.clip, 1.0 + self.clip)).mean()
        kl = torch.zeros(())
        if self.kl > 0:
            with torch.no_grad():
                ref = transition(ctx.reference, x, ts[i], ts[i + 1], cond=cond, sampler=sampler, eta=eta)
            kl_b = step_kl(step, ref)
            loss = loss + (self.kl / (batch.scale[idx].to(kl_b.dtype) * dims) * kl_b).mean()
            kl = kl_b.mean()
        r = ratio.detach()
        return loss, {"ratio": float(r.mean()), "clipped": float(((r - 1).abs() > self.clip).double().mean()),
                      "kl": float(kl.detach())}


@dataclass
class DPOK(DDPO):
    """DPOK: DDPO with the KL to the base in every step (card 21.2). kl default 0.1 nats per unit reward: for a
    reward of unit scale the tilted optimum p_base exp(r / 0.1) moves far but stays on the base's support; scale it
    with the reward (the optimum depends on r / kl only).

    kl_return default False, DPOK as published (the KL's pathwise gradient only): the exact gradient (True, tested
    on the Gaussian base, where it comes to rest at the tilted optimum) puts the rollouts' summed KL into the
    advantages, and on images that sum is dominated by the few low-noise steps (std ~ 1e-3): on digits / class:3
    (3 CPU-minutes) it drove the samples to 8s (21% 3s at lr 6e-4, 3.5% at 2e-4), the published form reached 78%."""

    kl: float = 0.1
    kl_return: bool = False

    name = "dpok"


@dataclass
class GRPO(DDPO):
    """GRPO (Flow-GRPO): group-relative advantages over `group` samples per condition (an unconditional base has one
    condition: the whole batch is the group), on the Flow-GRPO SDE for flow families. sampler "": "sde" on
    rectified-flow and TrigFlow paths, else ctx.sampler; kl default 0.0 (the flow_grpo maintainer's advice: start
    without a KL). Flow-GRPO's a = 0.7 is eta = 0.7 / sqrt(2) ~ 0.495 (finetune.eta, or the eta option)."""

    group: int = 8

    name = "grpo"

    def rollout_sampler(self, ctx: Context) -> str:
        if self.sampler:
            return self.sampler
        return "sde" if isinstance(ctx.policy.path, (RectifiedFlow, TrigFlow)) else ctx.sampler


__all__ = ["DDPO", "DPOK", "GRPO", "Rollouts"]

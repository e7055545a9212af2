"""What every reward fine-tuning method is, and what the fine-tuning loop hands it (ALGORITHMS cards 21-22).

A method is a dataclass of hyperparameters with:

    name                    its registry name (`unifuse finetune NAME`)
    differentiable          True when it backpropagates through the reward (DRaFT, AlignProp, ReFL): a reward
                            without gradients is refused before training starts
    setup(ctx)              once, before training and before a resume restores state (stored pairs, buffers)
    step(ctx, generator, step) -> dict
                            one round: draw what it needs (rollouts of the policy, preference pairs), then one or
                            more updates through `ctx.update(loss)`; returns the scalars to log, with "loss" and
                            "reward" (the mean reward of this round's samples) and, where measured, "kl"

The KL regulariser is stated in nats: `step_kl` is KL(policy step || reference step) of one Gaussian transition,
summed over dimensions; summed over a trajectory's steps it is the KL between the two path measures, whose
minimiser of  E[-r(x0)] + kl * KL  is p_base(x0) exp(r(x0) / kl) / Z when the noise schedule is memoryless
(Adjoint Matching, Domingo-Enrich et al. 2024). Nothing in a method assumes the base's family: rollouts are the
samplers' own stochastic steps (`finetune.trajectory`) on the policy's path.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import DiffusionModel
from ..samplers import generators, randn
from ..samplers.steps import GaussianStep
from ..training.run import Holds


@dataclass
class Context(Holds):
    """What a method sees: the policy and its frozen reference, the reward, the rollout settings, the budget.

    policy        trainable: the network as trained (adapters, data-parallel), on the base's path
    policy_net    the raw trainable network (its parameters: `params`)
    reference     the frozen base model (its EMA network), eval mode: the KL's reference
    reward        reward(images [B, ...] in data units, cond) -> [B], checked (`rewards.checked`)
    batch         samples per rollout (per process)
    steps         stochastic sampler steps of a rollout (grid from the noise end to the data end)
    sampler       "ddim" (DDIM with eta: eta = 1 is DDPM's posterior step) or "sde" (Flow-GRPO's SDE, any path)
    eta           the sampler's noise level (DDIM's eta; the SDE's a / sqrt(2), so eta = 1 is memoryless)
    conditioning  the base run's data.cond: "none", "class" or "text"
    """

    policy: DiffusionModel
    policy_net: nn.Module
    reference: DiffusionModel
    reward: Callable
    info: dict
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    batch: int = 32
    steps: int = 20
    sampler: str = "ddim"
    eta: float = 1.0
    spacing: str = ""
    conditioning: str = "none"
    grad_clip: float = 1.0
    run_dir: str = ""
    seed: int = 0
    progress: float = 0.0
    total_steps: int = 1
    finite: bool = True                             # False once an update met a NaN/inf loss or gradient
    images: int = 0                                 # samples drawn so far (for seeds: batch-free streams)
    nets: dict = field(default_factory=dict)        # extra networks saved in every checkpoint
    optimizers: dict = field(default_factory=dict)  # their optimizers
    states: dict = field(default_factory=dict)      # objects with state_dict/load_state_dict (exact resume)
    scalars: dict = field(default_factory=dict)     # logged with each metrics line
    env: object = None                              # the run's processes; None: one
    data: object = None                             # the base's training data set (for FD and folder pairs)
    objective: object = None                        # the base's training objective (a DenoisingLoss: its errors)
    sample_cfg: object = None                       # the base's sampler settings (cfg.sample): `generate`

    def __post_init__(self):
        from .rewards import checked

        self.reward = checked(self.reward)  # every method's rewards are shape- and NaN-checked in one place
        self._grids = {}

    @property
    def params(self) -> list:
        return [p for p in self.policy_net.parameters() if p.requires_grad]

    def grid(self, steps: int | None = None) -> torch.Tensor:
        """The rollout grid: steps + 1 float64 times from the policy's noise end to the data end."""
        from .trajectory import rollout_grid

        steps = steps or self.steps
        if steps not in self._grids:  # fixed for the run: made once
            self._grids[steps] = rollout_grid(self.reference, steps, self.sampler, self.spacing or None)
        return self._grids[steps]

    def draw(self, n: int) -> tuple:
        """(initial noise, per-sample generators) of the next n rollouts: pass the generators to `rollout`, whose
        steps continue each sample's stream, so what sample i draws does not depend on the batch size."""
        gens = generators(self.seed, self.images + self._rank_offset(), n)
        self.images += n
        return randn((n, *self.info["shape"]), generator=gens).to(self.device), gens

    @torch.no_grad()
    def generate(self, n: int, *, model: DiffusionModel | None = None, cond: dict | None = None) -> torch.Tensor:
        """n samples of `model` (default: the policy) with the base's own sampler settings (no graph), drawn
        from the next n per-sample streams; cond: the conditions (default: `condition(n)`)."""
        from ..sampling import sample

        noise, gens = self.draw(n)
        sc = self.sample_cfg
        kw = {"spacing": sc.spacing} if sc is not None and sc.spacing else {}
        cond = self.condition(n) if cond is None else cond
        return sample(model or self.policy, noise, sampler=sc.sampler if sc else "ddim", nfe=sc.nfe if sc else 20,
                      generator=gens, cond=cond or None, **kw)

    def _rank_offset(self) -> int:
        return 0 if self.env is None else 10**9 * int(getattr(self.env, "rank", 0))

    def condition(self, n: int, generator: torch.Generator | None = None) -> dict:
        """The conditions of n rollouts: random classes for a class-conditional base, captions for a text one,
        {} for an unconditional one."""
        if self.conditioning == "none":
            return {}
        if self.conditioning == "class":
            labels = torch.randint(int(self.info["num_classes"]), (n,), generator=generator).to(self.device)
            return {"class_labels": labels}
        from ..training.sampling import condition_for

        return condition_for(self.reference, self.info, self.conditioning, n, device=self.device)[0]

    def update(self, loss: torch.Tensor) -> float:
        """backward, gradient clipping, optimizer step; a NaN/inf loss or gradient skips the step and sets
        `finite` False (the loop then stops with the last checkpoint intact). Returns the gradient norm."""
        if not bool(torch.isfinite(loss.detach())):
            self.finite = False
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        if not bool(torch.isfinite(norm)):
            self.finite = False
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def step_kl(policy: GaussianStep, reference: GaussianStep) -> torch.Tensor:
    """KL(policy || reference) in nats of two Gaussian steps with the same std, summed over dimensions -> [B]:
    ||mu_policy - mu_reference||^2 / (2 std^2) (DPOK's KL with its sigma_t scaling, card 21.2)."""
    std = policy.std
    d = policy.mean - reference.mean.to(policy.mean.dtype)
    kl = 0.5 * d * d / (std * std if not isinstance(std, float) else std**2)
    return kl.reshape(kl.shape[0], -1).sum(1)


def group_stats(rewards: torch.Tensor, groups: torch.Tensor | None = None) -> tuple:
    """([B] mean, [B] std + 1e-8) of each sample's group (the samples sharing one condition: GRPO / DDPO per-prompt)
    when every group has two or more samples, else of the batch (float64; a batch of one: its value and 1)."""
    r = rewards.double()
    mean = torch.full_like(r, float(r.mean()))
    scale = torch.full_like(r, float(r.std()) + 1e-8 if r.numel() > 1 else 1.0)
    if groups is not None:
        _, inverse, counts = torch.unique(groups.reshape(-1), return_inverse=True, return_counts=True)
        if bool((counts >= 2).all()):
            for g in range(len(counts)):
                m = inverse == g
                mean[m], scale[m] = r[m].mean(), r[m].std() + 1e-8
    return mean, scale


def advantages(rewards: torch.Tensor, groups: torch.Tensor | None = None, clip: float = 5.0) -> torch.Tensor:
    """(r - mean) / (std + 1e-8) of each sample's group (`group_stats`), clipped to [-clip, clip]."""
    mean, scale = group_stats(rewards, groups)
    return ((rewards.double() - mean) / scale).clamp(-clip, clip).to(rewards.dtype)


__all__ = ["Context", "advantages", "group_stats", "step_kl"]

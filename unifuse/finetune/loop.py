"""The fine-tuning loop: any method of `unifuse.finetune` on any base run, for any reward, on the Run object.

    cfg = finetune_config("runs/digits", "draft", reward="class:3", minutes=5)
    finetune(cfg, "runs/digits-3")                       # a run folder: sample it with `unifuse sample --ckpt`
    finetune(cfg, "runs/digits-3", resume="runs/digits-3")   # continue it exactly

The fine-tuned run's config is the base's (data, network, path, sampler settings) with a `finetune` section (method,
reward, rollout sampler and steps, options, LoRA rank) and the data set's fine-tuning optimizer (`FINETUNE_PARTS`).
The policy starts as a copy of the base's EMA network (with low-rank adapters when finetune.lora_rank > 0); the
frozen base is the KL's reference. Checkpoints hold the plain network as "ema" (adapters merged: `unifuse sample`
and `unifuse eval` read it like any run, with the base's sampler) and the trained one as "model" (exact resume).
Every finetune.eval_every rounds: reward, path KL to the base (nats) and FD of fresh samples, as "eval" events in
metrics.jsonl and the plot reward.png; sample grids every train.sample_every rounds.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from ..config import TOYS, FinetuneConfig, apply_overrides
from ..errors import UnifuseError
from ..training import distributed
from ..training.build import build_data, build_model, build_objective, data_info
from ..training.checkpoint import find_checkpoint, load_model, read_meta
from ..training.loop import describe, set_learning_rate
from ..training.run import Run, run_config
from . import get, method_class
from .base import Context
from .evaluate import Evaluator, plot_rewards

# Per data set kind: the fine-tuning optimizer (the network is the base's). Chosen on the 2-core CPU (bench/finetune.py).
FINETUNE_PARTS = {
    "digits": dict(lr=6e-4, warmup_steps=5),
    "mnist": dict(lr=1e-4, warmup_steps=5),
    "toy": dict(lr=3e-4, warmup_steps=5),
}
# What `unifuse finetune` runs without METHOD, per reward kind: (method, options), the best per CPU-minute in
# bench/finetune.py. A differentiable reward: backpropagation through every rollout step with the path KL (the
# memoryless objective whose optimum is p_base exp(r / kl) / Z; with r = log p(K | x) and kl = 1 that is the base's
# own class K, and kl 0.1 sharpens it toward the samples the classifier is sure of). A black-box reward: DDPO.
RECOMMENDED = {"differentiable": ("draft", {"k": None, "kl": 0.1}), "black-box": ("ddpo", {})}


def base_config(base: str):
    """(checkpoint folder, config) of a base run, or one message naming the folder and the fix."""
    folder, cfg = run_config(base, "base")
    if cfg.distill.method:
        raise UnifuseError(f"--base {base!r} is a distilled student ({cfg.distill.method}): its sampler has no "
                           "stochastic steps to fine-tune; fine-tune the many-step model it came from "
                           f"({cfg.distill.teacher})")
    return folder, cfg


def recommended(reward) -> tuple:
    """(method, options) for a reward: reward backpropagation where it has gradients, policy gradient otherwise."""
    return RECOMMENDED["differentiable" if getattr(reward, "differentiable", False) else "black-box"]


def finetune_config(base: str, method: str | None = None, *, reward: str, overrides=(), steps: int | None = None,
                    minutes: float | None = None, seed: int | None = None):
    """The fine-tuned run's config: the base's, with the finetune section and the overrides applied."""
    from .rewards import get_reward

    folder, bcfg = base_config(base)
    rew = get_reward(reward, read_meta(folder)["data"])  # an unknown or broken reward stops here
    name, options = (method, {}) if method else recommended(rew)
    method_class(name)  # an unknown name stops here, naming the choices
    kind = "toy" if bcfg.data.name in TOYS else bcfg.data.name if bcfg.data.name in FINETUNE_PARTS else "digits"
    d = FINETUNE_PARTS[kind]
    budget = dict(steps=steps if steps is not None else (10**6 if minutes else 200), minutes=minutes or 0.0)
    cfg = replace(bcfg, name=f"{bcfg.name}-{name}", description=f"{name} fine-tuning of {bcfg.name} on {reward}",
                  finetune=FinetuneConfig(method=name, base=str(base), reward=reward, options=dict(options)),
                  optim=replace(bcfg.optim, lr=d["lr"], warmup_steps=d["warmup_steps"], decay_after=0, cooldown=0.0,
                                ema_halflife=0.0, posthoc_ema=False, accumulate=1, weight_decay=0.0),
                  train=replace(bcfg.train, **budget, seed=bcfg.train.seed if seed is None else seed, log_every=5,
                                ckpt_every=50, sample_every=50, clock="wall"))
    cfg = apply_overrides(cfg, list(overrides))
    get(cfg.finetune.method, **cfg.finetune.options)  # bad options stop here
    return cfg


def load_base(cfg, device):
    """The frozen base model (its EMA network), eval mode: the reference."""
    model, _ = load_model(find_checkpoint(cfg.finetune.base), ema=True, device=device)
    return model.requires_grad_(False).eval()


def trainable(cfg, reference) -> torch.nn.Module:
    """The network fine-tuning trains: a copy of the base's, with low-rank adapters when finetune.lora_rank > 0."""
    net = copy.deepcopy(reference.net).train().requires_grad_(True)
    if cfg.finetune.lora_rank > 0:
        from .lora import add_adapters

        add_adapters(net, rank=cfg.finetune.lora_rank)
    return net


class Exported(torch.nn.Module):
    """The plain network a checkpoint's "ema" file holds: the trained network itself, or with adapters its copy
    with the adapters merged (refreshed before every grid, evaluation and checkpoint)."""

    def __init__(self, net: torch.nn.Module, plain: torch.nn.Module):
        super().__init__()
        self.net, self.plain = [net], plain  # a list: `net` is not a submodule (its state is the "model" file)

    def refresh(self) -> torch.nn.Module:
        from .lora import is_adapted, merge_into

        if is_adapted(self.net[0]):
            merge_into(self.plain, self.net[0])
        else:
            self.plain.load_state_dict(self.net[0].state_dict())
        return self.plain

    def state_dict(self, *args, **kwargs):
        return self.refresh().state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        return self.plain.load_state_dict(state, strict=strict)


class Counter:
    """The number of rollouts drawn so far: the per-sample noise streams continue from it after a resume."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def state_dict(self) -> dict:
        return {"images": torch.tensor(self.ctx.images, dtype=torch.int64)}

    def load_state_dict(self, state: dict, path=None) -> None:
        self.ctx.images = int(state["images"])


def build_context(cfg, run: Run, method) -> tuple:
    """(Context, exported plain network) for a run: the reference, the policy, the reward, the optimizer."""
    from .rewards import get_reward

    env, dev, f = run.env, run.device, cfg.finetune
    reference = load_base(cfg, dev)
    data = build_data(cfg)
    info = data_info(data)
    reward = get_reward(f.reward, info, device=dev)  # a backpropagation method refuses a black box in its setup
    net = trainable(cfg, reference)
    params = [p for p in net.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    per_process = max(1, f.batch // env.world)
    ctx = Context(policy=build_model(cfg, distributed.wrap(net, env)), policy_net=net, reference=reference,
                  reward=reward, info=info, device=dev, optimizer=opt, batch=per_process, steps=f.steps,
                  sampler=f.sampler, eta=f.eta, spacing="", conditioning=cfg.data.cond, grad_clip=o.grad_clip,
                  run_dir=run.out, seed=cfg.train.seed * 1000 + 7, total_steps=cfg.train.steps, env=env, data=data,
                  objective=build_objective(cfg, data), sample_cfg=cfg.sample)
    ctx.policy.train()
    return ctx, Exported(net, copy.deepcopy(reference.net))


def finetune(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """Fine-tune `cfg.finetune.base` on `cfg.finetune.reward` with `cfg.finetune.method` into the run folder `out`."""
    if not cfg.finetune.method:
        raise UnifuseError("this config is not a fine-tuning run (finetune.method is empty); build one with "
                           "finetune_config(base, method, reward=...)")
    run = Run(cfg, out, resume=resume, progress=progress, log=log)
    method = get(cfg.finetune.method, **cfg.finetune.options)
    ctx, exported = build_context(cfg, run, method)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + run.env.rank + 1)
    torch.manual_seed(cfg.train.seed * 1000 + run.env.rank + 1)
    method.setup(ctx)
    evaluator = Evaluator(cfg, ctx, exported, run)
    step, images = run.start(
        nets={"model": ctx.policy_net, "ema": exported, **ctx.nets}, optimizers={"optimizer": ctx.optimizer,
                                                                               **ctx.optimizers},
        states={"rollouts": Counter(ctx), **{f"method.{k}": v for k, v in ctx.states.items()}},
        generators={"gen": gen}, meta=dict(describe(cfg, exported.plain, ctx.info), precision=run.precision,
                                           finetune=finetune_meta(cfg)),
        grid=evaluator.grid)
    if step == 0:
        evaluator(0)
    with run.loop():
        while step < cfg.train.steps:
            lr = set_learning_rate(cfg, ctx.optimizer, step, run.spent)
            ctx.progress = min(1.0, max(step / cfg.train.steps, run.spent))
            scalars = method.step(ctx, gen, step)
            loss = float(scalars.pop("loss", math.nan))
            value = run.agree(step, loss, ctx.finite and math.isfinite(loss), lr)
            step += 1
            images += ctx.batch * run.env.world
            if cfg.finetune.eval_every > 0 and step % cfg.finetune.eval_every == 0:
                evaluator(step)
            scalars = {k: round(float(v), 6) for k, v in scalars.items() if v is not None}
            if run.end_step(step, images, value, lr=lr, **scalars, **ctx.scalars):
                break
    if cfg.finetune.eval_every == 0 or step % cfg.finetune.eval_every != 0:
        evaluator(step)
    summary = run.finish(step, images)
    if run.env.main:
        plot_rewards(run.path("metrics.jsonl"), run.path("reward.png"))
    return dict(summary, **evaluator.last)


def finetune_meta(cfg) -> dict:
    """What `unifuse sample` and `unifuse eval` may want to know of a fine-tuned run beyond its config."""
    f = cfg.finetune
    return {"method": f.method, "base": f.base, "reward": f.reward, "lora_rank": f.lora_rank}


__all__ = ["FINETUNE_PARTS", "RECOMMENDED", "base_config", "finetune", "finetune_config", "load_base", "recommended"]

"""The distillation loop: any method of `unifuse.distill` on any teacher run, in the training loop's shape.

    cfg = distill_config("runs/digits", "cd", ["distill.options.solver=euler"], minutes=10)
    distill(cfg, "runs/digits-cd")                      # a student run: sample it with `unifuse sample --ckpt`
    distill(cfg, "runs/digits-cd", resume="runs/digits-cd")   # continue it exactly

The student's config is the teacher's (data, network) with the method's student path and prediction, its
sampler and the NFEs it supports (`cfg.distill`), and the data set's distillation optimizer (`DISTILL_PARTS`).
The student network starts as a copy of the teacher's EMA network; the teacher, frozen, is re-expressed on the
student's path. The run folder is a training run's (`training.run.Run`): metrics.jsonl, sample grids at 1, 2 and
4 steps, atomic checkpoints with every network and optimizer the method registered, exact resume.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from ..config import TOYS, DistillConfig, apply_overrides, validate
from ..errors import UnifuseError
from ..training import distributed
from ..training.build import Batches, Conditioner, build_data, build_model, data_info, student_path
from ..training.checkpoint import find_checkpoint, load_model
from ..training.ema import EMA
from ..training.loop import describe, micro_batch, set_learning_rate
from ..training.run import Run, run_config
from . import get, method_class
from .base import Context
from .grids import student_grid

# Per data set kind: the distillation optimizer (the network and batch are the teacher's). Chosen on the 2-core
# CPU (docs/benchmarks/distill.md): a tenth of the pre-training rate, a short warm-up, an evaluation EMA.
DISTILL_PARTS = {
    "digits": dict(lr=2e-4, warmup_steps=50, ema_halflife=20000.0),
    "mnist": dict(lr=1e-4, warmup_steps=50, ema_halflife=10000.0),
    "toy": dict(lr=5e-4, warmup_steps=50, ema_halflife=10000.0),
}
# The method `unifuse distill` runs without METHOD (the best at equal time in bench/distill.py).
RECOMMENDED = "cd"


def teacher_config(teacher: str):
    """(checkpoint folder, config) of a teacher run, or one message naming the folder and the fix."""
    folder, cfg = run_config(teacher, "teacher")
    if cfg.distill.method:
        raise UnifuseError(f"--teacher {teacher!r} is itself a distilled student ({cfg.distill.method}); distil from "
                           f"the many-step teacher it came from ({cfg.distill.teacher})")
    return folder, cfg


def distill_config(teacher: str, method: str | None = None, overrides=(), *, steps: int | None = None,
                   minutes: float | None = None, seed: int | None = None):
    """The student run's config: the teacher's, with the method's student and the overrides applied."""
    _, tcfg = teacher_config(teacher)
    name = method or RECOMMENDED
    method_class(name)  # an unknown name stops here, naming the choices
    kind = "toy" if tcfg.data.name in TOYS else tcfg.data.name if tcfg.data.name in DISTILL_PARTS else "digits"
    d = DISTILL_PARTS[kind]
    budget = dict(steps=steps if steps is not None else (10**6 if minutes else 2000), minutes=minutes or 0.0)
    lr_scale = getattr(method_class(name), "lr_scale", 1.0)  # a method's own factor on the data set's rate
    cfg = replace(tcfg, name=f"{tcfg.name}-{name}", description=f"{name} distillation of {tcfg.name}",
                  distill=DistillConfig(method=name, teacher=str(teacher)),
                  optim=replace(tcfg.optim, lr=d["lr"] * lr_scale, warmup_steps=d["warmup_steps"], decay_after=0, cooldown=0.0,
                                ema_halflife=d["ema_halflife"], posthoc_ema=False, accumulate=1),
                  train=replace(tcfg.train, **budget, seed=tcfg.train.seed if seed is None else seed,
                                ckpt_every=500, sample_every=250, clock="wall"))
    cfg = apply_overrides(cfg, list(overrides))
    return resolve_student(cfg, tcfg)


def resolve_student(cfg, tcfg):
    """cfg with the method's student path, prediction, sampler and supported NFEs filled in."""
    m = get(cfg.distill.method, **cfg.distill.options)
    kind = m.student_kind(tcfg.model.prediction) if hasattr(m, "student_kind") else m.student_prediction
    path = m.student_path or ""
    if path == tcfg.model.path:
        path = ""
    nfe = getattr(m, "nfe", None)
    sample = replace(cfg.sample, sampler=m.sampler, spacing=getattr(m, "spacing", "") or "",
                     nfe=1 if not nfe or 1 in nfe else min(nfe), clip_denoised=0.0)
    cfg = replace(cfg, model=replace(cfg.model, prediction=kind or tcfg.model.prediction), sample=sample,
                  distill=replace(cfg.distill, student_path=path, nfe=",".join(map(str, nfe or ()))))
    return validate(cfg)


def supported_nfe(cfg) -> tuple:
    """The NFEs a student supports (empty: any)."""
    return tuple(int(k) for k in cfg.distill.nfe.split(",") if k.strip())


def load_teacher(cfg, device):
    """(teacher on the student's path, the teacher's raw EMA network): frozen, eval mode."""
    teacher, _ = load_model(find_checkpoint(cfg.distill.teacher), ema=True, device=device)
    teacher.requires_grad_(False)
    return (teacher.on(student_path(cfg)) if cfg.distill.student_path else teacher), teacher.net


def distill(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """Distil `cfg.distill.teacher` with `cfg.distill.method` into the run folder `out`; returns the summary."""
    if not cfg.distill.method:
        raise UnifuseError("this config is not a distillation (distill.method is empty); build one with "
                           "distill_config(teacher, method)")
    run = Run(cfg, out, resume=resume, progress=progress, log=log)
    env, dev = run.env, run.device
    method = get(cfg.distill.method, **cfg.distill.options)
    teacher, teacher_net = load_teacher(cfg, dev)
    data = build_data(cfg)
    info = data_info(data)
    batches = Batches(data, micro_batch(cfg, env.world), env.rank, env.world, cfg.train.seed)
    gen = torch.Generator(dev).manual_seed(cfg.train.seed * 1000 + env.rank + 1)
    data_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + env.rank + 500)
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 1)

    net = copy.deepcopy(teacher_net).train().requires_grad_(True)
    o = cfg.optim
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    ema = EMA(net, o.ema_halflife if getattr(method, "ema", True) else 0.0, o.ema_rampup)
    ctx = Context(teacher=teacher, student=build_model(cfg, distributed.wrap(net, env)), student_net=net,
                  ema=build_model(cfg, ema.net), info=info, device=dev, run_dir=out, seed=cfg.train.seed,
                  total_steps=cfg.train.steps, env=env)
    ctx.student.train()
    method.setup(ctx)
    step, images = run.start(
        nets={"model": net, "ema": ema.net, **ctx.nets}, optimizers={"optimizer": opt, **ctx.optimizers},
        states={f"method.{k}": v for k, v in ctx.states.items()}, generators={"gen": gen, "data": data_gen},
        batches=batches, meta=dict(describe(cfg, net, info), precision=run.precision, student=student_meta(cfg)),
        grid=lambda png: student_grid(ctx, method, cfg, png))
    conditioner = Conditioner(cfg, dev, info)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.precision == "bf16")
    with run.loop():
        while step < cfg.train.steps:
            lr = set_learning_rate(cfg, opt, step, run.spent)
            ctx.progress = min(1.0, max(step / cfg.train.steps, run.spent))
            x, labels = batches.next()
            x = x.to(dev, non_blocking=True)
            with autocast:
                loss = method.loss(ctx, x, conditioner(labels, data_gen) or {}, generator=gen, step=step).mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(grad_norm))
            value = run.agree(step, float(loss.detach()), finite, lr)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images += cfg.data.batch
            ema.update(net, images, cfg.data.batch)
            if run.end_step(step, images, value, lr=lr, grad_norm=round(float(grad_norm), 4), **ctx.scalars):
                break
    return run.finish(step, images)


def student_meta(cfg) -> dict:
    """What `unifuse sample` needs to know of a student beyond its config: the method and its NFEs."""
    return {"method": cfg.distill.method, "teacher": cfg.distill.teacher, "sampler": cfg.sample.sampler,
            "nfe": list(supported_nfe(cfg))}


__all__ = ["DISTILL_PARTS", "RECOMMENDED", "distill", "distill_config", "load_teacher", "resolve_student",
           "supported_nfe", "teacher_config"]

"""The training loop: one straight-line function (nanoGPT; EDM's `training_loop.py`).

    train(cfg, "runs/x")                        a run from a Config
    train(cfg, "runs/x", resume="runs/x")       continue it exactly (same weights as never stopping, on CPU)

AdamW with linear warm-up (and an optional inverse-square-root decay), gradient clipping, gradient
accumulation, EDM's EMA (and EDM2 power-function EMA snapshots for post-hoc EMA), bf16 autocast (train.precision
"auto": where the hardware runs it natively, `distributed.resolve_precision`), optional
torch.compile, DDP under torchrun, a step budget and a wall-clock budget, JSON-lines metrics, a progress
bar, periodic sample grids and atomic safetensors checkpoints (the run folder's part lives in `run.py`). A
non-finite loss or gradient stops the run with one message and writes nothing, so the last good checkpoint
stays intact.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..errors import UnifuseError
from . import distributed
from .build import Batches, Conditioner, build_data, build_model, build_net, build_objective, data_info
from .checkpoint import check_codec
from .ema import EMA, PowerEMA
from .plots import sample_grid
from .run import Run, TrainingDiverged, weights_digest


def learning_rate(cfg, step: int, progress: float | None = None) -> float:
    """Linear warm-up over optim.warmup_steps, then constant, or lr sqrt(decay_after / step) after decay_after;
    with optim.cooldown = f > 0 the rate then falls linearly to 0 over the last fraction f of the budget
    (warmup-stable-decay, Hu et al. 2024). The budget spent is the larger of step / train.steps and
    `progress`, the spent fraction of train.minutes that the loop passes."""
    o = cfg.optim
    lr = o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr
    if o.decay_after > 0 and step > o.decay_after:
        lr *= math.sqrt(o.decay_after / step)
    if o.cooldown > 0:
        done = max(step / max(cfg.train.steps, 1), progress or 0.0)
        lr *= min(1.0, max(0.0, (1.0 - done) / o.cooldown))
    return lr


def set_learning_rate(cfg, optimizer, step: int, progress: float | None = None) -> float:
    """`learning_rate` for this step, written into every parameter group of `optimizer`; returns it."""
    lr = learning_rate(cfg, step, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """Train `cfg` into the run folder `out` (optionally resuming from a run or checkpoint folder).
    Returns a summary dict: step, images, loss (last logged), seconds, checkpoint folder, stop reason.
    An autoencoder (model.family "ae") and a latent run that trains its autoencoder first (data.latent=train:PRESET)
    go to `unifuse.training.autoencoder`; every other run, latent ones included, is `train_diffusion`."""
    from .autoencoder import require_folder

    require_folder(cfg)  # a folder preset (folder-latent-32, ...) without --set data.name=folder:DIR
    if cfg.model.family == "ae" or cfg.data.latent.startswith("train:"):
        from .autoencoder import train_autoencoder, train_latent

        stage = train_autoencoder if cfg.model.family == "ae" else train_latent
        return stage(cfg, out, resume=resume, progress=progress, log=log)
    return train_diffusion(cfg, out, resume=resume, progress=progress, log=log)


def train_diffusion(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """The diffusion training loop (`train` without the dispatch)."""
    # --- 1. the run: its folder, processes, device, threads -------------------------------------------
    run = Run(cfg, out, resume=resume, progress=progress, log=log)
    env, dev = run.env, run.device
    per_rank = micro_batch(cfg, env.world)

    # --- 2. data (a latent run: latents, checked against a resumed run's codec), model, objective, EMA ---
    data = build_data(cfg)
    info = data_info(data)
    if resume is not None:
        check_codec(resume, info)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net = build_net(cfg, info).to(dev)
    objective = build_objective(cfg, data)
    o = cfg.optim
    # an objective with parameters of its own (sCT's adaptive weighting head) is trained with the network
    extra = list(objective.to(dev).parameters()) if isinstance(objective, torch.nn.Module) else []
    opt = torch.optim.AdamW([*net.parameters(), *extra], lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    ema = EMA(net, o.ema_halflife, o.ema_rampup)
    phema = PowerEMA(net) if o.posthoc_ema else None
    batches = Batches(data, per_rank, env.rank, env.world, cfg.train.seed)
    gen = torch.Generator(dev).manual_seed(cfg.train.seed * 1000 + env.rank + 1)      # times and noise
    data_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + env.rank + 500)   # condition dropout, captions
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 1)  # dropout masks differ per rank

    # --- 3. what a checkpoint holds; resume; the run folder ------------------------------------------
    ema_model = build_model(cfg, ema.net)  # what the sample grids draw from
    step, images = run.start(
        nets={"model": net, "ema": ema.net}, optimizers={"optimizer": opt},
        states={"objective": objective, "phema": phema}, generators={"gen": gen, "data": data_gen}, batches=batches,
        meta=dict(describe(cfg, net, info), precision=run.precision),
        grid=lambda png: sample_grid(ema_model, cfg.sample, info, png, dev, conditioning=cfg.data.cond))
    for group in opt.param_groups:  # the config, not a resumed checkpoint, decides these (no silent leftovers)
        group["betas"], group["weight_decay"] = tuple(o.betas), o.weight_decay

    # --- 4. the network as trained: compiled, data-parallel ----------------------------------------
    train_net = distributed.wrap(torch.compile(net) if cfg.train.compile else net, env)
    model = build_model(cfg, train_net)
    model.train()
    conditioner = Conditioner(cfg, dev, info)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.precision == "bf16")

    # --- 5. the loop -------------------------------------------------------------------------
    with run.loop():
        while step < cfg.train.steps:
            lr = set_learning_rate(cfg, opt, step, run.spent)
            loss_sum = torch.zeros((), device=dev)
            for k in range(o.accumulate):  # micro-batches; DDP averages gradients on the last one only
                x, labels = batches.next()
                x = x.to(dev, non_blocking=True)
                cond = conditioner(labels, data_gen)
                with train_net.no_sync() if env.distributed and k < o.accumulate - 1 else contextlib.nullcontext():
                    with autocast:
                        loss = objective(model, x, cond, generator=gen, step=step).mean()
                    (loss / o.accumulate).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
            loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()  # one host sync a step
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            loss = run.agree(step, loss_value / o.accumulate, finite, lr)  # raises TrainingDiverged
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images += cfg.data.batch
            ema.update(net, images, cfg.data.batch)
            if phema is not None:
                phema.update(net, step)
                if step % o.posthoc_every == 0 and env.main:
                    phema.snapshot(run.path("ema"), step)
            if run.end_step(step, images, loss, lr=lr, grad_norm=round(norm_value, 4)):
                break

    # --- 6. the end: post-hoc EMA snapshot, checkpoint, final grid, loss curve ----------------------
    if phema is not None and env.main and step > 0 and step % o.posthoc_every:
        phema.snapshot(run.path("ema"), step)
    return run.finish(step, images)


def micro_batch(cfg, world: int) -> int:
    """Images per process per micro-batch: data.batch split over processes and accumulation rounds."""
    per_rank = cfg.data.batch // (world * cfg.optim.accumulate)
    if per_rank * world * cfg.optim.accumulate != cfg.data.batch:
        raise UnifuseError(f"data.batch={cfg.data.batch} does not split into {world} processes x "
                           f"{cfg.optim.accumulate} accumulation rounds; choose a multiple of "
                           f"{world * cfg.optim.accumulate}")
    return per_rank


def describe(cfg, net, info: dict) -> dict:
    """What a checkpoint's sidecar says about the model beside its config (enough to rebuild the network)."""
    return {"path": cfg.model.path, "prediction": cfg.model.prediction, "family": cfg.model.family, "data": info,
            "net": {"name": cfg.model.net, "family": getattr(net, "family", None),
                    "config": getattr(net, "config", None)}}


__all__ = ["TrainingDiverged", "learning_rate", "set_learning_rate", "train", "train_diffusion", "weights_digest"]

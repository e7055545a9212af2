"""Training latent diffusion's first stage: the autoencoder run, and the two-stage latent run.

    train_autoencoder(get_config("mnist-ae"), "runs/ae")          an autoencoder run (model.family "ae")
    train(get_config("mnist-latent"), "runs/latent")             data.latent=train:mnist-ae: the autoencoder
                                                                   first (runs/latent/autoencoder), then the
                                                                   diffusion model on its latents

The autoencoder run uses the shared `Run` (metrics.jsonl, atomic checkpoints, exact resume, grids: the top half
of a grid shows held-out images, the bottom half their reconstructions by the EMA weights). Its checkpoint holds
model.safetensors and ema.safetensors (the autoencoder the latent runs use), optimizer and random states, and a
sidecar whose "net" entry rebuilds the architecture. A latent run fits the latent scale itself, on the whole
training set (`unifuse.latent.fit_scale`, `build.latent_data`).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import replace

import torch

from ..errors import UnifuseError
from . import distributed
from .build import Batches, build_data, data_info
from .ema import EMA
from .run import Run, latest_checkpoint, read_metrics


def build_autoencoder(cfg, info: dict) -> torch.nn.Module:
    """The configured autoencoder (a nets preset, e.g. ae-mnist), with the data's channels."""
    from ..nets import AE_PRESETS, build_net

    if len(info["shape"]) != 3:
        raise UnifuseError(f"an autoencoder needs image data [C, H, W], but {info['name']!r} has shape {info['shape']}")
    options = dict(cfg.model.net_options)
    options.setdefault("in_channels", int(info["shape"][0]))
    ae = build_net(cfg.model.net, **options)
    if getattr(ae, "family", None) != "ae":
        raise UnifuseError(f"model.net={cfg.model.net!r} is not an autoencoder; use one of {', '.join(AE_PRESETS)}")
    side = int(info["shape"][-1]) - 2 * int(info.get("pad", 0))
    if side % ae.factor:
        raise UnifuseError(f"images of {side} pixels do not divide by the autoencoder's downsampling factor {ae.factor}; "
                           f"set data.size to a multiple of {ae.factor}")
    return ae


def build_loss(cfg, info: dict):
    """`AutoencoderLoss` with the run's options; the feature loss uses the data set's own shipped classifier."""
    from ..objectives import AutoencoderLoss

    options = dict(cfg.objective.options)
    if options.get("perceptual", 0) > 0:
        options.setdefault("features", info["name"])
    return AutoencoderLoss(pad=int(info.get("pad", 0)), **options)


def require_folder(cfg) -> None:
    """The folder presets (folder-ae-*, folder-latent-*) train on the user's images: refuse to start without them."""
    from ..presets_latent import FOLDER_UNSET

    if cfg.data.name == FOLDER_UNSET:
        raise UnifuseError(f"{cfg.name} trains on your own images, but no folder was given; add --set "
                           "data.name=folder:DIR (DIR: a directory of images, searched recursively)")


def crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Images without their padding (MNIST: 32x32 -> 28x28)."""
    return x[..., pad:-pad, pad:-pad] if pad else x


@torch.no_grad()
def reconstruction_grid(ae, images: torch.Tensor, pad: int, png: str) -> str:
    """A PNG: the images (top rows) above their reconstructions decode(encode(x)) (bottom rows)."""
    from .plots import save_grid

    x = crop(images, pad).to(next(ae.parameters()).device)
    recon = ae.decode(ae.encode(x)[0]).clamp(-1, 1)
    n = images.shape[0]
    nrow = next(k for k in range(math.ceil(math.sqrt(n)), n + 1) if n % k == 0)  # whole rows of each half
    return save_grid(torch.cat([x, recon]).float().cpu(), png, nrow=nrow)


def train_autoencoder(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """Train the autoencoder `cfg` (model.family "ae") into the run folder `out`; returns the run summary."""
    from .loop import describe, micro_batch, set_learning_rate

    # --- 1. the run, data, network, loss, optimizer, EMA ------------------------------------------
    require_folder(cfg)
    run = Run(cfg, out, resume=resume, progress=progress, log=log)
    env, dev, o = run.env, run.device, cfg.optim
    data = build_data(cfg)
    info = data_info(data)
    torch.manual_seed(cfg.train.seed)
    ae = build_autoencoder(cfg, info).to(dev)
    loss_fn, pad = build_loss(cfg, info), int(info.get("pad", 0))
    opt = torch.optim.AdamW(ae.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    ema = EMA(ae, o.ema_halflife, o.ema_rampup)
    batches = Batches(data, micro_batch(cfg, env.world), env.rank, env.world, cfg.train.seed)
    gen = torch.Generator(dev).manual_seed(cfg.train.seed * 1000 + env.rank + 1)  # posterior samples
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 1)
    held = build_data(cfg, "heldout").images
    held = held if len(held) else data.images
    shown = held[torch.linspace(0, len(held) - 1, max(1, cfg.sample.grid // 2)).long()]  # spread over the classes

    # --- 2. what a checkpoint holds; resume; the folder ------------------------------------------
    step, images = run.start(nets={"model": ae, "ema": ema.net}, optimizers={"optimizer": opt},
                             generators={"gen": gen}, batches=batches,
                             meta=dict(describe(cfg, ae, info), precision=run.precision),
                             grid=lambda png: reconstruction_grid(ema.net, shown, pad, png))
    train_net = distributed.wrap(ae, env)
    ae.train()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.precision == "bf16")

    # --- 3. the loop: reconstruction + KL, one optimizer step per batch ---------------------------
    with run.loop():
        while step < cfg.train.steps:
            lr = set_learning_rate(cfg, opt, step, run.spent)
            loss_sum, parts = torch.zeros((), device=dev), {}
            for k in range(o.accumulate):
                x, _ = batches.next()
                x = crop(x.to(dev, non_blocking=True), pad)
                with train_net.no_sync() if env.distributed and k < o.accumulate - 1 else contextlib.nullcontext():
                    with autocast:
                        loss, parts = loss_fn(train_net, x, generator=gen)
                        loss = loss.mean()
                    (loss / o.accumulate).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(ae.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
            loss = run.agree(step, float(loss_sum) / o.accumulate, finite, lr)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images += cfg.data.batch
            ema.update(ae, images, cfg.data.batch)
            scalars = {k: round(v, 6) for k, v in parts.items()}
            if run.end_step(step, images, loss, lr=lr, grad_norm=round(float(grad_norm), 4), **scalars):
                break
    return run.finish(step, images)


def stage_config(cfg):
    """The autoencoder stage of a data.latent=train:PRESET run: PRESET on the run's images (data name and folder
    keys), seed, device, clock and threads, with data.latent_share of train.minutes, then data.latent_options."""
    from ..config import PRESETS, from_dict, to_dict
    from ..errors import choose
    from ..presets_latent import AE_FAMILY

    preset = choose("autoencoder preset (data.latent=train:PRESET)", cfg.data.latent.removeprefix("train:"), PRESETS)
    base = PRESETS[preset]
    if base.model.family != AE_FAMILY:
        raise UnifuseError(f"data.latent=train:{preset} names a preset that is not an autoencoder; use train:mnist-ae")
    d, t = cfg.data, cfg.train
    data = {"name": d.name, "size": d.size, "channels": d.channels, "heldout": d.heldout, "strict": d.strict}
    train = {"seed": t.seed, "device": t.device, "clock": t.clock, "threads": t.threads,
             "minutes": d.latent_share * t.minutes}
    stage = from_dict({"data": data, "train": train}, base)
    return from_dict(_merged(to_dict(stage), dict(cfg.data.latent_options)))


def _merged(a: dict, b: dict) -> dict:
    """a with b's entries, nested dicts merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def finished(run_dir: str) -> bool:
    """True when the run at run_dir ended (its metrics hold an end event) and was not interrupted."""
    ends = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("event") == "end"]
    return bool(ends) and ends[-1].get("stopped_by") != "interrupted" and latest_checkpoint(run_dir) is not None


def train_latent(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """data.latent=train:PRESET: the autoencoder trains into OUT/autoencoder (reused when it already ended, resumed
    when it was interrupted), then the diffusion model trains on its latents in what is left of train.minutes: the
    autoencoder stage's time, its set-up included, counts, on the run's clock (rank 0's, under torchrun). The
    diffusion run's stored config names OUT/autoencoder in data.latent and its own remaining minutes. Under
    torchrun both stages share one process group, joined here and left at the end."""
    require_folder(cfg)
    env = distributed.setup(cfg.train.device)
    try:
        return _two_stages(cfg, out, env, resume=resume, progress=progress, log=log)
    finally:
        distributed.teardown(env)


def _two_stages(cfg, out: str, env, *, resume, progress, log) -> dict:
    """train_latent's stages, in the process group of `env`."""
    from .loop import train

    ae_dir = os.path.join(out, "autoencoder")
    clock = time.process_time if cfg.train.clock == "process" else time.time
    start = clock()
    # rank 0 reads the folder and decides for every rank (rank 0 may already be writing when another one reads)
    todo, ae_resume = distributed.broadcast_object(env, (not finished(ae_dir), latest_checkpoint(ae_dir) and ae_dir))
    if todo:
        if env.main:
            log(f"training the autoencoder ({cfg.data.latent.removeprefix('train:')}) into {ae_dir}")
        summary = train_autoencoder(stage_config(cfg), ae_dir, resume=ae_resume, progress=progress, log=log)
        if summary["stopped_by"] == "interrupted":
            return summary
    used = distributed.broadcast_object(env, (clock() - start) / 60.0)  # rank 0's clock, as the loop's budget
    minutes = max(cfg.train.minutes - used, 0.05) if cfg.train.minutes > 0 else 0.0
    if env.main:
        log(f"training {cfg.name} on the latents of {ae_dir}" + (f" for {minutes:.2f} more minutes" if minutes else ""))
    cfg = replace(cfg, data=replace(cfg.data, latent=ae_dir, latent_options={}),
                  train=replace(cfg.train, minutes=round(minutes, 4)))
    return train(cfg, out, resume=resume, progress=progress, log=log)


__all__ = ["build_autoencoder", "build_loss", "crop", "finished", "reconstruction_grid", "require_folder",
           "stage_config", "train_autoencoder", "train_latent"]

"""The training loop: one straight-line function (nanoGPT; EDM's `training_loop.py`).

    train(cfg, "runs/x")                        a run from a Config
    train(cfg, "runs/x", resume="runs/x")       continue it exactly (same weights as never stopping, on CPU)

AdamW with linear warm-up (and an optional inverse-square-root decay), gradient clipping, gradient
accumulation, EDM's EMA (and EDM2 power-function EMA snapshots for post-hoc EMA), bf16 autocast, optional
torch.compile, DDP under torchrun, a step budget and a wall-clock budget, JSON-lines metrics, a progress
bar, periodic sample grids and atomic safetensors checkpoints. A non-finite loss or gradient stops the run
with one message and writes nothing, so the last good checkpoint stays intact.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from .. import __version__
from ..errors import UnifuseError
from . import distributed
from .build import (Batches, Conditioner, build_data, build_model, build_net, build_objective, data_info)
from .checkpoint import (find_checkpoint, load_tensors, optimizer_state, optimizer_tensors, read_meta,
                         save_checkpoint)
from .ema import EMA, PowerEMA
from .plots import plot_loss_curve, sample_grid


class TrainingDiverged(UnifuseError):
    """The loss or the gradient became NaN or infinite."""


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


def _rng_state(gen: torch.Generator, data_gen: torch.Generator, device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state(), "gen": gen.get_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def train(cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print) -> dict:
    """Train `cfg` into the run folder `out` (optionally resuming from a run or checkpoint folder).
    Returns a summary dict: step, images, loss (last logged), seconds, checkpoint folder, stop reason."""
    from ..config import save_config

    # --- 1. processes, device, threads ------------------------------------------------------
    if resume is None and _latest(out) is not None:
        raise UnifuseError(f"{out} already holds a trained run ({_latest(out)}); continue it with --resume {out} "
                           "or choose another --out")
    env = distributed.setup(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    dev = env.device
    per_rank = cfg.data.batch // (env.world * cfg.optim.accumulate)
    if per_rank * env.world * cfg.optim.accumulate != cfg.data.batch:
        raise UnifuseError(f"data.batch={cfg.data.batch} does not split into {env.world} processes x "
                           f"{cfg.optim.accumulate} accumulation rounds; choose a multiple of {env.world * cfg.optim.accumulate}")
    start_time = time.time()

    # --- 2. data, model, objective, optimizer, EMA ------------------------------------------------
    data = build_data(cfg)
    info = data_info(data)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net = build_net(cfg, info).to(dev)
    objective = build_objective(cfg, data)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    ema = EMA(net, cfg.optim.ema_halflife, cfg.optim.ema_rampup)
    phema = PowerEMA(net) if cfg.optim.posthoc_ema else None
    batches = Batches(data, per_rank, env.rank, env.world, cfg.train.seed)
    gen = torch.Generator(dev).manual_seed(cfg.train.seed * 1000 + env.rank + 1)      # times and noise
    data_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + env.rank + 500)   # condition dropout, captions
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 1)  # dropout masks differ per rank
    step, images, loss_log = 0, 0, []

    # --- 3. resume ---------------------------------------------------------------------------
    if resume is not None:
        folder = find_checkpoint(resume)
        meta = read_meta(folder)
        try:
            net.load_state_dict(load_tensors(folder, "model", meta))
            ema.net.load_state_dict(load_tensors(folder, "ema", meta))
            opt.load_state_dict(optimizer_state(load_tensors(folder, "optimizer", meta), meta["optimizer"]))
        except (RuntimeError, ValueError, KeyError) as err:
            raise UnifuseError(f"the checkpoint {folder} does not fit the configured network or optimizer "
                               f"({str(err).splitlines()[0][:200]}); resume without changing model.* settings") from None
        for group in opt.param_groups:  # the config, not the checkpoint, decides these (no silent leftovers)
            group["betas"], group["weight_decay"] = tuple(cfg.optim.betas), cfg.optim.weight_decay
        extra = load_tensors(folder, "training", meta)
        step, images = int(meta["step"]), int(meta["images"])
        batches.epoch, batches.position = meta["batches"]["epoch"], meta["batches"]["position"]
        if f"rng.{env.rank}.cpu" in extra and meta.get("world", 1) == env.world:
            torch.set_rng_state(extra[f"rng.{env.rank}.cpu"])
            gen.set_state(extra[f"rng.{env.rank}.gen"].to(gen.get_state().dtype))
            data_gen.set_state(extra[f"rng.{env.rank}.data"].to(torch.uint8))
            if dev.type == "cuda" and f"rng.{env.rank}.cuda" in extra:
                torch.cuda.set_rng_state(extra[f"rng.{env.rank}.cuda"], dev)
        elif env.main:
            log(f"note: resuming with {env.world} processes from a run with {meta.get('world', 1)}; random streams restart")
        if hasattr(objective, "load_state_dict"):
            objective.load_state_dict({k[len("objective."):]: v for k, v in extra.items() if k.startswith("objective.")})
        if phema is not None:
            phema.load_state_dict({k[len("phema."):]: v for k, v in extra.items() if k.startswith("phema.")})
        if env.main:
            log(f"resumed {folder} at step {step}")

    # --- 4. run folder -----------------------------------------------------------------------
    metrics_path = os.path.join(out, "metrics.jsonl")
    if env.main:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        save_config(cfg, os.path.join(out, "config.yaml"))
        _truncate_metrics(metrics_path, step)
    distributed.barrier(env)

    # --- 5. the network as trained: compiled, data-parallel ----------------------------------------
    train_net = torch.compile(net) if cfg.train.compile else net
    train_net = distributed.wrap(train_net, env)
    model = build_model(cfg, train_net)
    model.train()
    conditioner = Conditioner(cfg, dev, info)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def checkpoint() -> str:
        """Gather every rank's random state; rank 0 writes the checkpoint."""
        states = distributed.gather_objects(env, {k: v.cpu() for k, v in _rng_state(gen, data_gen, dev).items()})
        folder = None
        if env.main:
            training = {f"rng.{r}.{k}": v for r, s in enumerate(states) for k, v in s.items()}
            if hasattr(objective, "state_dict"):
                training.update({f"objective.{k}": v for k, v in objective.state_dict().items()})
            if phema is not None:
                training.update({f"phema.{k}": v for k, v in phema.state_dict().items()})
            opt_tensors, opt_rest = optimizer_tensors(opt)
            meta = {"library_version": __version__, "config": _plain(cfg), "path": cfg.model.path,
                    "prediction": cfg.model.prediction, "family": cfg.model.family, "images": images,
                    "elapsed_s": round(time.time() - start_time, 3), "world": env.world, "data": info,
                    "net": {"name": cfg.model.net, "family": getattr(net, "family", None),
                            "config": getattr(net, "config", None)},
                    "batches": batches.state(), "optimizer": opt_rest}
            folder = save_checkpoint(out, step, model=net.state_dict(), ema=ema.net.state_dict(), optimizer=opt_tensors,
                                     training=training, meta=meta, keep=cfg.train.keep)
        distributed.barrier(env)
        return folder

    # --- 6. the loop -------------------------------------------------------------------------
    total = cfg.train.steps
    budget = cfg.train.minutes * 60.0 if cfg.train.minutes > 0 else math.inf
    clock = time.process_time if cfg.train.clock == "process" else time.time  # CPU time: fair on a shared machine
    clock_start = clock()
    bar = _progress(progress and env.main, total, step)
    reason, last_ckpt, tick, tick_step, sums = "steps", None, time.time(), step, torch.zeros(2, dtype=torch.float64)
    spent = 0.0  # fraction of the time budget used, as of the last step (rank 0's, shared by the collective)
    interrupt = _InterruptFlag(enabled=not env.distributed)  # Ctrl-C ends the step, checkpoints, stops
    try:
        while step < total:
            lr = learning_rate(cfg, step, spent)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=dev)
            for k in range(cfg.optim.accumulate):
                x, labels = batches.next()
                x = x.to(dev, non_blocking=True)
                cond = conditioner(labels, data_gen)
                sync = train_net.no_sync() if env.distributed and k < cfg.optim.accumulate - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss = objective(model, x, cond, generator=gen, step=step).mean()
                    (loss / cfg.optim.accumulate).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
            # One collective per step: the summed loss, a non-finite flag and rank 0's spent fraction of the time budget.
            used = (clock() - clock_start) / budget if env.main else 0.0
            finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
            flags = distributed.all_sum(env, torch.tensor([float(loss_sum) / cfg.optim.accumulate, float(not finite), used],
                                                          dtype=torch.float64))
            spent = float(flags[2])
            if flags[1] > 0:
                if env.main:
                    _log_line(metrics_path, {"step": step, "event": "diverged", "lr": lr})
                distributed.teardown(env)
                where = f"; the last good checkpoint is {last_ckpt or _latest(out)}" if (last_ckpt or _latest(out)) else ""
                raise TrainingDiverged(f"the loss became NaN or infinite at step {step} (lr {lr:.3g}){where}; lower optim.lr "
                                       "(e.g. --set optim.lr=...) or optim.grad_clip, or use train.precision=fp32")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images += cfg.data.batch
            ema.update(net, images, cfg.data.batch)
            if phema is not None:
                phema.update(net, step)
            sums += torch.tensor([float(flags[0]) / env.world, 1.0], dtype=torch.float64)

            # --- logging, snapshots, grids, checkpoints (rank 0 writes) ---
            stopping = spent > 1.0 or interrupt.raised
            if step % cfg.train.log_every == 0 or step == total or stopping:
                now = time.time()
                record = {"step": step, "loss": round(float(sums[0] / sums[1]), 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                          "images": images, "elapsed_s": round(now - start_time, 2),
                          "steps_per_s": round((step - tick_step) / max(now - tick, 1e-9), 3)}
                loss_log.append(record["loss"])
                tick, tick_step, sums = now, step, torch.zeros(2, dtype=torch.float64)
                if env.main:
                    _log_line(metrics_path, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2g}")
            if phema is not None and step % cfg.optim.posthoc_every == 0 and env.main:
                phema.snapshot(os.path.join(out, "ema"), step)
            if cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0 and env.main:
                sample_grid(cfg, ema.net, info, os.path.join(out, "samples", f"step-{step:08d}.png"), dev)
            if step % cfg.train.ckpt_every == 0 and step < total:
                last_ckpt = checkpoint()
            bar.update(1)
            if stopping:
                reason = "interrupted" if interrupt.raised else "time"
                break
    finally:
        interrupt.restore()
    bar.close()

    # --- 7. the end: checkpoint, post-hoc EMA snapshot, grid, loss curve ------------------------------
    if phema is not None and env.main and step > 0 and step % cfg.optim.posthoc_every:
        phema.snapshot(os.path.join(out, "ema"), step)
    if last_ckpt is None or not last_ckpt.endswith(f"step-{step:08d}"):
        last_ckpt = checkpoint()
    # Every rank must end with the same weights (DDP averages gradients; a mismatch is a bug worth reporting).
    digest = weights_digest(net, ema.net)
    digests = distributed.gather_objects(env, digest)
    if len(set(digests)) > 1 and env.main:
        log(f"warning: the processes ended with different weights ({len(set(digests))} versions); report this as a bug")
    summary = {"step": step, "images": images, "loss": loss_log[-1] if loss_log else None,
               "seconds": round(time.time() - start_time, 2), "checkpoint": last_ckpt, "stopped_by": reason,
               "weights_sha256": digest, "ranks_in_sync": len(set(digests)) == 1, "rank": env.rank, "world": env.world}
    if env.main:
        if step > 0:
            sample_grid(cfg, ema.net, info, os.path.join(out, "samples", "final.png"), dev)
            plot_loss_curve(metrics_path, os.path.join(out, "loss.png"))
        _log_line(metrics_path, {"step": step, "event": "end", "stopped_by": reason, "seconds": summary["seconds"]})
    distributed.teardown(env)
    return summary


# --- helpers -------------------------------------------------------------------------------------

class _InterruptFlag:
    """The first Ctrl-C sets a flag that the loop reads between steps (so the checkpoint it then writes is
    a consistent state); a second Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool = True):
        import signal
        import threading

        self.raised, self.previous = False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        import signal

        self.raised = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def weights_digest(*nets) -> str:
    """SHA-256 of the parameters and buffers of the given networks (to compare processes)."""
    import hashlib

    h = hashlib.sha256()
    for net in nets:
        for name, value in net.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain(cfg) -> dict:
    from ..config import to_dict

    return to_dict(cfg)


def _latest(out: str):
    try:
        return find_checkpoint(out)
    except UnifuseError:
        return None


def _log_line(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records past `step` (left by an interrupted run) before a resumed run appends its own."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if rec.get("step", 0) <= step and rec.get("event") != "end":
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["train", "learning_rate", "TrainingDiverged", "weights_digest"]

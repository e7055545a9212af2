"""A training run as any loop sees it: the folder, resume, checkpoints, metrics, signals, progress and grids.

    run = Run(cfg, "runs/x", resume=None)          # refuses a folder holding a run; joins torchrun's processes
    step, images = run.start(nets={"model": net, "ema": ema.net}, optimizers={"optimizer": opt},
                             states={"objective": objective}, generators={"gen": gen}, batches=batches,
                             meta={...}, grid=lambda png: ...)   # resumes when asked, opens the folder
    with run.loop():                               # the time budget's clock; Ctrl-C or SIGTERM: checkpoint, stop
        while step < cfg.train.steps:
            ...                                    # one optimizer step, as the loop likes it
            loss = run.agree(step, loss, finite, lr)     # one collective: mean loss, NaN check, time spent
            ...
            if run.end_step(step, images, loss, lr=lr):  # log, grid, checkpoint when due; True: stop now
                break
    summary = run.finish(step, images)             # last checkpoint, final grid, loss curve, end event

The loop owns its networks, optimizers and random streams and hands the run what a checkpoint holds (a
distillation loop hands a student and its own optimizers the same way); the run owns the folder:

    RUN/config.yaml      the resolved config               RUN/samples/  step-N.png grids, final.png
    RUN/metrics.jsonl    one JSON object per logged step   RUN/loss.png  the loss curve
                         and the events diverged and end   RUN/ckpt/     checkpoints (`checkpoint.py`)

Every process restores and saves its own random streams, so a resumed run continues bit for bit (after
kill -9 from the last checkpoint, after Ctrl-C or SIGTERM from the step it finished).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from .. import __version__
from ..config import save_config, to_dict
from ..errors import UnifuseError
from ..io import remove_temporaries, write_text
from . import distributed
from .checkpoint import find_checkpoint, load_error, load_tensors, optimizer_state, optimizer_tensors, read_meta, save_checkpoint
from .plots import plot_loss_curve


class TrainingDiverged(UnifuseError):
    """The loss or the gradient became NaN or infinite."""


class Run:
    """The run folder `out` of the config `cfg` (its `train` section: steps, budget, intervals, device)."""

    def __init__(self, cfg, out: str, *, resume: str | None = None, progress: bool = True, log=print):
        if resume is None and latest_checkpoint(out) is not None:
            raise UnifuseError(f"{out} already holds a trained run ({latest_checkpoint(out)}); continue it with "
                               f"--resume {out} or choose another --out")
        self.cfg, self.out, self.resume, self.progress, self.log = cfg, out, resume, progress, log
        self.env = distributed.setup(cfg.train.device)
        self.device = self.env.device
        self.precision = distributed.resolve_precision(cfg.train.precision, self.device)  # "auto" -> bf16 or fp32
        self.interrupt = _InterruptFlag(enabled=False)  # signals are caught from `loop` on
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.start_time = time.time()
        self.spent = 0.0            # fraction of the time budget used, as of the last step (rank 0's)
        self.stopped_by = "steps"
        self.saved_step, self.last_checkpoint, self.last_loss = None, None, None
        self._loss_sum, self._loss_steps = 0.0, 0   # since the last metrics line

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    # --- start: what a checkpoint holds, resume, the folder ----------------------------------------------

    def start(self, *, nets: dict, optimizers: dict, states: dict | None = None, generators: dict | None = None,
              batches=None, meta: dict | None = None, grid=None) -> tuple[int, int]:
        """Register what a checkpoint holds, restore it when resuming, open the folder; returns (step, images).

        nets: file name -> module (its state dict is that file); optimizers: file name -> optimizer;
        states: prefix -> object with state_dict/load_state_dict (or None), kept in training.safetensors;
        generators: name -> this process's torch.Generator; batches: the data stream (`build.Batches`), if
        any; meta: what the sidecar says about the model; grid: grid(png_path) draws a sample grid."""
        self.nets, self.optimizers, self.batches, self.meta, self.grid = nets, optimizers, batches, meta or {}, grid
        self.states = {k: v for k, v in (states or {}).items() if v is not None}
        self.generators = generators or {}
        step, images = self._restore() if self.resume is not None else (0, 0)
        if self.env.main:
            remove_temporaries(self.path("ckpt"))  # left by a run killed while it saved
            os.makedirs(self.path("samples"), exist_ok=True)
            save_config(self.cfg, self.path("config.yaml"))
            truncate_metrics(self.path("metrics.jsonl"), step)
        distributed.barrier(self.env)
        self._tick_step = step
        return step, images

    def _restore(self) -> tuple[int, int]:
        folder = find_checkpoint(self.resume)
        meta = read_meta(folder)
        try:
            for key, net in self.nets.items():
                net.load_state_dict(load_tensors(folder, key, meta))
            for key, opt in self.optimizers.items():
                opt.load_state_dict(optimizer_state(load_tensors(folder, key, meta), meta[key]))
        except (RuntimeError, ValueError, KeyError) as err:
            raise UnifuseError(f"the checkpoint {folder} does not fit the configured network or optimizer "
                               f"({load_error(err)}); resume without changing model.* settings") from None
        extra = load_tensors(folder, "training", meta)
        if self.batches is not None:
            self.batches.epoch, self.batches.position = meta["batches"]["epoch"], meta["batches"]["position"]
        self._restore_random(extra, meta.get("world", 1))
        for prefix, state in self.states.items():
            if hasattr(state, "load_state_dict"):
                state.load_state_dict({k[len(prefix) + 1:]: v for k, v in extra.items() if k.startswith(prefix + ".")})
        if self.env.main:
            self.log(f"resumed {folder} at step {int(meta['step'])}")
        return int(meta["step"]), int(meta["images"])

    def _restore_random(self, extra: dict, world: int) -> None:
        """This process's random streams, when the checkpoint has them for as many processes."""
        rank = self.env.rank
        if f"rng.{rank}.cpu" not in extra or world != self.env.world:
            if self.env.main:
                self.log(f"note: resuming with {self.env.world} processes from a run with {world}; random streams "
                         "restart")
            return
        torch.set_rng_state(extra[f"rng.{rank}.cpu"])
        for name, gen in self.generators.items():
            gen.set_state(extra[f"rng.{rank}.{name}"].to(torch.uint8))
        if self.device.type == "cuda" and f"rng.{rank}.cuda" in extra:
            torch.cuda.set_rng_state(extra[f"rng.{rank}.cuda"], self.device)

    def _random_state(self) -> dict:
        state = {"cpu": torch.get_rng_state(), **{k: g.get_state() for k, g in self.generators.items()}}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return {k: v.cpu() for k, v in state.items()}

    # --- the loop ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def loop(self):
        """Around the loop: the time budget's clock starts, a progress bar runs, and the first Ctrl-C or SIGTERM
        lets the current step finish, checkpoint and stop (a second one interrupts at once)."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        self.budget = t.minutes * 60.0 if t.minutes > 0 else math.inf
        self.clock = time.process_time if t.clock == "process" else time.time  # CPU time: fair on a shared machine
        self.clock_start, self._tick = self.clock(), time.time()
        self.bar = tqdm(total=t.steps, initial=self._tick_step, disable=not (self.progress and self.env.main),
                        desc="train", unit="step", dynamic_ncols=True)
        # SIGINT, SIGTERM from now on (the CLI catches them from its start): finish the step, checkpoint, stop
        self.interrupt = _InterruptFlag.adopt(enabled=not self.env.distributed)
        try:
            yield self
        finally:
            self.interrupt.restore()
            self.bar.close()

    def agree(self, step: int, loss: float, finite: bool, lr: float) -> float:
        """One collective per step: the loss summed over processes, whether any saw a non-finite loss or gradient,
        and rank 0's spent fraction of the time budget (so every process stops at the same step). Returns the
        mean loss; a non-finite value stops the run with TrainingDiverged and writes nothing."""
        used = (self.clock() - self.clock_start) / self.budget if self.env.main else 0.0
        flags = distributed.all_sum(self.env, torch.tensor([loss, float(not finite), used], dtype=torch.float64))
        self.spent = float(flags[2])
        if flags[1] > 0:
            if self.env.main:
                append_metrics(self.path("metrics.jsonl"), {"step": step, "event": "diverged", "lr": lr})
            distributed.teardown(self.env)
            last = self.last_checkpoint or latest_checkpoint(self.out)
            where = f"; the last good checkpoint is {last}" if last else ""
            raise TrainingDiverged(f"the loss became NaN or infinite at step {step} (lr {lr:.3g}){where}; lower "
                                   "optim.lr (e.g. --set optim.lr=...) or optim.grad_clip, or use train.precision=fp32")
        return float(flags[0]) / self.env.world

    def end_step(self, step: int, images: int, loss: float, **scalars) -> bool:
        """After optimizer step `step`: a metrics line every train.log_every steps (the mean loss since the last
        one, then `scalars` as they are now), a sample grid and a checkpoint when due. True: stop now (the time
        budget is spent or Ctrl-C or SIGTERM arrived)."""
        t = self.cfg.train
        self._loss_sum, self._loss_steps = self._loss_sum + loss, self._loss_steps + 1
        stopping = self.spent > 1.0 or self.interrupt.raised
        if step % t.log_every == 0 or step == t.steps or stopping:
            self._log(step, images, scalars)
        if t.sample_every > 0 and step % t.sample_every == 0 and self.env.main:
            self._grid(f"step-{step:08d}.png")
        if step % t.ckpt_every == 0 and step < t.steps:
            self.checkpoint(step, images)
        self.bar.update(1)
        if stopping:
            self.stopped_by = "interrupted" if self.interrupt.raised else "time"
        return stopping

    def _log(self, step: int, images: int, scalars: dict) -> None:
        now = time.time()
        record = {"step": step, "loss": round(self._loss_sum / self._loss_steps, 6), **scalars, "images": images,
                  "elapsed_s": round(now - self.start_time, 2),
                  "steps_per_s": round((step - self._tick_step) / max(now - self._tick, 1e-9), 3)}
        self.last_loss, self._tick, self._tick_step = record["loss"], now, step
        self._loss_sum, self._loss_steps = 0.0, 0
        if self.env.main:
            append_metrics(self.path("metrics.jsonl"), record)
            shown = {"loss": f"{record['loss']:.4f}", **({"lr": f"{scalars['lr']:.2g}"} if "lr" in scalars else {})}
            self.bar.set_postfix(**shown)

    def _grid(self, name: str) -> None:
        if self.grid is not None:
            self.grid(self.path("samples", name))

    # --- checkpoints and the end -------------------------------------------------------------------

    def checkpoint(self, step: int, images: int) -> str | None:
        """Gather every process's random streams; rank 0 writes RUN/ckpt/step-N (its folder; None elsewhere)."""
        states = distributed.gather_objects(self.env, self._random_state())
        folder = None
        if self.env.main:
            training = {f"rng.{r}.{k}": v for r, s in enumerate(states) for k, v in s.items()}
            for prefix, state in self.states.items():
                if hasattr(state, "state_dict"):
                    training.update({f"{prefix}.{k}": v for k, v in state.state_dict().items()})
            files = {key: net.state_dict() for key, net in self.nets.items()}
            meta = {"library_version": __version__, "config": to_dict(self.cfg), **self.meta, "images": images,
                    "elapsed_s": round(time.time() - self.start_time, 3), "world": self.env.world}
            if self.batches is not None:
                meta["batches"] = self.batches.state()
            for key, opt in self.optimizers.items():
                files[key], meta[key] = optimizer_tensors(opt)
            folder = save_checkpoint(self.out, step, meta=meta, keep=self.cfg.train.keep, **files, training=training)
        distributed.barrier(self.env)
        self.saved_step, self.last_checkpoint = step, folder
        return folder

    def finish(self, step: int, images: int) -> dict:
        """The end: a checkpoint (unless this step has one), the weights compared across processes, the final
        grid, the loss curve and an end event; returns the summary."""
        if self.saved_step != step:
            self.checkpoint(step, images)
        # Every process must end with the same weights (DDP averages gradients; a mismatch is a bug worth reporting).
        digest = weights_digest(*self.nets.values())
        digests = distributed.gather_objects(self.env, digest)
        if len(set(digests)) > 1 and self.env.main:
            self.log(f"warning: the processes ended with different weights ({len(set(digests))} versions); "
                     "report this as a bug")
        summary = {"step": step, "images": images, "loss": self.last_loss,
                   "seconds": round(time.time() - self.start_time, 2), "checkpoint": self.last_checkpoint,
                   "stopped_by": self.stopped_by, "weights_sha256": digest, "ranks_in_sync": len(set(digests)) == 1,
                   "rank": self.env.rank, "world": self.env.world, "precision": self.precision,
                   "signal": None if self.interrupt.signum is None else int(self.interrupt.signum)}
        if self.env.main:
            if step > 0:
                self._grid("final.png")
                plot_loss_curve(self.path("metrics.jsonl"), self.path("loss.png"))
            append_metrics(self.path("metrics.jsonl"), {"step": step, "event": "end", "stopped_by": self.stopped_by,
                                                        "seconds": summary["seconds"], "precision": self.precision})
        distributed.barrier(self.env)  # leave together: a rank that leaves while rank 0 still writes can abort at exit
        distributed.teardown(self.env)
        return summary


# --- helpers -------------------------------------------------------------------------------------

class _InterruptFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM (what `timeout`, SLURM and Kubernetes send) sets a flag that the loop
    reads between steps, so the checkpoint it then writes is a consistent state; a second one interrupts at once.
    Installed by `Run.loop` (by `catch_stop_signals` earlier, so a signal during the set-up still ends in a
    checkpoint after one step)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True):
        import signal
        import threading

        self.raised, self.signum, self.previous = False, None, {}
        if enabled and threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name)
                self.previous[num] = signal.signal(num, self._handle)

    def _handle(self, signum, frame):
        import signal
        import sys

        self.raised, self.signum = True, signum
        for num in self.previous:  # the next signal interrupts at once, as Ctrl-C does: `finally` blocks still
            signal.signal(num, signal.default_int_handler)  # run, so a half-written checkpoint is removed
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint (send it again to "
              "abort)", file=sys.stderr, flush=True)

    _early = None  # installed by catch_stop_signals before the run exists

    @classmethod
    def adopt(cls, enabled: bool = True) -> _InterruptFlag:
        """The flag `catch_stop_signals` installed (with any signal it already caught), else a new one."""
        early, cls._early = cls._early, None
        if early is not None and enabled:
            return early
        if early is not None:
            early.restore()
        return cls(enabled)

    def restore(self) -> None:
        import signal

        for num, handler in self.previous.items():
            signal.signal(num, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def catch_stop_signals() -> None:
    """Catch SIGINT and SIGTERM from now on (the CLI calls this first), so that a signal that arrives while the
    data and the network are built still ends in a checkpoint; the next Run takes the flag over."""
    if _InterruptFlag._early is None:
        _InterruptFlag._early = _InterruptFlag()


def release_stop_signals() -> None:
    """Give back the handlers `catch_stop_signals` replaced, if no run took them over."""
    early, _InterruptFlag._early = _InterruptFlag._early, None
    if early is not None:
        early.restore()


class Holds:
    """What a post-training method adds to every checkpoint, mixed into its context (`distill.Context`,
    `finetune.Context`, which hold `nets`, `optimizers`, `states` and `device`)."""

    def add_net(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Register an extra network (saved as NAME.safetensors in each checkpoint, restored on resume)."""
        self.nets[name] = module.to(self.device)
        return module

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizers[name] = optimizer
        return optimizer

    def add_state(self, name: str, obj) -> None:
        """An object with state_dict()/load_state_dict() (tensors and plain numbers) kept for an exact resume."""
        self.states[name] = obj


def run_config(run: str, option: str) -> tuple:
    """(checkpoint folder, config) of the trained run that `--OPTION run` names, or one message naming the fix."""
    from ..config import from_dict

    try:
        folder = find_checkpoint(run)
    except UnifuseError as err:
        raise UnifuseError(f"--{option} {run!r} is not a trained run ({err}); train one first, e.g. unifuse train "
                           f"digits --out {run}") from None
    return folder, from_dict(read_meta(folder)["config"])


def weights_digest(*nets) -> str:
    """SHA-256 of the parameters and buffers of the given networks (to compare processes)."""
    import hashlib

    h = hashlib.sha256()
    for net in nets:
        for name, value in net.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latest_checkpoint(out: str) -> str | None:
    """The newest checkpoint folder of a run, or None."""
    try:
        return find_checkpoint(out)
    except UnifuseError:
        return None


def append_metrics(path: str, record: dict) -> None:
    """One JSON line (appending is atomic enough: a torn last line is skipped by every reader)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl file (none when it is missing; a torn or blank line is skipped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def truncate_metrics(path: str, step: int) -> None:
    """Drop records past `step` (left by an interrupted run) before a resumed run appends its own."""
    if os.path.isfile(path):
        keep = [rec for rec in read_metrics(path) if rec.get("step", 0) <= step and rec.get("event") != "end"]
        write_text(path, "".join(json.dumps(rec) + "\n" for rec in keep))


__all__ = ["Run", "TrainingDiverged", "catch_stop_signals", "latest_checkpoint", "release_stop_signals", "weights_digest"]

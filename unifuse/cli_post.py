"""The post-training commands of `unifuse` (see `unifuse.cli`): distil a teacher, fine-tune on a reward.

    unifuse distill [METHOD] --teacher RUN --out DIR [--minutes M | --steps N] [--seed S] [--set k=v ...]
    unifuse finetune [METHOD] --base RUN --reward NAME --out DIR [--minutes M | --steps N] [--seed S] [--set k=v ...]

Both run on a trained run folder, write a run folder that `unifuse sample` and `unifuse eval` read like any other,
checkpoint on Ctrl-C or SIGTERM and continue exactly with --resume.
"""
from __future__ import annotations

import sys

from .errors import UnifuseError


def _add_budget(d, what: str) -> None:
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a key of the {what}'s config (repeatable)")
    budget = d.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="total optimizer steps (rounds)")
    budget.add_argument("--minutes", type=float, help="time budget (--set train.clock=process counts CPU time)")
    d.add_argument("--seed", type=int)
    d.add_argument("--resume", metavar="RUN", help=f"continue the {what} run RUN exactly")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")


def _add_distill(d) -> None:
    d.add_argument("method", nargs="?", help="distillation method (default: the recommended one)")
    d.add_argument("--teacher", help="the teacher's run folder (any family)")
    d.add_argument("--out", help="the student's run folder (default: the --resume folder)")
    _add_budget(d, "student")


def _add_finetune(d) -> None:
    d.add_argument("method", nargs="?", help="fine-tuning method (default: the recommended one for the reward)")
    d.add_argument("--base", help="the base model's run folder (any family)")
    d.add_argument("--reward", help="class:K, compressibility, incompressibility, brightness, contrast or "
                                    "module:function")
    d.add_argument("--out", help="the fine-tuned run's folder (default: the --resume folder)")
    _add_budget(d, "fine-tuned")


def _post(args, name: str, build, run, start: tuple) -> int:
    """The shared body: overrides, resume or a new config, the out-folder check, the run, the last lines."""
    from .cli import _catching_signals, resumed_config
    from .training.outputs import check_out_folder

    def body(args) -> int:
        overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device != "auto" else [])
        if args.resume:
            if args.method or any(getattr(args, k, None) for k in start):
                raise UnifuseError(f"--resume continues a {name} run as it was started; drop METHOD and "
                                   + " and ".join(f"--{k}" for k in start))
            overrides += [f"train.{k}={v}" for k, v in (("steps", args.steps), ("minutes", args.minutes)) if v is not None]
            cfg, out = resumed_config(args, overrides)
        else:
            cfg, out = build(overrides), args.out
        check_out_folder(out, data=cfg)
        summary = run(cfg, out, resume=args.resume, progress=not args.no_progress)
        if summary.get("rank", 0) != 0:
            return 0
        if summary["stopped_by"] == "interrupted":
            print(f"stopped at step {summary['step']}; continue with: unifuse {name} --resume {out}", file=sys.stderr)
            return 128 + int(summary.get("signal") or 2)
        print(f"{name}: {cfg.description} to step {summary['step']} ({summary['stopped_by']} budget) in "
              f"{summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}; sample with: unifuse sample --ckpt "
              f"{out} --out SAMPLES --nfe {cfg.sample.nfe}")
        return 0

    return _catching_signals(body, args, name)


def cmd_distill(args) -> int:
    from .distill.loop import distill, distill_config

    def build(overrides):
        if not args.teacher or not args.out:
            raise UnifuseError("distill needs --teacher RUN and --out DIR (e.g. unifuse distill cd --teacher "
                               "runs/digits --out runs/digits-cd --minutes 10)")
        return distill_config(args.teacher, args.method, overrides, steps=args.steps, minutes=args.minutes,
                              seed=args.seed)

    return _post(args, "distill", build, distill, ("teacher",))


def cmd_finetune(args) -> int:
    from .finetune.loop import finetune, finetune_config

    def build(overrides):
        if not args.base or not args.out or not args.reward:
            raise UnifuseError("finetune needs --base RUN, --reward NAME and --out DIR (e.g. unifuse finetune --base "
                               "runs/digits --reward class:3 --out runs/digits-3 --minutes 5)")
        return finetune_config(args.base, args.method, reward=args.reward, overrides=overrides, steps=args.steps,
                               minutes=args.minutes, seed=args.seed)

    return _post(args, "finetune", build, finetune, ("base", "reward"))


__all__ = ["cmd_distill", "cmd_finetune"]

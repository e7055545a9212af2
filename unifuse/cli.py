"""The `unifuse` command: parse arguments and call library functions, nothing else.

    unifuse train PRESET_OR_YAML --out RUN [--set a.b=c ...] [--steps N] [--minutes M] [--seed S] [--resume RUN]
    unifuse sample --ckpt RUN --out DIR [--sampler S] [--nfe N] [--n K] [--seed S] [--class C] [--prompt T]
                   [--guidance W] [--guidance-interval LO,HI] [--classifier DIR [--classifier-scale S]]
                   [--autoguide RUN --guidance W] [--device D] [--dtype T] [--png] [--gif]
    unifuse eval --ckpt RUN [--n K] [--nll] [--device D] [--dtype T]
    unifuse distill [METHOD] --teacher RUN --out DIR [--minutes M | --steps N] [--seed S] [--set k=v ...]
    unifuse finetune [METHOD] --base RUN --reward NAME --out DIR [--minutes M | --steps N] [--seed S] [--set k=v ...]
    unifuse samplers | presets
    unifuse demo [--out runs/demo] [--minutes M]

Exit status 0 on success; bad input prints one line on stderr and exits non-zero (no traceback unless --debug).
Outputs are checked before any work starts; `train` stopped by Ctrl-C or SIGTERM checkpoints and prints the
command that continues it (exit 128 + the signal's number). docs/cli.md has the whole reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .cli_grid import add_grid, apply_grid, cmd_grid
from .cli_post import _add_distill, _add_finetune, cmd_distill, cmd_finetune
from .errors import UnifuseError
from .io import write_json

NOT_YET = ("bench",)
DTYPES = ("float32", "float64")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .distill import METHODS
    from .distill.loop import RECOMMENDED
    from .finetune import METHODS as FT_METHODS
    from .finetune.loop import RECOMMENDED as FT_RECOMMENDED
    from .finetune.rewards import REWARDS
    from .paths import SPACINGS
    from .samplers import SAMPLERS

    p = _Parser(prog="unifuse", description="Every diffusion-family model as a path, a parameterization, an objective "
                                            "and a sampler.", epilog="example: unifuse train digits --out runs/digits",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, help, example, choices=""):
        return sub.add_parser(name, help=help, description=help, parents=[common],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=f"{choices}example:\n  {example}")

    presets = _wrap("presets: " + ", ".join(PRESETS) + " (unifuse presets describes them)")
    _add_train(add("train", "train a preset or a YAML config", "unifuse train digits --out runs/digits --set "
                   "train.steps=2000", presets))
    samplers = _wrap("samplers: " + ", ".join(SAMPLERS) + " (unifuse samplers lists their orders and NFE rules)")
    spacings = _wrap("spacings: " + ", ".join(SPACINGS) + "; devices: auto, cpu, cuda, cuda:N; dtypes: "
                     + ", ".join(DTYPES))
    _add_sample(add("sample", "sample from a trained run", "unifuse sample --ckpt runs/digits --out runs/samples "
                    "--sampler dpmpp_2m --nfe 10 --n 64 --png", samplers + spacings))
    _add_eval(add("eval", "sample and measure a trained run (Frechet distance, NLL)",
                  "unifuse eval --ckpt runs/digits --n 1000 --device cuda", samplers + spacings))
    _add_distill(add("distill", "distil a many-step teacher run into a one- to four-step student",
                     "unifuse distill cd --teacher runs/digits --out runs/digits-cd --minutes 10",
                     _wrap("methods: " + ", ".join(METHODS) + f"; without METHOD: {RECOMMENDED} (the best at equal time "
                           "in bench/distill.py); options: --set distill.options.KEY=VALUE (docs/distill.md)")))
    _add_finetune(add("finetune", "fine-tune a trained run toward a reward (policy gradient, reward backpropagation, "
                      "preference optimisation)",
                      "unifuse finetune --base runs/digits --reward class:3 --out runs/digits-3 --minutes 5",
                      _wrap("methods: " + ", ".join(FT_METHODS) + "; without METHOD: "
                            + ", ".join(f"{m} {o or ''} for a {k} reward".replace("  ", " ")
                                        for k, (m, o) in FT_RECOMMENDED.items())
                            + "; rewards: " + ", ".join(REWARDS) + "; options: --set finetune.options.KEY=VALUE "
                            "(docs/finetune.md)")))
    add_grid(add("grid", "fit a sampler's time grid to a trained run (optimize_grid) and write it as JSON",
                 "unifuse grid --ckpt runs/digits --sampler unipc --nfe 8 --out grid.json"))
    add("presets", "list the named training presets", "unifuse presets")
    add("samplers", "list the samplers: order, NFE rule, default spacing, default NFE, options",
        "unifuse samplers")
    d = add("demo", "train the digits model, sample, evaluate, write pictures (make demo)",
            "unifuse demo --out runs/demo --minutes 7")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--minutes", type=float, default=7.0, help="training budget in minutes (wall clock)")
    for name in NOT_YET:
        x = add(name, f"{name} (not yet available)", f"unifuse {name} --device cuda ...")
        if name != "bench":
            _add_device(x)
        x.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _wrap(text: str, width: int = 100) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ")) + "\n"


def _add_device(x) -> None:
    x.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    x.add_argument("--dtype", default="float32", choices=DTYPES, help="sampling precision")


def _add_train(t) -> None:
    t.add_argument("config", nargs="?", help="preset name (see `unifuse presets`) or a YAML file; optional with "
                                             "--resume")
    t.add_argument("--out", help="run folder (default: the --resume folder)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable); --set model.family=rf makes "
                        "the run one of that family (path, prediction, objective, sampler)")
    t.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run continues up to N)")
    t.add_argument("--minutes", type=float, help="wall-clock budget for this invocation")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", metavar="RUN", help="continue the run (or checkpoint folder) RUN exactly")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_sample(s) -> None:
    s.add_argument("--ckpt", required=True, help="run folder (or its ckpt/ or a step folder)")
    s.add_argument("--out", required=True, help="output folder for samples.npz, grid.png and samples.json")
    s.add_argument("--sampler", help="sampler name (default: the run's)")
    s.add_argument("--nfe", type=int, help="network evaluations (default: the run's)")
    s.add_argument("--spacing", help="time-step spacing (default: the sampler's)")
    s.add_argument("--grid", metavar="FILE", help="a grid file of unifuse grid (sets the sampler and NFE)")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i), whatever --batch")
    s.add_argument("--class", dest="class_label", metavar="NAME_OR_INDEX",
                   help="class to sample, by name (a class sub-folder's name) or index (class-conditional runs, or "
                        "any run on labelled data with --classifier)")
    s.add_argument("--prompt", help="caption to sample (caption-conditional runs)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = conditional); with --autoguide "
                                                  "the autoguidance scale")
    s.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only at noise levels LO < sigma/alpha <= HI (EDM sigma); elsewhere plain conditional")
    s.add_argument("--classifier", metavar="DIR", help="classifier guidance with the noise-conditional classifier in "
                                                       "DIR (unifuse train digits-classifier --out DIR)")
    s.add_argument("--classifier-scale", type=float, metavar="S", help="classifier guidance scale (default 1)")
    s.add_argument("--autoguide", metavar="RUN", help="autoguidance: guide away from RUN, a weaker model of the same "
                                                      "kind (an earlier checkpoint, a smaller or shorter run); scale "
                                                      "--guidance")
    s.add_argument("--clip-denoised", type=float, metavar="C", help="clip the denoised estimate to [-C, C], C >= 0 (1 "
                                                                    "for images; default: the run's "
                                                                    "sample.clip_denoised)")
    s.add_argument("--threshold-percentile", type=float, metavar="P",
                   help="with clipping on (--clip-denoised C): dynamic thresholding at quantile P in [0, 1) of |x0| "
                        "per sample (Imagen: 0.995)")
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--batch", type=int, default=500, help="samples per sampler call (>= 1; the samples do not depend "
                                                          "on it)")
    s.add_argument("--png", action="store_true", help="also write one PNG per sample (OUT/png/000000.png, ...)")
    s.add_argument("--gif", action="store_true", help="also write OUT/trajectory.gif, the sampling trajectory of the "
                                                      "first batch (up to 64 samples)")
    _add_device(s)


def _add_eval(e) -> None:
    e.add_argument("--ckpt", required=True, help="run folder (or its ckpt/ or a step folder)")
    e.add_argument("--n", type=int, help="samples, >= 1 (default: the run's eval.n; below 100 the Frechet distance "
                                         "means little and a warning says so)")
    e.add_argument("--nll", action="store_true", help="also bits/dim of 64 held-out images (PF-ODE; VLB on DDPM paths)")
    e.add_argument("--sampler", help="sampler name (default: the run's)")
    e.add_argument("--nfe", type=int, help="network evaluations, >= 1 (default: the run's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="JSON file for the metrics (default: RUN/eval.json)")
    _add_device(e)


# --- commands ----------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .nets.classifier import CLASSIFIER_PRESETS
    from .training.classifier import train_classifier_preset
    from .training.outputs import check_out_folder

    if args.config in CLASSIFIER_PRESETS:  # a noise-conditional classifier for classifier guidance
        if not args.out:
            raise UnifuseError(f"train needs --out DIR for the classifier (e.g. --out runs/{args.config})")
        if args.overrides or args.resume:
            raise UnifuseError(f"{args.config} takes --out, --steps, --minutes and --seed only (not --set or --resume)")
        check_out_folder(args.out)
        train_classifier_preset(args.config, args.out, steps=args.steps, minutes=args.minutes or 0.0,
                                seed=args.seed or 0, progress=not args.no_progress)
        return 0
    return _catching_signals(_train, args, "train")


def _catching_signals(command, args, name: str) -> int:
    """command(args) with SIGINT / SIGTERM ending in a checkpoint and the resume command (a run's loop)."""
    from .training.run import catch_stop_signals, release_stop_signals

    catch_stop_signals()
    try:
        return command(args)
    except KeyboardInterrupt:  # a second signal: stopped at once, the last checkpoint is intact
        run = args.out or args.resume
        print(f"unifuse {name}: interrupted; continue from the last checkpoint with: unifuse {name} --resume {run}",
              file=sys.stderr)
        return 130
    finally:
        release_stop_signals()


def _train(args) -> int:
    from .config import get_config
    from .training import train
    from .training.outputs import check_out_folder

    overrides = list(args.overrides)
    for key, value in (("train.steps", args.steps), ("train.minutes", args.minutes), ("train.seed", args.seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        cfg, out = resumed_config(args, overrides)
    else:
        if not args.config:
            raise UnifuseError("train needs a preset or a YAML config (e.g. unifuse train digits --out runs/digits)")
        if not args.out:
            raise UnifuseError("train needs --out RUN (the run folder)")
        cfg = get_config(args.config, overrides)
        out = args.out
    check_out_folder(out, data=cfg)
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if summary["stopped_by"] == "interrupted":
        import signal

        signum = summary.get("signal") or signal.SIGINT
        run = os.path.dirname(os.path.dirname(summary["checkpoint"])) if summary.get("checkpoint") else out
        how = f"unifuse train --resume {run}"
        if cfg.data.latent.startswith("train:") and os.path.abspath(run) != os.path.abspath(out):  # the AE stage
            how += (f", then the latent model on it: unifuse train {cfg.name} --out {out} --set "
                    f"data.latent={run}")
        print(f"{signal.Signals(signum).name}: stopped at step {summary['step']}; checkpoint {summary['checkpoint']}; "
              f"continue with: {how}", file=sys.stderr)
        return 128 + int(signum)
    print(f"trained {cfg.name} to step {summary['step']} ({summary['stopped_by']} budget, {summary['precision']}) in "
          f"{summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}")
    return 0


def resumed_config(args, overrides) -> tuple:
    """(config, run folder) of `train --resume`: the stored config with the overrides, which must leave the
    network as it was (a resumed run loads its weights)."""
    from .config import apply_overrides, from_dict, to_dict
    from .training.checkpoint import find_checkpoint, read_meta

    meta = read_meta(find_checkpoint(args.resume))
    cfg = from_dict(meta["config"])
    if getattr(args, "config", None) and args.config != cfg.name:
        raise UnifuseError(f"--resume {args.resume} is a run of {cfg.name!r}, not {args.config!r}; drop the preset "
                           "or match it")
    stored = to_dict(cfg)
    cfg = apply_overrides(cfg, overrides)
    changed = _changed_keys(stored["model"], to_dict(cfg)["model"], "model.")
    if changed:
        key, old, new = changed[0]
        raise UnifuseError(f"--resume {args.resume}: the run was trained with {key}={old!r}, the override asks for "
                           f"{new!r}; a resumed run keeps its network: drop that --set, or start a new run with "
                           "--out NEW")
    out = args.out or (args.resume if os.path.isdir(os.path.join(args.resume, "ckpt")) else None)
    if out is None:
        raise UnifuseError("--resume from a checkpoint folder needs --out RUN")
    return cfg, out


def _changed_keys(old, new, prefix: str = "") -> list:
    """[(dotted key, old value, new value)] where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str)
                for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _device_dtype(args):
    import torch

    from .training.distributed import pick_device

    return pick_device(args.device, key="--device"), getattr(torch, args.dtype)


def cmd_sample(args) -> int:
    from .training import load_model
    from .training.checkpoint import find_checkpoint, read_meta
    from .training.guided import class_index, guided_model
    from .training.outputs import check_out_folder, sample_metadata, write_sample_folder
    from .training.sampling import generate

    for flag, value, what in (("--n", args.n, "samples, e.g. --n 64"), ("--nfe", args.nfe, "network evaluations, e.g. "
                              "--nfe 20"), ("--batch", args.batch, "samples per sampler call, e.g. --batch 500")):
        if value is not None and value < 1:
            raise UnifuseError(f"{flag} must be >= 1 ({what}), got {value}")
    if args.clip_denoised is not None and args.clip_denoised < 0:
        raise UnifuseError(f"--clip-denoised must be >= 0 (0 = off, 1 = images in [-1, 1]), got {args.clip_denoised:g}")
    device, dtype = _device_dtype(args)
    folder = find_checkpoint(args.ckpt)
    meta = read_meta(folder)
    info = meta["data"]
    grid = apply_grid(args) if args.grid else None  # sets args.sampler and args.nfe from the file
    check_out_folder(args.out, data=info)  # before any work
    model, cfg = load_model(folder, ema=not args.raw, device=device, nfe=args.nfe)
    start = time.time()
    class_label = None if args.class_label is None else class_index(args.class_label, info)
    model, guidance, options = guided_model(model, cfg, info, args)
    x, labels, path = generate(
        model, cfg.sample, info, args.n, conditioning=cfg.data.cond, seed=args.seed, batch=args.batch,
        sampler=args.sampler, nfe=args.nfe, spacing=args.spacing if grid is None else grid, class_label=class_label,
        prompt=args.prompt,
        guidance=guidance, guidance_options=options, clip_denoised=args.clip_denoised,
        threshold_percentile=args.threshold_percentile, progress=True, device=device, dtype=dtype, trajectory=True)
    metadata = sample_metadata(args, cfg, meta, folder, device=str(device), dtype=args.dtype)
    files = write_sample_folder(args.out, x, labels, info, metadata, png=args.png, trajectory=path if args.gif else None)
    print(f"{args.n} samples ({metadata['sampler']}, {metadata['nfe']} NFE) in {time.time() - start:.1f} s -> "
          f"{', '.join(files)}")
    return 0


def cmd_eval(args) -> int:
    from .training.checkpoint import find_checkpoint, read_meta
    from .training.evaluate import check_eval_numbers, evaluate_run
    from .training.outputs import check_out_file

    check_eval_numbers(args.n, args.nfe)
    device, dtype = _device_dtype(args)
    folder = find_checkpoint(args.ckpt)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(folder)), "eval.json")
    check_out_file(out, data=read_meta(folder)["data"])  # before any work
    report = evaluate_run(folder, args.n, nll=args.nll, sampler=args.sampler, nfe=args.nfe, seed=args.seed,
                          device=device, dtype=dtype)
    write_json(out, _jsonable(report))
    print(json.dumps(_jsonable(report), indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _jsonable(obj):
    import numbers

    import torch

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, numbers.Number) and not isinstance(obj, (bool, int, float)):
        return float(obj)
    return obj


def cmd_presets(args) -> int:
    from .config import list_presets
    from .nets.classifier import CLASSIFIER_PRESETS

    rows = list_presets() + [(k, f"noise-conditional {v[0]} classifier for classifier guidance (any path)")
                             for k, v in CLASSIFIER_PRESETS.items()]
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_samplers(args) -> int:
    from .samplers import SAMPLERS

    rules = {"step": "one per step", "stage": "order-p step costs p; any NFE", "pc": "(1 + n_corrector) per step",
             "renoise": "one per noise level", "adaptive": "NFE is an upper bound"}
    rows = [("sampler", "order", "NFE rule", "spacing", "default NFE", "options")]
    for name, spec in SAMPLERS.items():
        rule = rules.get(spec.cost, spec.cost) + (", stochastic" if spec.stochastic else "")
        if getattr(spec, "min_nfe", None):
            rule += f", NFE >= {spec.min_nfe}"
        rows.append((name, str(spec.max_order), rule, spec.spacing, str(spec.default_nfe),
                     ", ".join(spec.options) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


def cmd_demo(args) -> int:
    from .training.demo import run_demo

    run_demo(args.out, minutes=args.minutes)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "distill": cmd_distill,
            "finetune": cmd_finetune, "presets": cmd_presets, "samplers": cmd_samplers, "demo": cmd_demo,
            "grid": cmd_grid}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in NOT_YET:
        print(f"unifuse {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except UnifuseError as err:
        if args.debug:
            raise
        print(f"unifuse {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unifuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: still one line, the traceback on request
        if args.debug:
            raise
        print(f"unifuse {args.command}: error: {type(err).__name__}: {err} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `unifuse` command: parse arguments and call library functions, nothing else.

    unifuse train PRESET_OR_YAML --out RUN [--set a.b=c ...] [--steps N] [--minutes M] [--seed S] [--resume RUN]
    unifuse sample --ckpt RUN --out DIR [--sampler S] [--nfe N] [--n K] [--seed S] [--class C] [--prompt T]
                   [--guidance W] [--guidance-interval LO,HI] [--classifier DIR [--classifier-scale S]]
                   [--autoguide RUN --guidance W]
    unifuse eval --ckpt RUN [--n K] [--nll]
    unifuse presets
    unifuse demo [--out runs/demo] [--minutes M]

Exit status 0 on success; bad input prints one line on stderr and exits non-zero (no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import UnifuseError
from .io import atomic_write, write_json

NOT_YET = ("distill", "finetune", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="unifuse", description="Every diffusion-family model as a path, a parameterization, an objective "
                                            "and a sampler.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add = sub.add_parser

    t = add("train", help="train a preset or a YAML config", parents=[common])
    t.add_argument("config", nargs="?", help="preset name (see `unifuse presets`) or a YAML file; optional with "
                                             "--resume")
    t.add_argument("--out", help="run folder (default: the --resume folder)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    t.add_argument("--steps", type=int, help="total optimizer steps of the run (a resumed run continues up to N)")
    t.add_argument("--minutes", type=float, help="wall-clock budget for this invocation")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", metavar="RUN", help="continue the run (or checkpoint folder) RUN exactly")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = add("sample", help="sample from a trained run", parents=[common])
    s.add_argument("--ckpt", required=True, help="run folder (or its ckpt/ or a step folder)")
    s.add_argument("--out", required=True, help="output folder for samples.npz and grid.png")
    s.add_argument("--sampler", help="sampler name (default: the run's)")
    s.add_argument("--nfe", type=int, help="network evaluations (default: the run's)")
    s.add_argument("--spacing", help="time-step spacing (default: the sampler's)")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class", dest="class_label", metavar="NAME_OR_INDEX",
                   help="class to sample, by name (a class sub-folder's name) or index (class-conditional runs, or "
                        "any run on labelled data with --classifier)")
    s.add_argument("--prompt", help="caption to sample (caption-conditional runs)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = conditional); with --autoguide "
                                                  "the autoguidance scale")
    s.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only at noise levels LO < sigma/alpha <= HI (EDM sigma); elsewhere plain conditional")
    s.add_argument("--classifier", metavar="DIR", help="classifier guidance with the noise-conditional classifier in "
                                                       "DIR "
                                                       "(unifuse train digits-classifier --out DIR)")
    s.add_argument("--classifier-scale", type=float, metavar="S", help="classifier guidance scale (default 1)")
    s.add_argument("--autoguide", metavar="RUN", help="autoguidance: guide away from RUN, a weaker model of the same "
                                                      "kind (an earlier checkpoint, a smaller or shorter run); scale "
                                                      "--guidance")
    s.add_argument("--clip-denoised", type=float, metavar="C", help="clip the denoised estimate to [-C, C] (1 for "
                                                                    "images; default: the run's sample.clip_denoised)")
    s.add_argument("--threshold-percentile", type=float, metavar="P",
                   help="with --clip-denoised: dynamic thresholding at quantile P of |x0| per sample (Imagen: 0.995)")
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--batch", type=int, default=500, help="samples per sampler call")

    e = add("eval", help="sample and measure a trained run (Frechet distance, NLL)", parents=[common])
    e.add_argument("--ckpt", required=True)
    e.add_argument("--n", type=int, help="samples (default: the run's eval.n)")
    e.add_argument("--nll", action="store_true", help="also bits/dim of 64 held-out images (PF-ODE; VLB on DDPM paths)")
    e.add_argument("--sampler"), e.add_argument("--nfe", type=int), e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="JSON file for the metrics (default: RUN/eval.json)")

    add("presets", help="list the named training presets", parents=[common])

    d = add("demo", help="train the digits model, sample, evaluate, write pictures (make demo)", parents=[common])
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--minutes", type=float, default=7.0, help="training budget in minutes (wall clock)")

    for name in NOT_YET:
        x = add(name, help=f"{name} (not yet available)", parents=[common])
        x.add_argument("rest", nargs=argparse.REMAINDER)
    return p


# --- commands ----------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .config import apply_overrides, from_dict, get_config
    from .nets.classifier import CLASSIFIER_PRESETS
    from .training import train
    from .training.checkpoint import find_checkpoint, read_meta
    from .training.classifier import train_classifier_preset

    if args.config in CLASSIFIER_PRESETS:  # a noise-conditional classifier for classifier guidance
        if not args.out:
            raise UnifuseError(f"train needs --out DIR for the classifier (e.g. --out runs/{args.config})")
        if args.overrides or args.resume:
            raise UnifuseError(f"{args.config} takes --out, --steps, --minutes and --seed only (not --set or --resume)")
        train_classifier_preset(args.config, args.out, steps=args.steps, minutes=args.minutes or 0.0,
                                seed=args.seed or 0, progress=not args.no_progress)
        return 0
    overrides = list(args.overrides)
    for key, value in (("train.steps", args.steps), ("train.minutes", args.minutes), ("train.seed", args.seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        meta = read_meta(find_checkpoint(args.resume))
        cfg = from_dict(meta["config"])
        if args.config and args.config != cfg.name:
            raise UnifuseError(f"--resume {args.resume} is a run of {cfg.name!r}, not {args.config!r}; drop the preset "
                               "or match it")
        cfg = apply_overrides(cfg, overrides)
        out = args.out or (args.resume if os.path.isdir(os.path.join(args.resume, "ckpt")) else None)
        if out is None:
            raise UnifuseError("--resume from a checkpoint folder needs --out RUN")
    else:
        if not args.config:
            raise UnifuseError("train needs a preset or a YAML config (e.g. unifuse train digits --out runs/digits)")
        if not args.out:
            raise UnifuseError("train needs --out RUN (the run folder)")
        cfg = get_config(args.config, overrides)
        out = args.out
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if summary["stopped_by"] == "interrupted":
        print(f"interrupted at step {summary['step']}; checkpoint {summary['checkpoint']}; continue with: "
              f"unifuse train --resume {out}", file=sys.stderr)
        return 130
    print(f"trained {cfg.name} to step {summary['step']} ({summary['stopped_by']} budget) in {summary['seconds']:.0f} "
          "s; "
          f"checkpoint {summary['checkpoint']}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from .training import load_model
    from .training.checkpoint import find_checkpoint, read_meta
    from .training.plots import plot_points, save_grid
    from .training.sampling import generate
    if args.n < 1:
        raise UnifuseError(f"--n must be >= 1, got {args.n}")
    if args.nfe is not None and args.nfe < 1:
        raise UnifuseError(f"--nfe must be >= 1, got {args.nfe}")
    model, cfg = load_model(args.ckpt, ema=not args.raw)
    info = read_meta(find_checkpoint(args.ckpt))["data"]
    start = time.time()
    class_label = None if args.class_label is None else class_index(args.class_label, info)
    model, guidance, options = guided_model(model, cfg, info, args)
    x, labels = generate(model, cfg.sample, info, args.n, conditioning=cfg.data.cond, seed=args.seed, batch=args.batch,
                         sampler=args.sampler, nfe=args.nfe, spacing=args.spacing, class_label=class_label,
                         prompt=args.prompt, guidance=guidance, guidance_options=options,
                         clip_denoised=args.clip_denoised, threshold_percentile=args.threshold_percentile,
                         progress=True)
    os.makedirs(args.out, exist_ok=True)
    arrays = {}
    if x.ndim == 4:
        from .data import to_uint8

        arrays["images"] = to_uint8(x, info.get("pad", 0))
        grid = save_grid(x[:256], os.path.join(args.out, "grid.png"))
    else:
        arrays["points"] = x.numpy()
        grid = plot_points(x, os.path.join(args.out, "grid.png"))
    if labels is not None:
        arrays["labels"] = labels.numpy()
    npz = atomic_write(os.path.join(args.out, "samples.npz"), lambda tmp: np.savez_compressed(tmp, **arrays))
    print(f"{args.n} samples ({args.sampler or cfg.sample.sampler}, {args.nfe or cfg.sample.nfe} NFE) in "
          f"{time.time() - start:.1f} s -> {npz}, {grid}")
    return 0


def class_index(value: str, info: dict) -> int:
    """--class NAME_OR_INDEX -> the class index, by the run's class names first (a folder's sub-folder names)."""
    k = int(info.get("num_classes", 0))
    names = [str(c) for c in info.get("class_names") or [str(i) for i in range(k)]]
    if value in names:
        return names.index(value)
    try:
        return int(value)
    except ValueError:
        if not names:
            raise UnifuseError(f"--class {value!r}: this run's data has no classes; drop --class") from None
        raise UnifuseError(f"--class {value!r} is not a class of this run; give a name ({', '.join(names[:20])}) "
                           f"or an index 0..{len(names) - 1}") from None


def guided_model(model, cfg, info: dict, args):
    """(model with autoguidance / classifier guidance applied, classifier-free scale or None, its options) for
    `unifuse sample`: --autoguide takes --guidance as its scale; --classifier guides towards --class."""
    from .guidance import autoguidance, classifier_guidance, parse_interval

    interval = None
    if args.guidance_interval is not None:
        if args.guidance is None:
            raise UnifuseError("--guidance-interval needs --guidance W (the scale used inside the interval)")
        interval = parse_interval(args.guidance_interval)
    if args.classifier_scale is not None and args.classifier is None:
        raise UnifuseError("--classifier-scale needs --classifier DIR (train one with: unifuse train digits-classifier "
                           "--out DIR)")
    scale = args.guidance
    if args.autoguide is not None:
        if args.guidance is None:
            raise UnifuseError("--autoguide needs --guidance W, the autoguidance scale (1 = no guidance; try 2)")
        model = autoguidance(model, weak_model(args.autoguide, args.ckpt, cfg, info, ema=not args.raw),
                             args.guidance, interval=interval)
        scale = None
    if args.classifier is not None:
        from .nets.classifier import load_noisy_classifier

        if cfg.data.cond == "text":
            raise UnifuseError("--classifier guides towards a class, but this run is caption-conditional; "
                               "use --prompt with --guidance (classifier-free guidance) instead")
        if int(info.get("num_classes", 0)) < 2:
            raise UnifuseError(f"--classifier guides towards a class, but the data of this run ({info['name']}) has no "
                               "class labels; use a run on labelled data (digits, mnist, a folder with class "
                               "sub-folders)")
        if scale is not None and cfg.data.cond == "none":
            raise UnifuseError("--guidance is classifier-free guidance, which needs a class-conditional run; on this "
                               "unconditional run set the classifier's strength with --classifier-scale S")
        clf = load_noisy_classifier(args.classifier, info["shape"], info["num_classes"])
        s = 1.0 if args.classifier_scale is None else args.classifier_scale
        model = classifier_guidance(model, clf, s, pass_labels=cfg.data.cond == "class")
    return model, scale, ({"interval": interval} if scale is not None and interval is not None else None)


def weak_model(run: str, main_run: str, cfg, info: dict, ema: bool = True):
    """The bad model of autoguidance: a run (or checkpoint folder) making the same data on the same path."""
    from .training import load_model
    from .training.checkpoint import find_checkpoint, read_meta

    folder = find_checkpoint(run)
    if os.path.realpath(folder) == os.path.realpath(find_checkpoint(main_run)):
        raise UnifuseError(f"--autoguide {run} is the sampled checkpoint itself, so guidance would change nothing; "
                           "give a weaker model: an earlier step folder (RUN/ckpt/step-N) or a smaller or shorter run")
    weak_info = read_meta(folder)["data"]
    model, weak_cfg = load_model(folder, ema=ema)
    if list(weak_info["shape"]) != list(info["shape"]):
        raise UnifuseError(f"--autoguide {run} makes data of shape {list(weak_info['shape'])} ({weak_info['name']}), "
                           "but the "
                           f"sampled run makes {list(info['shape'])} ({info['name']}); use a weaker run on the same "
                           "data")
    if (weak_cfg.model.path, weak_cfg.model.path_options) != (cfg.model.path, cfg.model.path_options):
        raise UnifuseError(f"--autoguide {run} is on path {weak_cfg.model.path!r} but the sampled run on "
                           f"{cfg.model.path!r}; "
                           "autoguidance compares two models of the same kind: train the weak one with the same preset")
    if weak_cfg.data.cond != cfg.data.cond or (cfg.data.cond == "class" and
                                               int(weak_info.get("num_classes", 0)) != int(info.get("num_classes", 0))):
        raise UnifuseError(f"--autoguide {run} has data.cond={weak_cfg.data.cond!r} ({weak_info.get('num_classes', 0)} "
                           "classes) "
                           f"but the sampled run data.cond={cfg.data.cond!r} ({info.get('num_classes', 0)} classes); "
                           "both "
                           "must take the same condition")
    return model


def evaluate_run(ckpt: str, n=None, *, nll: bool = False, sampler=None, nfe=None, seed: int = 0, progress=True) -> dict:
    """Sample a run and measure it against the held-out split: the dict `unifuse eval` prints."""
    import torch

    from .training import load_model
    from .training.build import build_data
    from .training.checkpoint import find_checkpoint, read_meta
    from .training.sampling import generate

    folder = find_checkpoint(ckpt)
    meta = read_meta(folder)
    model, cfg = load_model(folder)
    info = meta["data"]
    n = n or cfg.eval.n
    start = time.time()
    x, labels = generate(model, cfg.sample, info, n, conditioning=cfg.data.cond, seed=seed, sampler=sampler, nfe=nfe,
                         progress=progress)
    report = {"run": folder, "step": meta["step"], "preset": cfg.name, "data": info["name"], "n": n,
              "sampler": sampler or cfg.sample.sampler, "nfe": nfe or cfg.sample.nfe,
              "sample_seconds": round(time.time() - start, 2)}
    from . import metrics
    from .training.demo import heldout_fd

    if x.ndim == 4:
        report.update(metrics.evaluate_images(x, info["name"], labels=labels))
        report.update(heldout_fd(x, info["name"]))
    else:
        report.update(metrics.evaluate_toy(x, info["name"]))
    if nll:
        from .likelihood import nll_report

        held = build_data(cfg, "heldout").images[:64]
        if held.ndim != 4:
            raise UnifuseError("--nll measures bits/dim of images; for the 2-D sets use "
                               "unifuse.likelihood.log_likelihood")
        # Score the held-out images as 8-bit images (digits' 17 grey levels rounded to the nearest of 256).
        held = torch.round((held + 1) * 127.5) / 127.5 - 1
        report["nll"] = nll_report(model, held, progress=progress)
    return report


def cmd_eval(args) -> int:
    from .training.checkpoint import find_checkpoint

    report = evaluate_run(args.ckpt, args.n, nll=args.nll, sampler=args.sampler, nfe=args.nfe, seed=args.seed)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(find_checkpoint(args.ckpt))), "eval.json")
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


def cmd_demo(args) -> int:
    from .training.demo import run_demo

    run_demo(args.out, minutes=args.minutes)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "presets": cmd_presets, "demo": cmd_demo}


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

"""What `unifuse sample` wraps around a trained model: a class by name, autoguidance and classifier guidance."""
from __future__ import annotations

import os

from ..errors import UnifuseError


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
    from ..guidance import autoguidance, classifier_guidance, parse_interval

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
        from ..nets.classifier import load_noisy_classifier

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
    from .checkpoint import find_checkpoint, load_model, read_meta

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


__all__ = ["class_index", "guided_model", "weak_model"]

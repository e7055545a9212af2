"""Guidance benchmark: does the sample show the requested class, and at what cost in sample quality?

For a class-conditional and a caption-conditional model (presets <data>-cond and <data>-text), sample
n images per class at each guidance scale w (w = 0: unconditional, w = 1: conditional, no guidance), and
report the fraction the shipped evaluation classifier assigns to the requested class, and the Frechet
distance on that classifier's features. Captions come from the held-out templates, never seen in
training. Extra rows: guidance limited to a noise interval, and classifier guidance with a
noise-conditional classifier trained here. Writes JSON, PNG grids (one row per class) and markdown.

    python bench/guidance.py --data mnist --minutes 30          # trains runs missing under --runs first
    python bench/guidance.py --data digits --class-run R1 --text-run R2 --scales 1,2,3,4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import unifuse as uf
from unifuse import guidance as G
from unifuse.config import get_config
from unifuse.data import load_dataset
from unifuse.data.captions import captions_for
from unifuse.metrics.classifier import classify, load_classifier
from unifuse.metrics.frechet import frechet_distance
from unifuse.training import load_model, train
from unifuse.training.checkpoint import find_checkpoint, read_meta
from unifuse.viz import save_image_grid

DATE, MACHINE = "2026-11-23", "2-core x86_64 CPU, torch 2.13 CPU"


def ensure_run(preset: str, run: str, minutes: float, threads: int) -> str:
    """The run folder, training the preset for `minutes` first when it has no checkpoint."""
    try:
        find_checkpoint(run)
        return run
    except uf.UnifuseError:
        if minutes <= 0:
            raise SystemExit(f"no checkpoint under {run}; train it (unifuse train {preset} --out {run}) "
                             "or pass --minutes") from None
    print(f"training {preset} for {minutes} min -> {run}", flush=True)
    train(get_config(preset, [f"train.minutes={minutes}", f"train.threads={threads}"]), run, progress=False)
    return run


def training_seconds(run: str) -> float:
    """Wall-clock seconds of training, summed over the run's invocations (metrics.jsonl end events)."""
    total = 0.0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            total += record.get("seconds", 0.0) if record.get("event") == "end" else 0.0
    return total


def draw(model, cond, labels, w, args, interval=None, seed=0):
    """Samples for `labels` with guidance scale w (None: the plain conditional model), in batches."""
    out, counts = [], {}
    for lo in range(0, labels.shape[0], args.batch):
        hi = min(lo + args.batch, labels.shape[0])
        g = torch.Generator(args.device).manual_seed(seed * 1000 + lo)
        noise = torch.randn((hi - lo,) + tuple(args.shape), generator=g, device=args.device)
        part = {k: v[lo:hi].to(args.device) for k, v in cond.items()}
        opts = {"interval": interval} if interval else None
        with torch.no_grad():
            x, info = uf.sample(model, noise, sampler=args.sampler, nfe=args.nfe, generator=g, cond=part,
                                guidance=w, guidance_options=opts, return_info=True)
        out.append(x.float().cpu())
        for k, v in info.get("guidance", {}).items():
            counts[k] = counts.get(k, 0) + v
    return torch.cat(out), counts


def measure(x, labels, evaluator, ref_features):
    feats, logits = classify(evaluator, x)
    return {"accuracy": float((logits.argmax(1) == labels).double().mean()),
            "fd": frechet_distance(feats, ref_features)}


def sweep(name, model, cond, labels, args, evaluator, ref, rows, grids, extra=None):
    """One row per guidance setting for one conditioning kind."""
    settings = [("unconditional", 0.0, None), ("conditional", 1.0, None)]  # w = 1: exactly the conditional model
    settings += [(f"cfg w={w:g}", w, None) for w in args.scales if w not in (0.0, 1.0)]
    if args.interval:
        settings += [(f"cfg w={w:g}, sigma in ({args.interval[0]:g}, {args.interval[1]:g}]", w, tuple(args.interval))
                     for w in args.interval_scales]
    for label, w, interval in settings:
        t0 = time.time()
        x, counts = draw(model, cond, labels, w, args, interval)
        row = {"model": name, "setting": label, "scale": w, "interval": interval,
               **measure(x, labels, evaluator, ref), "seconds": round(time.time() - t0, 1), "evals": counts}
        rows.append(row)
        grids[(name, label)] = x
        print(json.dumps(row), flush=True)
    if extra is not None:
        label, guided = extra
        t0 = time.time()
        x, counts = draw(guided, cond, labels, None, args)
        rows.append({"model": name, "setting": label, "scale": args.classifier_scale, "interval": None,
                     **measure(x, labels, evaluator, ref), "seconds": round(time.time() - t0, 1), "evals": counts})
        grids[(name, label)] = x
        print(json.dumps(rows[-1]), flush=True)


def best(rows, name, fd_factor=1.5):
    """The most accurate classifier-free row whose FD is within fd_factor of the conditional (unguided) model's."""
    base = next(r for r in rows if r["model"] == name and r["setting"] == "conditional")
    ok = [r for r in rows if r["model"] == name and r["setting"].startswith(("conditional", "cfg"))
          and r["fd"] <= fd_factor * base["fd"]]
    return base, max(ok, key=lambda r: (r["accuracy"], -r["fd"]))


def markdown(rows, args, command, train_info, files) -> str:
    lines = [f"# Guidance on {args.data}", "",
             f"Date {DATE}; machine {MACHINE}; command `{command}`.", "",
             f"Sampler {args.sampler}, {args.nfe} NFE (a guided step's conditional and unconditional evaluations "
             f"are batched into one call and counted once each), {args.n_per_class} samples per class, "
             f"evaluation classifier = the shipped `{args.data}` classifier; FD on its 64-d features against all "
             f"{args.data} images (biased upward at this sample size: compare rows, not papers).", ""]
    for name, info in train_info.items():
        lines.append(f"- `{name}`: {info}")
    lines += ["", "| model | setting | accuracy | FD | seconds | cond / uncond evals |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ev = r["evals"]
        lines.append(f"| {r['model']} | {r['setting']} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | {r['seconds']} | "
                     f"{ev.get('cond_evals', '-')} / {ev.get('uncond_evals', '-')} |")
    lines.append("")
    targets = {"class": 0.95, "text (held-out captions)": 0.90}
    for name, target in targets.items():
        if not any(r["model"] == name for r in rows):
            continue
        base, top = best(rows, name)
        ok = top["accuracy"] >= target
        lines.append(f"- {name}: best setting `{top['setting']}` reaches {100 * top['accuracy']:.1f}% (target "
                     f"{100 * target:.0f}%: {'met' if ok else 'NOT met'}) with FD {top['fd']:.2f} = "
                     f"{top['fd'] / base['fd']:.2f}x the unguided model's {base['fd']:.2f} (limit 1.5x).")
    lines += ["", "Grids (one row per class): " + ", ".join(f"`{f}`" for f in files), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist", choices=["digits", "mnist"])
    p.add_argument("--runs", default="runs/guidance", help="folder of the runs trained here")
    p.add_argument("--class-run"), p.add_argument("--text-run")
    p.add_argument("--minutes", type=float, default=0.0, help="train a missing run for this many minutes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scales", default="1,1.5,2,3,4,6")
    p.add_argument("--interval", default="0.2,3", help="sigma_lo,sigma_hi for the interval rows ('' to skip)")
    p.add_argument("--interval-scales", default="3,6")
    p.add_argument("--classifier-steps", type=int, default=600, help="noise-conditional classifier steps (0: skip)")
    p.add_argument("--classifier-scale", type=float, default=2.0)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--sampler", default="dpmpp_2m"), p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for JSON and PNGs (default RUNS/bench-DATA)")
    p.add_argument("--doc", default=None, help="markdown report (default OUT/report.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.scales = [float(s) for s in args.scales.split(",")]
    args.interval = [float(s) for s in args.interval.split(",")] if args.interval else None
    args.interval_scales = [float(s) for s in args.interval_scales.split(",")]
    out = args.out or os.path.join(args.runs, f"bench-{args.data}")
    os.makedirs(out, exist_ok=True)
    command = "python bench/guidance.py " + " ".join(argv if argv is not None else sys.argv[1:])

    data = load_dataset(args.data, "all")
    evaluator = load_classifier(args.data)
    ref, _ = classify(evaluator, data.images)
    labels = torch.arange(data.num_classes).repeat_interleave(args.n_per_class)
    rows, grids, train_info = [], {}, {}

    for kind in ("cond", "text"):
        given = getattr(args, f"{'class' if kind == 'cond' else 'text'}_run")
        run = given or os.path.join(args.runs, f"{args.data}-{kind}")
        run = ensure_run(f"{args.data}-{kind}", run, args.minutes, args.threads)
        model, cfg = load_model(run, device=args.device)
        meta = read_meta(find_checkpoint(run))
        args.shape = meta["data"]["shape"]
        name = "class" if kind == "cond" else "text (held-out captions)"
        train_info[name] = (f"run {run}, preset {cfg.name}, step {meta.get('step')}, "
                            f"{training_seconds(run):.0f} s of training")
        if kind == "cond":
            cond = {"class_labels": labels}
            extra = None
            if args.classifier_steps:
                from unifuse.nets.classifier import NoisyClassifier
                from unifuse.training.classifier import accuracy, train_classifier

                t0 = time.time()
                torch.manual_seed(0)  # the classifier's initial weights
                clf = NoisyClassifier(model.path, in_channels=args.shape[0], num_classes=data.num_classes)
                train_classifier(clf, data.images, data.labels, steps=args.classifier_steps,
                                 generator=torch.Generator().manual_seed(0))
                clf = clf.to(args.device)
                train_info["noise-conditional classifier"] = (
                    f"{args.classifier_steps} steps in {time.time() - t0:.0f} s, "
                    f"clean accuracy {accuracy(clf, data.images, data.labels):.3f}")
                guided = G.classifier_guidance(model, clf, args.classifier_scale, pass_labels=True)
                extra = (f"classifier guidance s={args.classifier_scale:g} on the conditional model", guided)
        else:
            from unifuse.data.text import encode

            caps = captions_for(labels, "heldout", torch.Generator().manual_seed(0))
            emb = encode(caps)
            cond, extra = {"text": emb.tokens, "text_mask": emb.mask}, None
        sweep(name, model, cond, labels, args, evaluator, ref, rows, grids, extra)

    files = []
    for name in ("class", "text (held-out captions)"):
        _, top = best(rows, name)
        extra = [r["setting"] for r in rows if r["model"] == name and r["setting"].startswith("classifier guidance")]
        for setting in dict.fromkeys(["conditional", top["setting"]] + extra):
            x = grids[(name, setting)]
            k = args.n_per_class
            cols = min(k, 12)
            pick = torch.cat([x[c * k:c * k + cols] for c in range(data.num_classes)])
            while pick.shape[-1] < 64:  # nearest-neighbour upscaling so small digits stay visible
                pick = pick.repeat_interleave(2, -1).repeat_interleave(2, -2)
            tag = setting.split(',')[0].split(' on ')[0].replace(' ', '').replace('=', '')
            fname = os.path.join(out, f"grid-{name.split()[0]}-{tag}.png")
            files.append(save_image_grid(pick, fname, nrow=cols))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": rows, "train": train_info, "command": command}, f, indent=1)
    text = markdown(rows, args, command, train_info, files)
    doc = args.doc or os.path.join(out, "report.md")
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

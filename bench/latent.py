"""Latent against pixel diffusion on MNIST-5k per CPU-minute: recipes side by side after 5, 10 and 20 minutes.

    python bench/latent.py                                           # mnist-latent and mnist-ddpm (pixels), 5/10/20 min
    python bench/latent.py --recipes latent pixel --minutes 20       # chosen recipes, one budget
    python bench/latent.py --label w512 --preset mnist-latent --set model.net_options.width=512 --minutes 5 \\
        --ae runs/bench-latent/ae-3min                               # a screen of the diffusion stage alone
    python bench/latent.py --report                                  # rewrite the page from the JSON

Each run trains in its own process (`unifuse train PRESET --minutes M --set train.clock=process`, one thread: the
budget is CPU time, the autoencoder's included for a latent preset) and is then measured here: FD of decoded samples
to the held-out split over the i.i.d. real-vs-real floor, as the mean of --seeds draws of --n samples at --nfe
(the preset's sampler); the share of samples the classifier recognises (p >= 0.9), overall and per predicted class
(the fewest in brackets); for latent runs the autoencoder's reconstruction FD / floor (the ceiling); peak memory of
the training process; sampling images per second (one thread). `--ae RUN` reuses a trained autoencoder
(data.latent=RUN): the budget is then the diffusion stage's alone, for screening its recipe on one autoencoder.
Results: docs/benchmarks/latent.json (merged by label and budget) and docs/benchmarks/latent.md with PNG grids.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DOCS = os.path.join(ROOT, "docs", "benchmarks")
# label -> (preset, overrides): the recipes the issue compares; --preset/--set/--label adds another
RECIPES = {
    "latent": ("mnist-latent", []),
    "pixel": ("mnist-pixel", []),
    "pixel-ddpm": ("mnist-ddpm", []),
}


def train_run(preset: str, overrides: list, out: str, minutes: float, ae: str | None) -> dict:
    """Train one run in a child process on one thread; its steps, CPU seconds and peak RSS (os.wait4)."""
    cmd = [sys.executable, "-m", "unifuse.cli", "train", preset, "--out", out, "--minutes", str(minutes),
           "--set", "train.clock=process", "--set", "train.threads=1", "--set", "train.device=cpu"]
    if ae:
        cmd += ["--set", f"data.latent={ae}"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(os.path.join(os.path.dirname(out), os.path.basename(out) + ".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"training failed (exit {status}); see {out}.log")
    steps = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl")) if '"end"' in ln][-1]["step"]
    return dict(steps=steps, train_wall_s=round(time.time() - t0, 1),
                train_cpu_s=round(usage.ru_utime + usage.ru_stime, 1), peak_rss_mb=round(usage.ru_maxrss / 1024))


def measure(run: str, n: int, nfe: int, seeds: int) -> dict:
    """FD / floor of `seeds` draws of n decoded samples, recognition per class, the autoencoder's ceiling, and
    sampling speed; a 10x10 grid of the first draw beside the results page."""
    import torch

    from unifuse.training.checkpoint import find_checkpoint, load_model, read_meta
    from unifuse.training.evaluate import pixel_config, reconstruction_metrics, sample_metrics
    from unifuse.training.plots import save_grid
    from unifuse.training.sampling import generate

    torch.set_num_threads(1)
    folder = find_checkpoint(run)
    model, cfg = load_model(folder)
    info = read_meta(folder)["data"]
    draws, seconds = [], []
    for seed in range(seeds):
        t0 = time.process_time()
        x, labels = generate(model, cfg.sample, info, n, conditioning=cfg.data.cond, seed=seed, nfe=nfe)
        seconds.append(time.process_time() - t0)
        draws.append(sample_metrics(x, labels, info, pixel_config(cfg), seed))
        if seed == 0:
            grid = os.path.join(DOCS, "img", f"latent-{os.path.basename(run)}.png")
            save_grid(x[:100], grid, nrow=10)
    ratios = [d["fd_ratio"] for d in draws]
    first = draws[0]
    out = dict(fd_ratio=sum(ratios) / seeds, fd_ratios=ratios, fd_floor=first["fd_floor"],
               recognised=sum(d["recognised"] for d in draws) / seeds,
               recognised_per_class=[min(c) for c in zip(*(d["recognised_per_class"] for d in draws))],
               sampler=cfg.sample.sampler, nfe=nfe, n=n, seeds=seeds, images_per_s=round(n * seeds / sum(seconds), 1),
               grid=os.path.relpath(grid, DOCS), latent=bool(info.get("latent")))
    if info.get("latent"):
        ae = reconstruction_metrics(cfg, info, n, 0)
        out["autoencoder_fd_ratio"], out["autoencoder_psnr"] = ae["fd_ratio"], ae.get("psnr")
    return out


def report(results: list, command: str) -> None:
    """docs/benchmarks/latent.md: one row per (label, budget), sorted."""
    from unifuse.io import write_text

    lines = ["# Latent against pixel diffusion on MNIST-5k", "",
             f"Written {datetime.date.today()} on {cpu_name()}, one thread per run, "
             f"process clock. Last command: `{command}`", "",
             "FD / floor: mean of the draws (each draw in brackets); recognised: share with classifier p >= 0.9, and "
             "the lowest per-class share (per predicted class, lowest over draws); AE: the autoencoder's "
             "reconstruction FD / floor.", "",
             "| recipe | preset and overrides | CPU-min | steps | FD / floor | recognised (lowest class) | AE | "
             "peak MB | images/s | grid |", "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r["label"], r["minutes"])):
        ae = f"{r['autoencoder_fd_ratio']:.2f}" if "autoencoder_fd_ratio" in r else ""
        what = " ".join([r["preset"], *r["overrides"]] + ([f"data.latent={r['ae']}"] if r.get("ae") else []))
        lines.append(f"| {r['label']} | `{what}` | {r['minutes']:g} | {r['steps']} | **{r['fd_ratio']:.2f}** "
                     f"({', '.join(f'{v:.2f}' for v in r['fd_ratios'])}) | {100 * r['recognised']:.0f}% "
                     f"({100 * min(r['recognised_per_class']):.0f}%) | {ae} | {r['peak_rss_mb']} | "
                     f"{r['images_per_s']} | [grid]({r['grid']}) |")
    notes = sorted({r["note"] for r in results if r.get("note")})
    lines += ["", "Commands that produced the rows (run from a copy of the repository; `--runs` is where the runs went):",
              ""] + [f"- `{c}`" for c in sorted({r["command"] for r in results})] + [f"- note: {n}" for n in notes]
    write_text(os.path.join(DOCS, "latent.md"), "\n".join(lines) + "\n")


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)"
    except (OSError, IndexError):
        return platform.machine()


def load_results() -> list:
    path = os.path.join(DOCS, "latent.json")
    return json.load(open(path)) if os.path.exists(path) else []


def save(result: dict) -> list:
    from unifuse.io import write_json

    kept = [r for r in load_results() if (r["label"], r["minutes"]) != (result["label"], result["minutes"])]
    write_json(os.path.join(DOCS, "latent.json"), kept + [result])
    return kept + [result]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["latent", "pixel-ddpm"], choices=list(RECIPES))
    p.add_argument("--label", help="an ad-hoc recipe's name (with --preset and --set)")
    p.add_argument("--preset", help="the ad-hoc recipe's preset")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--ae", help="a trained autoencoder run: screen the diffusion stage on it (data.latent=AE)")
    p.add_argument("--minutes", nargs="+", type=float, default=[5, 10, 20])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "bench-latent"))
    p.add_argument("--report", action="store_true", help="only rewrite the page from docs/benchmarks/latent.json")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    command = "python bench/latent.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.report:
        report(load_results(), command)
        return 0
    recipes = ({args.label: (args.preset, args.overrides)} if args.label
               else {k: (RECIPES[k][0], RECIPES[k][1] + args.overrides) for k in args.recipes})
    os.makedirs(args.runs, exist_ok=True)
    for label, (preset, overrides) in recipes.items():
        for minutes in args.minutes:
            run = os.path.join(args.runs, f"{label}-{minutes:g}min")
            result = dict(label=label, preset=preset, overrides=overrides, ae=args.ae, minutes=minutes,
                          date=str(datetime.date.today()), command=command)
            result.update(train_run(preset, overrides, run, minutes, args.ae))
            result.update(measure(run, args.n, args.nfe, args.seeds))
            print(f"{label} {minutes:g} min: {result['steps']} steps, FD/floor {result['fd_ratio']:.2f} "
                  f"{[round(v, 2) for v in result['fd_ratios']]}, recognised {100 * result['recognised']:.0f}% "
                  f"(lowest class {100 * min(result['recognised_per_class']):.0f}%)", flush=True)
            report(save(result), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

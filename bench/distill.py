"""Distillation at equal CPU time: every method of `unifuse.distill` from one teacher run, measured at 1, 2 and 4
steps against the teacher at 50 NFE.

    python bench/distill.py                                        # digits: 5-min teacher, 10 CPU-min per method
    python bench/distill.py --data mnist --teacher-minutes 20 --minutes 10
    python bench/distill.py --data toy-8gaussians --minutes 2      # 2-D: sliced Wasserstein instead of FD
    python bench/distill.py --methods cd,sct --minutes 2 --jobs 2 --set optim.lr=1e-4

The teacher is trained once (`unifuse train DATA --minutes M --set train.clock=process`) unless --teacher names a
run. Each method distils for --minutes of its own process's CPU time on one thread (two jobs at once are fair on
two cores: OMP_WAIT_POLICY=PASSIVE, one thread each). Images: Frechet distance of n samples to the held-out split in
the pinned classifier's features (`training.demo.heldout_fd`), averaged over seeds, beside the real-vs-real floor;
2-D data: sliced Wasserstein distance to fresh true samples (`metrics.evaluate_toy`). Images per second at sampling
are measured on one thread. Results: docs/benchmarks/distill.md, a JSON file and a PNG of FD against steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import CPU, ROOT, run_jobs, train_base, unifuse

sys.path.insert(0, ROOT)
METHODS = ("progressive", "cd", "cft", "sct", "scd", "reflow", "instaflow", "dmd")


def command(method: str, teacher: str, out: str, minutes: float, overrides: list, data: str = "") -> list:
    """One distillation (or, for "scratch-FAMILY", the few-step family DATA-FAMILY trained from scratch for the
    teacher's and the distillation's CPU time together)."""
    if method.startswith("scratch-"):
        return unifuse("train", f"{data}-{method.removeprefix('scratch-')}", "--out", out, "--minutes", str(minutes), *CPU)
    cmd = unifuse("distill", method, "--teacher", teacher, "--out", out, "--minutes", str(minutes), *CPU)
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def measure(run: str, nfe: int | None, n: int, seeds: int, sampler: str | None = None) -> dict:
    """Quality of n samples of `run` at `nfe` (mean over seeds) and images per second on one thread."""
    import torch

    from unifuse.training.checkpoint import find_checkpoint, load_model, read_meta
    from unifuse.training.sampling import generate

    torch.set_num_threads(1)
    folder = find_checkpoint(run)
    info = read_meta(folder)["data"]
    model, cfg = load_model(folder, nfe=nfe)
    if cfg.distill.method:  # the method's sampler grid as this version defines it (the weights do not depend on it)
        from dataclasses import replace

        from unifuse.distill import get

        spacing = getattr(get(cfg.distill.method, **cfg.distill.options), "spacing", "") or ""
        cfg = replace(cfg, sample=replace(cfg.sample, spacing=spacing))
    values, seconds = [], 0.0
    for seed in range(seeds):
        start = time.process_time()
        x, _ = generate(model, cfg.sample, info, n, conditioning=cfg.data.cond, seed=seed, sampler=sampler, nfe=nfe)
        seconds += time.process_time() - start
        values.append(quality(x, info))
    keys = values[0].keys()
    out = {k: sum(v[k] for v in values) / len(values) for k in keys}
    return dict(out, images_per_s=round(n * seeds / max(seconds, 1e-9), 1), nfe=nfe or cfg.sample.nfe,
                sampler=sampler or cfg.sample.sampler, spacing=cfg.sample.spacing, step=read_meta(folder)["step"])


def quality(x, info: dict) -> dict:
    from unifuse import metrics
    from unifuse.training.demo import heldout_fd

    if x.ndim != 4:
        r = metrics.evaluate_toy(x, info["name"])
        return {"value": r["swd"], "floor": r["swd_floor"]}
    r = heldout_fd(x, info["name"], floor_repeats=20)
    return {"value": r["fd_heldout"], "floor": r["fd_floor"]}


def evaluate_all(teacher: str, out: str, methods, n: int, seeds: int, teacher_nfe: int, log) -> dict:
    from unifuse.distill.loop import supported_nfe

    results = {"teacher": measure(teacher, teacher_nfe, n, seeds)}
    log(f"teacher at {teacher_nfe} NFE: {results['teacher']['value']:.4g} (floor {results['teacher']['floor']:.4g})")
    for m in methods:
        run = os.path.join(out, m)
        if not os.path.isdir(os.path.join(run, "ckpt")):
            continue
        cfg = load_cfg(run)
        ks = [k for k in (1, 2, 4) if not supported_nfe(cfg) or k in supported_nfe(cfg)]
        results[m] = {str(k): measure(run, k, n, seeds) for k in ks}
        log(f"{m}: " + ", ".join(f"{k} step(s) {r['value']:.4g}" for k, r in results[m].items()))
    return results


def load_cfg(run: str):
    from unifuse.config import from_dict
    from unifuse.training.checkpoint import find_checkpoint, read_meta

    return from_dict(read_meta(find_checkpoint(run))["config"])


def report(results: dict, args, out_md: str) -> None:
    t = results["teacher"]
    metric = "FD (held-out)" if "toy" not in args.data else "SWD"
    lines = [f"# Distillation at equal CPU time: {args.data}", "",
             f"{time.strftime('%Y-%m-%d')}; machine: {os.uname().machine}, {os.cpu_count()} cores; command: "
             f"`python bench/distill.py {' '.join(sys.argv[1:])}`", "",
             f"Teacher `{args.teacher}` at {t['nfe']} NFE ({t['sampler']}): {metric} {t['value']:.4g}, floor "
             f"{t['floor']:.4g}, {t['images_per_s']} images/s. Each method: {args.minutes} CPU-minutes of "
             f"distillation on one thread (scratch-F: the few-step family F trained from scratch for the teacher's "
             f"{args.teacher_minutes} and those {args.minutes} CPU-minutes together); {args.n} samples x {args.seeds} seeds.", "",
             f"| method | steps trained | {metric} 1 step | 2 steps | 4 steps | ratio to teacher (1 / 2 / 4) | "
             "images/s at 1 step |", "|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        if m == "teacher":
            continue
        cells = [f"{r[k]['value']:.4g}" if k in r else "-" for k in ("1", "2", "4")]
        ratios = " / ".join(f"{r[k]['value'] / t['value']:.2f}" if k in r else "-" for k in ("1", "2", "4"))
        first = next(iter(r.values()))
        ips = r["1"]["images_per_s"] if "1" in r else "-"
        lines.append(f"| {m} | {first['step']} | {' | '.join(cells)} | {ratios} | {ips} |")
    from unifuse.io import write_text

    write_text(out_md, "\n".join(lines) + "\n")


def plot(results: dict, png: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unifuse.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    t = results["teacher"]
    ax.axhline(t["value"], color="k", ls="--", label=f"teacher, {t['nfe']} NFE")
    ax.axhline(t["floor"], color="gray", ls=":", label="real-vs-real floor")
    for m, r in results.items():
        if m != "teacher":
            ks = sorted(int(k) for k in r)
            ax.plot(ks, [r[str(k)]["value"] for k in ks], "o-", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="digits, mnist or toy-NAME")
    p.add_argument("--teacher", help="teacher run folder (default: runs/bench-distill/DATA/teacher, trained once)")
    p.add_argument("--teacher-minutes", type=float, default=5.0)
    p.add_argument("--teacher-nfe", type=int, default=50)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--scratch", default="meanflow,shortcut", help="few-step families trained from scratch for the "
                                                                  "teacher's and one distillation's CPU time")
    p.add_argument("--minutes", type=float, default=10.0, help="CPU-minutes of distillation per method")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--report", default=None, help="markdown file (default: docs/benchmarks/distill-DATA.md)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(ROOT, "runs", "bench-distill", args.data)
    os.makedirs(out, exist_ok=True)
    args.teacher = args.teacher or os.path.join(out, "teacher")
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)
    train_base(args.data, args.teacher, args.teacher_minutes, log)
    methods = [m for m in args.methods.split(",") if m] + [f"scratch-{f}" for f in args.scratch.split(",") if f]
    minutes = {m: args.minutes + (args.teacher_minutes if m.startswith("scratch-") else 0.0) for m in methods}
    queue = [(m, command(m, args.teacher, os.path.join(out, m), minutes[m], args.overrides, args.data), os.path.join(out, m))
             for m in methods]
    errors = run_jobs(queue, args.jobs, log)
    results = evaluate_all(args.teacher, out, methods, args.n, args.seeds, args.teacher_nfe, log)
    results["errors"] = {m: e for m, e in errors.items() if e}
    from unifuse.io import write_json

    md = args.report or os.path.join(ROOT, "docs", "benchmarks", f"distill-{args.data}.md")
    write_json(md.replace(".md", ".json"), results)
    errs = results.pop("errors")
    report(results, args, md)
    plot(results, md.replace(".md", ".png"), "FD (held-out)" if "toy" not in args.data else "SWD")
    for m, e in errs.items():
        log(f"{m} failed: {e}")
    log(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

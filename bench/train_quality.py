"""Training quality per CPU minute: for each family on digits and MNIST-5k, the Frechet distance (classifier
features) of samples to the held-out split after a fixed CPU time, beside the real-vs-real floor with the same
number of images, and the peak memory of the run.

    python bench/train_quality.py                                  # digits, 5 min per family, 1 thread
    python bench/train_quality.py --datasets mnist --minutes 20    # the MNIST-5k sweep
    python bench/train_quality.py --families edm rf --minutes 2 --set optim.lr=2e-3
    python bench/train_quality.py --jobs 2                         # two runs at once (one thread each)

Each (family, data set) runs in its own process (so peak memory is per run); results go to
docs/benchmarks/training.md (and a JSON file beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FAMILIES = ("ddpm", "iddpm", "vpsde", "vesde", "edm", "rf", "trigflow", "ct")
# Sample seeds per run: the FD of 1,000 samples varies by ~25% between seeds (mostly the multinomial class counts),
# so digits (2 s per draw) averages 10 and MNIST-5k (minutes per draw) 3. UNIFUSE_BENCH_SEEDS overrides both.
SEEDS = {"digits": 10, "mnist": 3}


def run_one(family: str, dataset: str, minutes: float, threads: int, n: int, nfe: int, sampler: str | None,
            overrides: list, out: str, precision: str | None, img_dir: str) -> dict:
    """Train `dataset-family` for `minutes` of this process's CPU time (robust on a shared machine; with one
    thread it is the time an idle core would take), sample n images, measure them."""
    import torch

    torch.set_num_threads(threads)
    from unifuse.config import CT_STAGE_FRACTION, apply_overrides, get_config
    from unifuse.training import train

    name = dataset if family == "default" else f"{dataset}-{family}"
    cfg = get_config(name, overrides)
    # A fixed time budget: the run stops on the CPU clock; ECT's stage length follows from the rate measured on a
    # few warm-up steps, so that its schedule spans the run as in the preset.
    rate = measure_rate(cfg)
    expected = max(10, int(rate * minutes * 60))
    steps = 3 * expected  # the time budget, not the step count, ends the run
    extra = [f"train.steps={steps}", f"train.minutes={minutes}", "train.clock=process", "train.device=cpu",
             f"train.ckpt_every={steps}", f"train.threads={threads}"]
    if precision:
        extra.append(f"train.precision={precision}")
    if cfg.objective.name == "ct":
        stages = int(os.environ.get("UNIFUSE_BENCH_CT_STAGES", CT_STAGE_FRACTION))
        extra.append(f"objective.options.stage_every={max(1, expected // stages)}")
    cfg = apply_overrides(cfg, extra)
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    t0, c0 = time.time(), time.process_time()
    summary = train(cfg, out, progress=False, log=lambda *a: None)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
    report = measure(out, family, dataset, n, nfe, sampler, img_dir)
    report.update(steps=summary["step"], train_s=round(train_s, 1), train_cpu_s=round(train_cpu_s, 1), threads=threads,
                  precision=cfg.train.precision, loss=summary["loss"],
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return report


def measure(out: str, family: str, dataset: str, n: int, nfe: int, sampler: str | None, img_dir: str) -> dict:
    """Sample n images from the trained run `out` three times (the current preset's sampler settings unless
    `sampler` is given) and measure them against the held-out split; write the grid beside the results page."""
    import torch

    from unifuse.training.demo import heldout_fd

    name = dataset if family == "default" else f"{dataset}-{family}"
    seeds = int(os.environ.get("UNIFUSE_BENCH_SEEDS", SEEDS.get(dataset, 3)))
    t0 = time.time()
    draws, info, sampler, clip = sample_run(out, name, n, range(seeds), sampler, nfe)
    sample_s = (time.time() - t0) / seeds
    reports = [heldout_fd(x, info["name"]) for x in draws]
    x = draws[0]
    fds = [r["fd_heldout"] for r in reports]
    report = dict(reports[0], fd_heldout=sum(fds) / seeds, fd_seeds=fds,
                  fd_sd=float(torch.tensor(fds, dtype=torch.float64).std()))
    report["fd_ratio"] = report["fd_heldout"] / report["fd_floor"]
    report.update(family=family, dataset=dataset, preset=name, sample_s=round(sample_s, 1),
                  sampler=sampler, nfe=nfe, n=n, clip_denoised=clip)
    try:
        from unifuse.metrics import evaluate_images
        ev = evaluate_images(x, info["name"])
        report.update(fd_train=ev["fd"], precision_knn=ev["precision"], recall_knn=ev["recall"],
                      class_hist=ev["class_hist"], recognised=ev["recognised"], recognised_hist=ev["recognised_hist"],
                      recognised_n=int(x.shape[0]))
    except Exception as err:  # metrics are a bonus here
        report["metrics_error"] = str(err)
    from unifuse.training.plots import save_grid
    save_grid(x[:100], os.path.join(out, "grid.png"), nrow=10)
    # A copy beside the results page (runs/ is not kept in the repository).
    grid = os.path.join(img_dir, f"training-{dataset}-{family}.png")
    save_grid(x[:100], grid, nrow=10)
    report["grid"] = os.path.relpath(grid, os.path.dirname(img_dir))
    return report


def remeasure(run: str, family: str, dataset: str, n: int, nfe: int, sampler: str | None, img_dir: str,
              known: dict) -> dict:
    """`measure` again for a trained run (e.g. after a preset's sampler settings changed), keeping its training
    figures from result.json, from `known` (the results JSON) or, failing both, from its metrics.jsonl."""
    import yaml

    from unifuse.io import write_json

    path = os.path.join(run, "result.json")
    old = _load(path) if os.path.exists(path) else dict(known)
    if "steps" not in old:  # only the run folder: its log and config
        lines = [json.loads(ln) for ln in _read(os.path.join(run, "metrics.jsonl")).splitlines()]
        end = [ln for ln in lines if ln.get("event") == "end"][-1]
        cfg = yaml.safe_load(_read(os.path.join(run, "config.yaml")))
        old.update(steps=end["step"], train_s=round(end["seconds"], 1),
                   train_cpu_s=round(cfg["train"]["minutes"] * 60, 1), threads=cfg["train"]["threads"],
                   precision=cfg["train"]["precision"],
                   loss=[ln["loss"] for ln in lines if "loss" in ln][-1], peak_rss_mb=known.get("peak_rss_mb", 0.0))
    new = measure(run, family, dataset, n, nfe, sampler, img_dir)
    merged = dict(old, **new)
    write_json(path, merged)
    return merged


def sample_run(run: str, preset_name: str, n: int, seeds, sampler: str | None, nfe: int):
    """(n samples per seed, the run's data info, the sampler, the x0 clip) from a trained run, with the current
    preset's sampler and clipping unless `sampler` is given (runs trained with an older preset included)."""
    from unifuse.config import get_config
    from unifuse.training import load_model
    from unifuse.training.checkpoint import find_checkpoint, read_meta
    from unifuse.training.sampling import generate

    preset = get_config(preset_name).sample
    sampler = sampler or preset.sampler
    model, cfg = load_model(run)
    info = read_meta(find_checkpoint(run))["data"]
    draws = [generate(model, cfg.sample, info, n, conditioning=cfg.data.cond, seed=s, sampler=sampler, nfe=nfe,
                      clip_denoised=preset.clip_denoised, threshold_percentile=preset.threshold_percentile)[0]
             for s in seeds]
    return draws, info, sampler, preset.clip_denoised


def recognise(run: str, n: int) -> dict:
    """Add the classifier's recognised fraction and per-class counts of n samples (seed 0, the run's measured
    sampler) to a run's result.json."""
    from unifuse.io import write_json
    from unifuse.metrics import evaluate_images

    path = os.path.join(run, "result.json")
    r = _load(path)
    (x,), info, _, _ = sample_run(run, r["preset"], n, [0], r["sampler"], r["nfe"])
    ev = evaluate_images(x, info["name"])
    r.update(recognised=ev["recognised"], recognised_hist=ev["recognised_hist"], recognised_n=n)
    write_json(path, r)
    return r


def measure_rate(cfg, steps: int = 4) -> float:
    """Optimizer steps per CPU-second of this config on this process's threads (after one warm-up step)."""
    import torch

    from unifuse.training.build import build_data, build_model, build_net, build_objective, data_info

    data = build_data(cfg)
    net = build_net(cfg, data_info(data))
    model, objective = build_model(cfg, net), build_objective(cfg, data)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    g = torch.Generator().manual_seed(0)
    x = data.images[: cfg.data.batch]
    cond = {"class_labels": data.labels[: cfg.data.batch]} if cfg.data.cond == "class" else {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    for i in range(steps + 1):
        if i == 1:
            t0 = time.process_time()
        with autocast:
            loss = objective(model, x, cond, generator=g).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.process_time() - t0)


def write_markdown(results: list, path: str, command: str, note: str) -> None:
    """Write the results table between `<!-- sweep:DATA -->` markers of `path`, keeping the rest of the page
    (so the digits and MNIST sweeps, run at different times, share one page)."""
    import datetime

    from unifuse.io import write_text

    for dataset in sorted({r["dataset"] for r in results}):
        rows = [r for r in results if r["dataset"] == dataset]
        lines = [f"<!-- sweep:{dataset} -->", f"Command: `{command}` (run {datetime.date.today()})", ""]
        if note:
            lines += [note, ""]
        lines += ["| family | steps | CPU s | wall s | sampler | NFE | n x seeds | FD held-out | floor (i.i.d.) | "
                  "ratio | "
                  "ratio to the subset floor | recognised (fewest in a class) | peak RSS MB | grid |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['family']} | | | | | | | error: {r['error']} | | | | | | |")
                continue
            recognised = (f"{100 * r['recognised']:.0f}% of {r.get('recognised_n', r['n'])} "
                          f"({min(r['recognised_hist'])})"
                          if "recognised_hist" in r else "")
            clip = " + clip" if r.get("clip_denoised") else ""
            lines.append(f"| {r['family']} | {r['steps']} | {r['train_cpu_s']} | {r['train_s']} | {r['sampler']}{clip} "
                         "| "
                         f"{r['nfe']} | {r['n']} x {len(r['fd_seeds'])} | {r['fd_heldout']:.3f} +- {r['fd_sd']:.3f} | "
                         f"{r['fd_floor']:.3f} | {r['fd_ratio']:.2f} | {r['fd_heldout'] / r['fd_floor_subset']:.2f} | "
                         f"{recognised} | {r['peak_rss_mb']} | [grid]({r['grid']}) |")
        lines.append(f"<!-- /sweep:{dataset} -->")
        block = "\n".join(lines)
        page = _read(path) if os.path.exists(path) else "# Training quality per CPU minute\n"
        start, end = f"<!-- sweep:{dataset} -->", f"<!-- /sweep:{dataset} -->"
        if start in page and end in page:
            page = page[:page.index(start)] + block + page[page.index(end) + len(end):]
        else:
            page = page.rstrip("\n") + "\n\n" + block + "\n"
        write_text(path, page)


def floors(n: int = 1000, repeats: int = 100) -> None:
    """Print the real-vs-real floors of n training images against the held-out split, drawn three ways: a subset
    without replacement (class counts nearly fixed), class counts multinomial with each class's images drawn
    without replacement, and i.i.d. with replacement (the floor the benchmark uses)."""
    import torch

    from unifuse.data import load_dataset
    from unifuse.metrics import frechet_distance
    from unifuse.metrics.frechet import reference_features

    for dataset in ("digits", "mnist"):
        f_train, f_held = reference_features(dataset, "train"), reference_features(dataset, "heldout")
        labels = torch.as_tensor(load_dataset(dataset, "train").labels)
        pools = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
        g = torch.Generator().manual_seed(0)
        for name in ("subset without replacement", "multinomial class counts", "i.i.d. with replacement"):
            v = torch.tensor([frechet_distance(f_train[_real_draw(name, n, pools, g)], f_held) for _ in range(repeats)],
                             dtype=torch.float64)
            print(f"{dataset} ({len(f_train)} train, {len(f_held)} held-out), n = {n}, {name}: "
                  f"FD {v.mean():.4f} +- {v.std():.4f} (sd of one draw, {repeats} draws)", flush=True)
        # The same subset floor after random re-splits that are not stratified: the class proportions of the
        # held-out images then move too.
        f_all = torch.cat([f_train, f_held])
        v = []
        for _ in range(repeats // 2):
            perm = torch.randperm(len(f_all), generator=g)
            held, train = f_all[perm[:len(f_held)]], f_all[perm[len(f_held):]]
            v.append(frechet_distance(train[torch.randperm(len(train), generator=g)[:n]], held))
        v = torch.tensor(v, dtype=torch.float64)
        print(f"{dataset}, random re-splits (not stratified), subset without replacement: FD {v.mean():.4f} +- "
              f"{v.std():.4f} ({repeats // 2} re-splits)", flush=True)


def _real_draw(how: str, n: int, pools: list, g):
    """Indices of n training images drawn `how`; pools holds each class's indices."""
    import torch

    total = sum(len(q) for q in pools)
    if how == "subset without replacement":
        return torch.randperm(total, generator=g)[:n]
    if how == "i.i.d. with replacement":
        return torch.randint(total, (n,), generator=g)
    p = torch.tensor([len(q) for q in pools], dtype=torch.float64)
    counts = torch.bincount(torch.multinomial(p, n, replacement=True, generator=g), minlength=len(pools))
    return torch.cat([q[torch.randperm(len(q), generator=g)[:k]] for q, k in zip(pools, counts.tolist())])


def save_results(results: list, path: str) -> None:
    """Write `results` into the JSON file at `path`, replacing earlier entries of the same data set and family
    and keeping the others (each sweep fills in its own rows)."""
    from unifuse.io import write_json

    kept = _load(path) if os.path.exists(path) else []
    new = {(r["dataset"], r["family"]) for r in results}
    merged = [r for r in kept if (r.get("dataset"), r.get("family")) not in new] + results
    write_json(path, merged)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=["digits", "mnist"])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=[*FAMILIES, "default"])
    p.add_argument("--minutes", type=float, help="training minutes per run (default: 5 digits, 20 mnist)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--n", type=int, default=1000, help="samples per run")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--sampler", help="sampler for every family (default: each preset's; ct uses consistency at its "
                                     "NFE)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "bench-train"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "training.md"))
    p.add_argument("--note", default="")
    p.add_argument("--remeasure", action="store_true",
                   help="no training: sample and measure the trained runs under --runs again (current preset settings)")
    p.add_argument("--collect", action="store_true",
                   help="no training: rebuild the report from the runs' result.json files under --runs")
    p.add_argument("--recognise", action="store_true",
                   help="no training: add the recognised-digit counts of --n samples to runs measured without them")
    p.add_argument("--floors", action="store_true", help="print the real-vs-real floors drawn three ways and stop")
    p.add_argument("--img", default=os.path.join(ROOT, "docs", "benchmarks", "img"), help=argparse.SUPPRESS)
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "DATASET"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.floors:
        floors(args.n)
        return 0
    if args.one:
        one(args)
        return 0
    if args.recognise:
        recognise_all(args)
    if args.remeasure:
        remeasure_all(args)
    if args.recognise or args.remeasure or args.collect:
        collect(args, argv)
        return 0
    results = sweep(args)
    save_results(results, os.path.splitext(args.out)[0] + ".json")
    command = "python bench/train_quality.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    write_markdown(results, args.out, command.strip(), args.note)
    print(f"wrote {args.out}")
    return 0


def one(args) -> None:
    """--one FAMILY DATASET: train and measure one run (in its own process), print its result."""
    from unifuse.io import write_json

    family, dataset = args.one
    minutes = args.minutes or (5.0 if dataset == "digits" else 20.0)
    nfe = args.nfe if family != "ct" else 2
    r = run_one(family, dataset, minutes, args.threads, args.n, nfe, args.sampler if family != "ct" else None,
                args.overrides, os.path.join(args.runs, f"{dataset}-{family}"), args.precision, args.img)
    # kept with the run, so a report can be rebuilt (--collect)
    write_json(os.path.join(args.runs, f"{dataset}-{family}", "result.json"), r)
    print("RESULT " + json.dumps(r))


def recognise_all(args) -> None:
    """Runs measured before `recognised` existed: classify n fresh samples (seed 0)."""
    import torch

    torch.set_num_threads(args.threads)
    for dataset in args.datasets:
        for family in args.families:
            path = os.path.join(args.runs, f"{dataset}-{family}", "result.json")
            if os.path.exists(path) and "recognised_hist" not in _load(path):
                r = recognise(os.path.dirname(path), args.n)
                print(f"   {dataset}-{family}: recognised {r['recognised']:.3f}, per class {r['recognised_hist']}",
                      flush=True)


def remeasure_all(args) -> None:
    """Sample and measure every trained run under --runs again."""
    import torch

    known = _known(args.out)
    for dataset in args.datasets:
        for family in args.families:
            run = os.path.join(args.runs, f"{dataset}-{family}")
            if not os.path.isdir(os.path.join(run, "ckpt")):
                print(f"   {dataset}-{family}: no trained run under {run}", flush=True)
                continue
            nfe = args.nfe if family != "ct" else 2
            torch.set_num_threads(args.threads)
            r = remeasure(run, family, dataset, args.n, nfe, args.sampler if family != "ct" else None, args.img,
                          known.get((dataset, family), {}))
            print(f"   {dataset}-{family}: FD {r['fd_heldout']:.3f}, ratio {r['fd_ratio']:.2f} "
                  f"(clip_denoised {r['clip_denoised']})", flush=True)


def collect(args, argv) -> None:
    """Every family of the data sets: a run's result.json, else its row in the results JSON; write the report."""
    known = _known(args.out)
    results = []
    for d in args.datasets:
        for f in FAMILIES:
            found = os.path.join(args.runs, f"{d}-{f}", "result.json")
            if os.path.exists(found):
                results.append(_load(found))
            elif (d, f) in known:
                results.append(known[(d, f)])
    if not results:
        raise SystemExit(f"no result.json under {args.runs} for {args.datasets} x {args.families}")
    save_results(results, os.path.splitext(args.out)[0] + ".json")
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--note" in shown:  # the note is printed below the command
        del shown[shown.index("--note"):shown.index("--note") + 2]
    write_markdown(results, args.out, "python bench/train_quality.py " + " ".join(shown), args.note)
    print(f"wrote {args.out} ({len(results)} runs)")


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _load(path: str):
    return json.loads(_read(path))


def _known(out: str) -> dict:
    """The results JSON beside the report, by (data set, family)."""
    path = os.path.splitext(out)[0] + ".json"
    return {(r.get("dataset"), r.get("family")): r for r in (_load(path) if os.path.exists(path) else [])}


def sweep(args) -> list:
    """Every (data set, family) run in its own process, up to --jobs at once (each on its own --threads; the
    budget is CPU time, so runs sharing the machine still get the same amount of computation)."""
    jobs = [(dataset, family, _one_command(args, dataset, family))
            for dataset in args.datasets for family in args.families]
    results, running = {}, []
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    while jobs or running:
        while jobs and len(running) < args.jobs:
            dataset, family, cmd = jobs.pop(0)
            print(f"== {dataset}-{family}", flush=True)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            running.append((dataset, family, proc))
        time.sleep(1)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            dataset, family, proc = item
            results[(dataset, family)] = _result(dataset, family, *proc.communicate(), proc.returncode)
    return [results[(d, f)] for d in args.datasets for f in args.families if (d, f) in results]


def _one_command(args, dataset: str, family: str) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", family, dataset, "--threads", str(args.threads),
           "--n", str(args.n), "--nfe", str(args.nfe), "--runs", args.runs,
           "--img", os.path.join(os.path.dirname(os.path.abspath(args.out)), "img")]
    for flag, value in (("--minutes", args.minutes), ("--sampler", args.sampler), ("--precision", args.precision)):
        if value is not None:
            cmd += [flag, str(value)]
    for o in args.overrides:
        cmd += ["--set", o]
    return cmd


def _result(dataset: str, family: str, out: str, err: str, returncode: int) -> dict:
    """A finished run's RESULT line, or its error."""
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if returncode != 0 or not line:
        msg = (err.strip().splitlines() or ["unknown error"])[-1]
        print(f"   {dataset}-{family} error: {msg}", flush=True)
        return {"dataset": dataset, "family": family, "error": msg}
    r = json.loads(line[-1][7:])
    print(f"   {dataset}-{family}: steps {r['steps']}, FD {r['fd_heldout']:.3f}, floor {r['fd_floor']:.3f}, "
          f"ratio {r['fd_ratio']:.2f}, peak {r['peak_rss_mb']} MB", flush=True)
    return r


if __name__ == "__main__":
    sys.exit(main())

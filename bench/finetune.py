"""Reward fine-tuning at equal CPU time: every method of `unifuse.finetune` from one base run, for two rewards.

    python bench/finetune.py                # digits: the 5-minute base; 3 CPU-min per method, 5 for the default
    python bench/finetune.py --methods draft,ddpo --rewards class:3 --minutes 2
    python bench/finetune.py --base runs/teachers/digits --set finetune.lora_rank=8

Each run is `unifuse finetune METHOD --base BASE --reward R --minutes M` on its own process's CPU time, one thread,
two at once. A backpropagation method (draft, draft-lv, refl, alignprop) needs a differentiable reward and is skipped
for compressibility. Measured on n samples drawn with the base's sampler (the same seeds for every model): the mean
reward, the share of the target class by the shipped classifier, the Frechet distance in the classifier's features to
the real images of that class (class:K) or to all training images (other rewards) - for the base model, to its own
samples classified as K - and the KL to the base in nats (the rollout path KL of the last evaluation). A PNG shows
the reward against training CPU minutes per method. Results: docs/benchmarks/finetune-DATA.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import CPU, ROOT, run_jobs, train_base, unifuse

sys.path.insert(0, ROOT)
METHODS = ("default", "ddpo", "dpok", "grpo", "draft", "draft-lv", "refl", "alignprop", "dpo", "ipo")
BACKPROP = ("draft", "draft-lv", "refl", "alignprop")


def command(method: str, base: str, reward: str, out: str, minutes: float, overrides: list) -> list:
    """`unifuse finetune METHOD ...`; "default" runs without METHOD (the recommended method and options)."""
    cmd = unifuse("finetune", *([] if method == "default" else [method]), "--base", base, "--reward", reward,
                  "--out", out, "--minutes", str(minutes), *CPU)
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def target_class(reward: str):
    return int(reward.split(":")[1].split("@")[0]) if reward.startswith("class:") else None


def measure(run: str, reward_name: str, n: int, seed: int = 0) -> dict:
    """reward, target-class share and FD of n samples of `run` with its (the base's) sampler settings."""
    import torch

    from unifuse.finetune.rewards import get_reward
    from unifuse.metrics import classify, load_classifier
    from unifuse.metrics.frechet import frechet_distance
    from unifuse.training.build import build_data
    from unifuse.training.checkpoint import find_checkpoint, load_model, read_meta
    from unifuse.training.sampling import generate

    torch.set_num_threads(1)
    folder = find_checkpoint(run)
    info = read_meta(folder)["data"]
    model, cfg = load_model(folder)
    x, _ = generate(model, cfg.sample, info, n, conditioning=cfg.data.cond, seed=seed)
    pixels = dict(info, shape=info["latent"]["shape"], latent=None) if info.get("latent") else info
    reward = get_reward(reward_name, pixels)  # on the decoded images `generate` returns
    net = load_classifier(info["name"])
    feats, logits = classify(net, x)
    pred = logits.argmax(1)
    real = build_data(cfg)
    real_feats, _ = classify(net, real.images)
    k = target_class(reward_name)
    out = {"reward": float(reward(x, {}).mean()), "n": n}
    if k is None:
        out["fd"] = frechet_distance(real_feats, feats)
        return out
    real_k = real_feats[real.labels == k]
    out.update(share=float((pred == k).double().mean()), fd_class=frechet_distance(real_k, feats),
               fd_own_class=frechet_distance(real_k, feats[pred == k]) if int((pred == k).sum()) > 10 else None)
    return out


def trace(run: str) -> list:
    """(training CPU minutes, reward, kl) of every evaluation of a fine-tuning run."""
    from unifuse.training.run import read_metrics

    return [(r["cpu_s"] / 60, r.get("reward"), r.get("kl")) for r in read_metrics(os.path.join(run, "metrics.jsonl"))
            if r.get("event") == "eval"]


def evaluate(base: str, out: str, rewards, methods, n: int, log) -> dict:
    results = {}
    for reward in rewards:
        rows = {"base": measure(base, reward, n)}
        log(f"{reward} base: {json.dumps(rows['base'])}")
        for m in methods:
            run = os.path.join(out, reward.replace(":", ""), m)
            if not os.path.isdir(os.path.join(run, "ckpt")):
                continue
            t = trace(run)
            rows[m] = dict(measure(run, reward, n), kl=t[-1][2] if t else None, cpu_minutes=t[-1][0] if t else None,
                           trace=t)
            log(f"{reward} {m}: " + json.dumps({k: v for k, v in rows[m].items() if k != "trace"}))
        results[reward] = rows
    return results


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def report(results: dict, args, md: str) -> None:
    lines = [f"# Reward fine-tuning on {args.data} (bench/finetune.py)", "",
             f"Date: {time.strftime('%Y-%m-%d')}. Machine: {os.cpu_count()}-core CPU, one thread per run, two runs at once. "
             f"Command: `python bench/finetune.py {' '.join(sys.argv[1:])}`. Base: `{args.base}`; {args.minutes} "
             f"CPU-minutes per method, {args.default_minutes} for `default` (no METHOD: the recommended method); "
             f"{args.n} samples per measurement with the base's sampler.", ""]
    for reward, rows in results.items():
        k = target_class(reward)
        lines += [f"## {reward}", ""]
        if k is not None:
            lines += [f"| model | reward | share of {k}s | FD to real {k}s | FD of its {k}s to real {k}s | KL to base (nats) "
                      "| CPU-min |", "|---|---|---|---|---|---|---|"]
            for m, r in rows.items():
                lines.append(f"| {m} | {fmt(r['reward'])} | {fmt(r['share'])} | {fmt(r['fd_class'])} | "
                             f"{fmt(r['fd_own_class'])} | {fmt(r.get('kl'))} | {fmt(r.get('cpu_minutes'))} |")
        else:
            lines += ["| model | reward | FD to the training images | KL to base (nats) | CPU-min |", "|---|---|---|---|---|"]
            for m, r in rows.items():
                lines.append(f"| {m} | {fmt(r['reward'])} | {fmt(r['fd'])} | {fmt(r.get('kl'))} | "
                             f"{fmt(r.get('cpu_minutes'))} |")
        lines.append("")
    lines.append(f"![reward against CPU time]({os.path.basename(md).replace('.md', '.png')})")
    from unifuse.io import write_text

    write_text(md, "\n".join(lines) + "\n")


def plot(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unifuse.io import atomic_write

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (reward, rows) in zip(axes[0], results.items()):
        for m, r in rows.items():
            if r.get("trace"):
                ax.plot([p[0] for p in r["trace"]], [p[1] for p in r["trace"]], marker=".", label=m)
        ax.axhline(rows["base"]["reward"], color="k", ls=":", label="base")
        ax.set_xlabel("training CPU minutes")
        ax.set_ylabel(f"mean reward ({reward})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--base", help="base run folder (default: runs/bench-finetune/DATA/base, trained once)")
    p.add_argument("--base-minutes", type=float, default=5.0)
    p.add_argument("--rewards", default="class:3,compressibility")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--minutes", type=float, default=3.0, help="CPU-minutes of fine-tuning per method")
    p.add_argument("--default-minutes", type=float, default=5.0, help="CPU-minutes for the default (no METHOD)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--report", default=None, help="markdown file (default: docs/benchmarks/finetune-DATA.md)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(ROOT, "runs", "bench-finetune", args.data)
    args.base = args.base or os.path.join(out, "base")
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)
    train_base(args.data, args.base, args.base_minutes, log)
    rewards, methods = args.rewards.split(","), [m for m in args.methods.split(",") if m]
    queue = []
    for reward in rewards:
        os.makedirs(os.path.join(out, reward.replace(":", "")), exist_ok=True)
        for m in methods:
            if (m in BACKPROP or m == "default") and reward in ("compressibility", "incompressibility"):
                continue  # JPEG size has no gradient (and the default for it is ddpo, run anyway)
            run = os.path.join(out, reward.replace(":", ""), m)
            minutes = args.default_minutes if m == "default" else args.minutes
            queue.append((f"{reward} {m}", command(m, args.base, reward, run, minutes, args.overrides), run))
    errors = run_jobs(queue, args.jobs, log)
    results = evaluate(args.base, out, rewards, methods, args.n, log)
    from unifuse.io import write_json

    md = args.report or os.path.join(ROOT, "docs", "benchmarks", f"finetune-{args.data}.md")
    write_json(md.replace(".md", ".json"), dict(results, errors={k: v for k, v in errors.items() if v}))
    report(results, args, md)
    plot(results, md.replace(".md", ".png"))
    for name, e in errors.items():
        if e:
            log(f"{name} failed: {e}")
    log(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

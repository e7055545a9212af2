"""Peak memory of `uf.sample`: the default (no graph) against the same call under `torch.no_grad()` and with
`grad=True` (the graph through every step, for reward fine-tuning by backpropagation).

    python bench/memory.py                      # 500 digits-shaped samples (1x8x8), unet-digits, 100 NFE
    python bench/memory.py --n 100 --net mlp    # smaller

Each variant runs in a fresh subprocess (tracemalloc does not see torch's allocations): the peak resident set
(`resource.getrusage` max RSS) after the model is built is the baseline, the peak after sampling the total;
the table shows both and the increase. Target (issue 12): the default within 1.2x of no_grad.
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
VARIANTS = ("default", "no_grad", "grad=True")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def watch_rss(limit_mb: float) -> None:
    """Exit (code 3) when this process's resident set passes limit_mb: a graph through every step of a large
    batch can outgrow the machine, and the bench must not take other processes down with it."""
    import threading

    def run():
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:
            with open("/proc/self/statm") as f:
                if int(f.read().split()[1]) * page_mb > limit_mb:
                    os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()


def child(variant: str, n: int, nfe: int, net_name: str, sampler: str, limit_mb: float) -> dict:
    """One variant in this process: build the model, sample once, report peaks and seconds."""
    import torch

    import unifuse as uf
    from unifuse.nets import build_net

    torch.manual_seed(0)
    path = uf.paths.get("edm")
    net = build_net("unet-digits") if net_name == "unet" else build_net("mlp", dim=64, width=256, depth=4,
                                                                       emb_dim=128)
    if net_name != "unet":  # the MLP works on flat vectors
        inner = net
        net = lambda x, t: inner(x.reshape(len(x), -1), t).reshape(x.shape)
    model = uf.DiffusionModel(net, path, "edm", time_input=path.c_noise).eval()
    noise = uf.samplers.randn((n, 1, 8, 8), generator=0)
    base = peak_mb()
    watch_rss(limit_mb)
    start = time.perf_counter()
    if variant == "no_grad":
        with torch.no_grad():
            x = uf.sample(model, noise, sampler, nfe)
    else:
        x = uf.sample(model, noise, sampler, nfe, grad=variant == "grad=True")
    seconds = time.perf_counter() - start
    return {"variant": variant, "base_mb": base, "peak_mb": peak_mb(), "seconds": seconds,
            "graph": x.grad_fn is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--nfe", type=int, default=100)
    ap.add_argument("--net", choices=("unet", "mlp"), default="unet")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--limit-mb", type=float, default=6000, help="stop a variant whose resident set passes this")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.n, a.nfe, a.net, a.sampler, a.limit_mb)))
        return
    rows = []
    env = dict(os.environ, PYTHONPATH=ROOT)
    for v in a.variants.split(","):  # one row at a time, as each finishes
        out = subprocess.run([sys.executable, __file__, "--child", v, "--n", str(a.n), "--nfe", str(a.nfe),
                              "--net", a.net, "--sampler", a.sampler, "--limit-mb", str(a.limit_mb)],
                             capture_output=True, text=True, env=env)
        if out.returncode:  # e.g. killed for memory: the graph of every step does not fit
            last = f"over {a.limit_mb:.0f} MB" if out.returncode == 3 else \
                (out.stderr.strip().splitlines() or ["killed"])[-1][:60]
            rows.append({"variant": v, "failed": f"exit {out.returncode} ({last})"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"uf.sample, {a.n} samples 1x8x8, {a.net}, {a.sampler} at {a.nfe} NFE (peak RSS, fresh process each)")
    print(f"{'variant':<10} {'peak MB':>9} {'base MB':>9} {'sampling MB':>12} {'seconds':>8} {'graph':>6}")
    for r in rows:
        if "failed" in r:
            print(f"{r['variant']:<10} {r['failed']}")
            continue
        print(f"{r['variant']:<10} {r['peak_mb']:9.0f} {r['base_mb']:9.0f} {r['peak_mb'] - r['base_mb']:12.0f} "
              f"{r['seconds']:8.2f} {r['graph']!s:>6}")
    by = {r["variant"]: r for r in rows if "failed" not in r}
    if "default" not in by or "no_grad" not in by:
        return
    ratio = by["default"]["peak_mb"] / by["no_grad"]["peak_mb"]
    print(f"default / no_grad peak: {ratio:.2f}x (target <= 1.2x): {'met' if ratio <= 1.2 else 'NOT met'}")


if __name__ == "__main__":
    main()

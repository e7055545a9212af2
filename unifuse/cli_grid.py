"""`unifuse grid`: fit a sampler's time grid to a trained run (`uf.samplers.optimize_grid`) and write it.

    unifuse grid --ckpt RUN --sampler unipc --nfe 8 --out grid.json [--n 64] [--seed 1000]
    unifuse sample --ckpt RUN --grid grid.json --out samples/       # sampler and NFE come from the file

The file is JSON (readable, diffable, no code on load): {"sampler", "nfe", "path" (the run's path),
"grid": [t_0, ..., t_K] (native times, float64; t_K = the data end), "sigma": [sigma/alpha at each time],
"run", "fit" (the fitting batch, cost and errors)}. Fitting costs about n x (reference_nfe + 48 + nfe x
(8 + max_evals)) network evaluations (`optimize_grid`); the fitting noise uses --seed (default 1000), apart
from the seeds samples use by default.
"""
from __future__ import annotations

import os
import time

import torch

from .errors import UnifuseError
from .io import read_json


def add_grid(g) -> None:
    g.add_argument("--ckpt", required=True, help="run folder (or its ckpt/ or a step folder)")
    g.add_argument("--sampler", default="unipc", help="a deterministic ODE sampler (default unipc)")
    g.add_argument("--nfe", type=int, required=True, help="network evaluations of the grid, e.g. 8")
    g.add_argument("--out", required=True, help="JSON file for the grid (unifuse sample --grid FILE reads it)")
    g.add_argument("--n", type=int, default=64, help="noise samples the grid is fitted to (default 64)")
    g.add_argument("--seed", type=int, default=1000, help="seed of the fitting noise (default 1000)")
    g.add_argument("--reference-nfe", type=int, default=192, help="evaluations per sample of the reference solution")
    g.add_argument("--max-evals", type=int, default=160, help="sampler runs of the coordinate descent")
    g.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")


def cmd_grid(args) -> int:
    from .io import write_json
    from .samplers import generators, optimize_grid, randn
    from .training import load_model
    from .training.checkpoint import find_checkpoint, read_meta
    from .training.distributed import pick_device

    if args.n < 1 or args.nfe < 1:
        raise UnifuseError(f"--n and --nfe must be >= 1, got --n {args.n} --nfe {args.nfe}")
    if not args.out.endswith(".json"):
        raise UnifuseError(f"--out must be a .json file, got {args.out!r}; e.g. --out grid.json")
    device = pick_device(args.device, key="--device")
    folder = find_checkpoint(args.ckpt)
    meta = read_meta(folder)
    model, cfg = load_model(folder, device=device)
    if cfg.data.cond not in ("", "none", None):
        raise UnifuseError(f"unifuse grid fits unconditional runs; {folder} is conditional ({cfg.data.cond})")
    noise = randn((args.n,) + tuple(meta["data"]["shape"]), generator=generators(args.seed, 0, args.n)).to(device)
    start = time.time()
    with torch.no_grad():
        grid, info = optimize_grid(model, noise, args.nfe, args.sampler, reference_nfe=args.reference_nfe,
                                   max_evals=args.max_evals, return_info=True)
    path = model.path
    record = {"sampler": args.sampler, "nfe": args.nfe, "path": repr(path), "grid": grid.tolist(),
              "sigma": path.sigma_edm(grid).tolist(), "run": os.path.abspath(folder),
              "fit": {"n": args.n, "seed": args.seed, "reference_nfe": args.reference_nfe,
                      "max_evals": args.max_evals, "seconds": round(time.time() - start, 1), "start": info["start"],
                      "rms_error": info["error"], "rms_error_of_starting_grids": info["errors"]}}
    write_json(args.out, record)
    print(f"grid for {args.sampler} at {args.nfe} NFE: RMS error {info['error']:.4g} against the reference on the "
          f"fitting batch (the default grid: {info['errors'].get('default', float('nan')):.4g}) -> {args.out}")
    return 0


def read_grid(file: str, path=None) -> dict:
    """The record of a grid file written by `unifuse grid` (checked: a grid of native times, its sampler and NFE)."""
    record = read_json(file, "grid file", "write one with unifuse grid")
    if not {"sampler", "nfe", "grid"} <= set(record):
        raise UnifuseError(f"{file!r} is not a grid file of unifuse grid (needs sampler, nfe and grid)")
    if path is not None and record.get("path") not in (None, repr(path)):
        raise UnifuseError(f"the grid in {file!r} was fitted on {record['path']}, but this run's path is {path!r}")
    return record


def apply_grid(args, path=None):
    """For `unifuse sample --grid FILE`: the grid tensor; args.sampler and args.nfe are set from the file
    (given ones must agree) and args.spacing names the file (for samples.json)."""
    record = read_grid(args.grid, path)
    for flag, key in (("sampler", "sampler"), ("nfe", "nfe")):
        given = getattr(args, flag)
        if given is not None and given != record[key]:
            raise UnifuseError(f"--{flag} {given} disagrees with the grid file {args.grid!r} (fitted for "
                               f"{key} {record[key]}); drop --{flag} or fit another grid")
        setattr(args, flag, record[key])
    if args.spacing is not None:
        raise UnifuseError("--grid and --spacing exclude each other; drop one")
    args.spacing = f"grid:{os.path.abspath(args.grid)}"
    return torch.tensor(record["grid"], dtype=torch.float64)

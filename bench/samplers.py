"""Samplers against diffusers' and k-diffusion's on exact problems, grids fitted by optimize_grid, sampling overhead.

    python bench/samplers.py --skip-timing --fresh --nfe 3,5,8,10   # accuracy at the issue's NFEs (about 15 min)
    python bench/samplers.py --skip-timing --nfe 3 --problems 64d,heavy --limit-problems 64d,heavy   # more limits
    python bench/samplers.py --digits RUN    # FD of a trained digits run at NFE 5 and 10 (samplers-digits.md)
    python bench/samplers.py --overhead --reps 25   # only the overhead part (about a minute)

k-diffusion 0.1.1 needs torchvision, which does not install beside every torch; run this script from an environment
that has it (`python3 -m venv kd && kd/bin/pip install torch torchvision k-diffusion diffusers scipy scikit-image
jsonmerge dctorch clean-fid clip-anytorch ftfy "setuptools<81" && kd/bin/pip install --no-deps -e .`, numpy >= 2 kept)
or without it (the peer is then skipped with a note; `--no-kdiffusion`).
Problems: a 2-D ring of 8 Gaussians (std 0.1, radius 1), a 64-D mixture of 10 Gaussians (random means with std 0.5,
per-dimension stds in [0.1, 0.4]) and a 16-D heavy-tailed, nearly low-rank scale mixture (`sampler_peers`). The
network is the exact eps-prediction oracle on the DDPM-linear path (1000 steps, beta 1e-4..0.02), so every diffusers
scheduler for DDPM-linear eps models applies unchanged, and k-diffusion gets it as an exact denoiser; all libraries
get the same noise x_999. Error = RMS distance of the samples to the exact PF-ODE solution from the same noise
(adaptive Dormand-Prince, rtol = atol = 1e-9). For each library and NFE the best configuration is chosen on one
noise set (validation) and its error is reported on another (test), so the selection does not fit the test noise;
optimize_grid is fitted on validation noise too, and the physical limit (the best grid found for the test noise
itself) bounds what any grid can do. Distribution distance: sliced 2-Wasserstein (256 directions) to fresh data
samples. Timing: a network that costs nothing (x * 0), 25 steps, interleaved repetitions in a new random order each
round, minimum and median over the rounds; the hand-written DDIM loop comes in two forms (indexing the alpha-bar
table as tensors per step, and reading it once as Python floats, the tighter reference).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import unifuse as uf
from unifuse.paths import DDPM
from unifuse.testing import GaussianMixture

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sampler_peers as P
from sampler_overhead import timing
from sampler_peers import intro_lines, kd_version, problem_lines, target_lines

F64 = torch.float64
PATH = DDPM.linear()
NFES = [2, 3, 4, 5, 6, 8, 10, 15, 20, 25, 35, 50]
FIT_MAX_NFE = 25  # optimize_grid rows up to here
LIMIT_NFES = (3, 5, 8, 10)  # the physical limit (2-D problem) at these NFEs
LIMIT_SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm")
OURS = ["ddim", "euler", "heun", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]
GRIDS = [dict(spacing=sp, sigma_max=hi, sigma_min=lo) for sp, hi, lo in
         itertools.product(["logsnr", "karras"], [None, 20.0, 5.0, 2.0], [None, 0.03, 0.1])]
DDPM_LINEAR = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                   prediction_type="epsilon")  # diffusers' config of the DDPM-linear eps model
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks")


# --- problems ---------------------------------------------------------------------------------------------
def ring2d() -> GaussianMixture:
    ang = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    return GaussianMixture(torch.full((8,), 1 / 8, dtype=F64), torch.stack([ang.cos(), ang.sin()], 1), 0.1)


def mixture64() -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(10, 64, generator=g, dtype=F64) * 0.5
    stds = 0.1 + 0.3 * torch.rand(10, 64, generator=g, dtype=F64)
    w = torch.rand(10, generator=g, dtype=F64) + 0.5
    return GaussianMixture(w / w.sum(), means, stds)


def reference(gm: GaussianMixture, noise: torch.Tensor) -> torch.Tensor:
    """Exact PF-ODE solution from x_999 = noise to the data (solved on the equal-SNR EDM path)."""
    a, se = float(PATH.alpha(torch.tensor(999.0))), float(PATH.sigma_edm(torch.tensor(999.0)))
    model = gm.model(uf.paths.EDM(sigma_max=se), "x0")
    return uf.samplers.sample_adaptive(model, noise / a, torch.tensor([se, 0.0], dtype=F64), rtol=1e-9, atol=1e-9,
                                       sigma_stop=1e-4)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_dirs: int = 256) -> float:
    d = torch.randn(x.shape[1], n_dirs, generator=torch.Generator().manual_seed(0), dtype=F64)
    d = d / d.norm(dim=0, keepdim=True)
    px, py = (x.to(F64) @ d).sort(0).values, (y.to(F64) @ d).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())


# --- diffusers -------------------------------------------------------------------------------------------------
def diffusers_configs():
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )
    cfg = {f"DDIM/{sp}": (DDIMScheduler, dict(timestep_spacing=sp)) for sp in ("leading", "trailing", "linspace")}
    grids = [("", {}), ("trailing", dict(timestep_spacing="trailing")), ("karras", dict(use_karras_sigmas=True))]
    for o in (2, 3):
        for name, g in grids + [("lu", dict(use_lu_lambdas=True))]:
            cfg[f"DPM++{o}M/{name or 'default'}"] = (DPMSolverMultistepScheduler, dict(solver_order=o, **g))
        for name, g in grids:
            for b in ("bh1", "bh2"):
                cfg[f"UniPC{o}-{b}/{name or 'default'}"] = (UniPCMultistepScheduler,
                                                              dict(solver_order=o, solver_type=b, **g))
            cfg[f"DEIS{o}/{name or 'default'}"] = (DEISMultistepScheduler, dict(solver_order=o, **g))
            cfg[f"DPM-single{o}/{name or 'default'}"] = (DPMSolverSinglestepScheduler, dict(solver_order=o, **g))
    for name, g in grids:
        for label, cls in (("Euler", EulerDiscreteScheduler), ("Heun", HeunDiscreteScheduler),
                           ("LMS", LMSDiscreteScheduler)):
            cfg[f"{label}/{name or 'default'}"] = (cls, g)
    cfg["PNDM/default"] = (PNDMScheduler, dict(skip_prk_steps=True))
    return cfg


def run_diffusers(cls, cfg, steps, net, noise):
    """(samples, network calls) of a diffusers scheduler's standard loop."""
    sched = cls.from_config({**DDPM_LINEAR, **cfg})
    sched.set_timesteps(steps)
    x, calls = noise * sched.init_noise_sigma, 0
    for t in sched.timesteps:
        eps = net(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(eps, t, x).prev_sample
    return x, calls


def run_diffusers_on_grid(cls, cfg, timesteps, net, noise):
    """A diffusers scheduler on custom integer timesteps (`set_timesteps(timesteps=...)`)."""
    sched = cls.from_config({**DDPM_LINEAR, **cfg})
    sched.set_timesteps(timesteps=timesteps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


def integer_grid(name, kw, nfe):
    """Our grid for sampler `name` with grid options kw, rounded to DDPM timesteps (None if steps collide)."""
    spacing = kw.get("spacing") or uf.samplers.get(name).spacing
    grid_kw = dict(rho=7.0, shift=3.0, sigma_min=kw.get("sigma_min"), sigma_max=kw.get("sigma_max"), t_max=999.0)
    ts = uf.sampling.noise_end_grid(PATH, nfe, spacing, grid_kw)
    steps = [round(v) for v in ts[:-1].tolist()]
    return steps if len(set(steps)) == len(steps) == nfe and min(steps) >= 0 else None


def diffusers_at(cls, cfg, nfe, net, noise):
    """The diffusers run that makes exactly nfe network calls, or None."""
    for steps in sorted({nfe, (nfe + 1) // 2, nfe // 2 + 1}):
        try:
            x, calls = run_diffusers(cls, cfg, steps, net, noise)
        except Exception:  # a configuration diffusers refuses at this step count
            continue
        if calls == nfe and torch.isfinite(x).all():
            return x
    return None


# --- accuracy sweep --------------------------------------------------------------------------------------------
def ours_at(name, grid, nfe, model, noise):
    try:
        return uf.sample(model, noise, name, nfe=nfe, **grid)
    except uf.UnifuseError:  # e.g. a grid that cannot hold this many distinct steps
        return None


def rmse(x, ref):
    return float(((x.to(F64) - ref) ** 2).mean().sqrt()) if x is not None else math.inf


def convention_check(K, gm: GaussianMixture, noise, ref):
    """k-diffusion's conventions against ours: (a) on the DDPM-linear oracle at NFE 200 both reach the same floor
    on the same exponential grid (its last step returns the denoised estimate at sigma 0.01, as ours does); (b) on
    the EDM path (sigma down to 0.002) its Heun and DPM++2M errors fall to ~1e-4 and below."""
    out = {}
    model = gm.model(PATH, "eps")
    for name in ("dpmpp_2m", "heun", "euler"):
        x = P.kd_at(K, (name, "exponential", None, None), 200 if name != "heun" else 199, model, noise)
        out[f"k-diffusion {name}, DDPM-linear, NFE ~200"] = rmse(x, ref)
    out["ours dpmpp_2m, DDPM-linear, NFE 200"] = rmse(uf.sample(model, noise, "dpmpp_2m", 200), ref)
    a, se = float(PATH.alpha(torch.tensor(999.0))), float(PATH.sigma_edm(torch.tensor(999.0)))
    m = gm.model(uf.paths.EDM(sigma_max=se), "x0")
    for name, n in (("heun", 100), ("dpmpp_2m", 100), ("dpmpp_2m", 400)):
        sig = K.sampling.get_sigmas_karras(n if name != "heun" else n // 2 + 1, 0.002, se).to(F64)
        x, calls = P.kd_run(K, name, P.Denoiser(m), noise / a, sig, None)
        out[f"k-diffusion {name}, EDM path to sigma 0.002, NFE {calls}"] = rmse(x, ref)
    return out


def accuracy(problem: str, gm: GaussianMixture, n: int, nfes, quick: bool, K=None, limit_samplers=()):
    """Per NFE: each library's best configuration on validation noise, its error on test noise; ours with the
    defaults (best sampler, default grid) and with grids fitted by optimize_grid on validation noise; the physical
    limit per sampler (limit_samplers) on the test noise."""
    noise = {k: torch.randn(n, gm.D, generator=torch.Generator().manual_seed(s), dtype=F64)
             for k, s in (("val", 0), ("test", 1))}
    t0 = time.time()
    ref = {k: reference(gm, v) for k, v in noise.items()}
    print(f"[{problem}] reference solutions in {time.time() - t0:.1f}s", flush=True)
    model = gm.model(PATH, "eps")
    data = gm.sample(n, torch.Generator().manual_seed(2))[0]
    data2 = gm.sample(n, torch.Generator().manual_seed(3))[0]
    dcfg = diffusers_configs()
    kcfg = {P.kd_label(c): c for c in P.kd_configs(not quick)} if K is not None else {}
    discrete = P.discrete_denoiser(K, model) if K is not None else None
    ours_names = ["dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "heun", "euler"] if quick else OURS
    grids = [g for g in GRIDS if g["spacing"] == "logsnr"] if quick else GRIDS
    rows = {}
    for nfe in nfes:
        t0 = time.time()
        val = {}
        for key, (cls, cfg) in dcfg.items():
            val[("diffusers", key)] = rmse(diffusers_at(cls, cfg, nfe, model.net, noise["val"]), ref["val"])
        for label, c in kcfg.items():
            val[("k-diffusion", label)] = rmse(P.kd_at(K, c, nfe, model, noise["val"], discrete), ref["val"])
        for name in ours_names:
            for g in [dict(spacing=None)] + grids:
                label = name + ("" if g.get("spacing") is None else
                                f"/{g['spacing']}[{g['sigma_min'] or 'min'},{g['sigma_max'] or 'max'}]")
                kw = {k: v for k, v in g.items() if v is not None}
                val[("ours", label)] = rmse(ours_at(name, kw, nfe, model, noise["val"]), ref["val"])
        fits = P.fitted(model, noise["val"], nfe) if nfe <= FIT_MAX_NFE else {}
        for name, g in fits.items():
            val[("fitted", name)] = rmse(uf.sample(model, noise["val"], name, spacing=g) if g is not None else None,
                                         ref["val"])

        def best(pred):
            keys = [k for k in val if pred(k) and math.isfinite(val[k])]
            return min(keys, key=val.get) if keys else None

        picks = {"ours": best(lambda k: k[0] == "ours"),
                 "ours_default": best(lambda k: k[0] == "ours" and "/" not in k[1]),
                 "ours_fit": best(lambda k: k[0] == "fitted"),
                 "diffusers": best(lambda k: k[0] == "diffusers"),
                 "k-diffusion": best(lambda k: k[0] == "k-diffusion" and P.own_range(k[1])),
                 "k-diffusion_tuned": best(lambda k: k[0] == "k-diffusion")}
        for lib, key in (("ours", "dpmpp_2m"), ("ours", "dpmpp_3m"), ("ours", "unipc"), ("ours", "ddim"),
                         ("diffusers", "DDIM/leading"), ("diffusers", "DPM++2M/default"),
                         ("diffusers", "UniPC2-bh2/default"), ("k-diffusion", "dpmpp_2m/karras[min,max]"),
                         ("k-diffusion", "dpmpp_3m_sde/exponential[min,max]")):
            if lib != "k-diffusion" or key in kcfg:
                picks[f"{lib}:{key}"] = (lib, key)
        row = {}
        for tag, key in picks.items():
            if key is None:
                continue
            lib, label = key
            if lib == "diffusers":
                cls, cfg = dcfg[label]
                x = diffusers_at(cls, cfg, nfe, model.net, noise["test"])
            elif lib == "k-diffusion":
                x = P.kd_at(K, kcfg[label], nfe, model, noise["test"], discrete)
            elif lib == "fitted":
                x = uf.sample(model, noise["test"], label, spacing=fits[label])
                label = f"{label} on its optimize_grid grid"
            else:
                x = ours_at(*parse_label(label), nfe, model, noise["test"])
            row[tag] = {"config": f"{lib} {label}", "val": val.get(key), "test": rmse(x, ref["test"]),
                        "sw2": sliced_w2(x, data) if x is not None else None}
        if limit_samplers and nfe in LIMIT_NFES:
            row["limit"] = P.limit(model, noise["test"], ref["test"], nfe, limit_samplers)
        rows[nfe] = row
        peer = min(row[k]["test"] for k in ("diffusers", "k-diffusion") if k in row)
        msg = "  ".join(f"{k} {row[k]['test']:.3e}" for k in ("ours", "ours_default", "ours_fit", "diffusers",
                                                               "k-diffusion") if k in row)
        print(f"[{problem}] NFE {nfe:2d}: {msg}  default/peer {row['ours_default']['test'] / peer:.2f}"
              + (f"  fitted/peer {row['ours_fit']['test'] / peer:.2f}" if "ours_fit" in row else "")
              + f"  [{time.time() - t0:.0f}s]", flush=True)
    floor = {"reference_sw2": sliced_w2(ref["test"], data), "data_sw2": sliced_w2(data2, data)}
    out = {"rows": rows, "floor": floor}
    if K is not None:
        out["convention_check"] = convention_check(K, gm, noise["test"], ref["test"])
        print(f"[{problem}] conventions: {out['convention_check']}", flush=True)
    return out


def parse_label(label):
    """(sampler, grid keywords) of one of our configuration labels, e.g. 'unipc/logsnr[0.1,2.0]'."""
    name, _, rest = label.partition("/")
    kw = {}
    if rest:
        sp, rng = rest.split("[")
        lo, hi = rng.rstrip("]").split(",")
        kw = dict(spacing=sp, **({} if lo == "min" else {"sigma_min": float(lo)}),
                  **({} if hi == "max" else {"sigma_max": float(hi)}))
    return name, kw


# --- report ----------------------------------------------------------------------------------------------------------
def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.6), dpi=110)
    axes = [axes] if len(results) == 1 else axes
    styles = {"ours": ("tab:red", ":", "ours, tuned per problem"),
              "ours_default": ("tab:orange", "-s", "ours, defaults"),
              "ours_fit": ("tab:red", "-o", "ours, optimize_grid"),
              "diffusers": ("tab:blue", "-o", "diffusers, best configuration"),
              "k-diffusion": ("tab:olive", "-o", "k-diffusion, best configuration"),
              "ours:dpmpp_3m": ("tab:pink", ":", "ours dpmpp_3m (default)"),
              "ours:unipc": ("tab:purple", ":", "ours unipc (default)"),
              "ours:ddim": ("tab:brown", ":", "ours ddim (default)"),
              "diffusers:DPM++2M/default": ("tab:cyan", "--", "diffusers DPM++2M (default)"),
              "diffusers:UniPC2-bh2/default": ("tab:green", "--", "diffusers UniPC (default)"),
              "diffusers:DDIM/leading": ("tab:gray", "--", "diffusers DDIM (default)")}
    for ax, (problem, res) in zip(axes, results.items()):
        nfes = sorted(res["rows"])
        for tag, (color, style, label) in styles.items():
            pts = [(n, res["rows"][n][tag]["test"]) for n in nfes
                   if tag in res["rows"][n] and math.isfinite(res["rows"][n][tag]["test"])]
            if pts:
                ax.loglog(*zip(*pts), style, color=color, label=label, markersize=3, linewidth=1.2)
        ax.set_title(f"{problem}, DDPM-linear eps oracle", fontsize=10)
        ax.set_xlabel("NFE (network evaluations)"), ax.set_ylabel("RMS error vs exact PF-ODE solution")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(results, times, command, path_md, path_png, meta=None):
    import diffusers

    lines = ["# Samplers: accuracy per network evaluation and overhead", "",
             f"Date {time.strftime('%Y-%m-%d')}; machine 2-core x86_64 CPU, torch {torch.__version__.split('+')[0]} "
             f"CPU, diffusers {diffusers.__version__}, {kd_version()}, Python {platform.python_version()}; "
             f"commands: {command}.", ""] + intro_lines() + [f"![error vs NFE]({os.path.basename(path_png)})", ""]
    for problem, res in results.items():
        lines += problem_lines(problem, res)
    lines += target_lines(results)
    if times:
        meta = meta or {}
        shapes = [k for k in times if "(" not in k]
        cols = list(times[shapes[0]].keys())
        lines += ["", "## Overhead with a network that costs nothing", "",
                  "Date 2026-11-23; machine 2-core x86_64 CPU, torch "
                  f"{torch.__version__.split('+')[0]} CPU. Command: "
                  f"`{meta.get('command', 'python bench/samplers.py --overhead')}`"
                  + (f"; machine load during the run: {meta['load']}" if meta.get("load") else "") + ". "
                  "25 steps, `x * 0` as the network, float32, one thread; every variant is run once per round, in a "
                  "new random order each round, and the table gives the minimum and the median over the rounds. The "
                  "machine is shared with other jobs, so the times are CPU time of the sampling thread "
                  "(`time.thread_time`, which leaves out the time other processes held the core; a loaded machine "
                  "still slows memory and page faults, so absolute times vary between runs by up to 2x); wall-clock "
                  "minima are listed too. Ours uses the same index spacing as the diffusers defaults (DDIM: trailing; "
                  "DPM-Solver++/UniPC: linspace), plus our default log-SNR grids, which cost one grid inversion more. "
                  "Our repeated calls pass one kept `uf.samplers.Plan` (`plan=`), which holds the time-only work of a "
                  "call (grid, schedule, prepared evaluations, DDIM step coefficients), so a repeated call with the "
                  "same settings does none of it; the last column is a first call with a new path and model and no "
                  "plan, which does all of it.", "",
                  "| batch | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for shape, row in times.items():
            lines.append(f"| {shape.replace(' (', ', ', 1).rstrip(')') if '(' in shape else shape + ', min'} | "
                         + " | ".join(f"{row[c] * 1e3:.2f} ms" if c in row else "-" for c in cols) + " |")
        lines.append("")
        for shape in shapes:
            best, med = times[shape], times.get(shape + " (median)", {})
            d = sum(best[f"diffusers {n}"] for n in ("ddim", "dpmpp_2m", "unipc"))
            o = sum(best[f"ours {n}"] for n in ("ddim", "dpmpp_2m", "unipc"))
            net = best["network only (25 calls)"]
            per = {n: (best[f"ours {n}"] - net) / 25 * 1e6 for n in ("ddim", "dpmpp_2m", "unipc")}
            perd = {n: (best[f"diffusers {n}"] - net) / 25 * 1e6 for n in ("ddim", "dpmpp_2m", "unipc")}

            def ratio(ref, stat=best):
                return stat["ours ddim"] / stat[ref] if ref in stat else math.nan

            hand_min, hand_med = ratio("hand-written ddim"), ratio("hand-written ddim", med)
            tight_min = ratio("hand-written ddim (float coefficients)")
            tight_med = ratio("hand-written ddim (float coefficients)", med)
            first = "ours ddim (first call: new path and model)"

            def verdict(*vs):
                return "met" if all(v <= 1.3 for v in vs) else "NOT met"

            lines.append(
                f"- {shape}: sum over DDIM, DPM-Solver++ 2M, UniPC: ours/diffusers = {o / d:.2f} (target <= 0.5: "
                f"{'met' if o / d <= 0.5 else 'NOT met'}); our DDIM / hand-written DDIM = {hand_min:.2f} (minima), "
                f"{hand_med:.2f} (medians) (target <= 1.3: {verdict(hand_min, hand_med)}); against the tighter "
                f"hand-written loop with float coefficients {tight_min:.2f} (minima), {tight_med:.2f} (medians) "
                f"(<= 1.3: {verdict(tight_min, tight_med)}); per-step overhead excluding the network: ours "
                + ", ".join(f"{k} {v:.0f} us" for k, v in per.items())
                + "; diffusers " + ", ".join(f"{k} {v:.0f} us" for k, v in perd.items())
                + "; the low-level DDIM on a grid built once: "
                f"{best['ours ddim (low level, grid built once)'] / best['hand-written ddim']:.2f}x the hand-written "
                "loop" + (f"; a first call with a new path and model: {best[first] * 1e3:.2f} ms ("
                          f"{(best[first] - best['ours ddim']) * 1e3:.2f} ms of set-up)" if first in best else "")
                + ".")
        lines += ["", "Where the time goes: a first `uf.sample` call with new settings does the set-up listed above "
                  "(the grid, the float64 schedule of the DDPM table, the prepared time inputs and coefficients of "
                  "every evaluation, the check that the eps -> x0 conversion is nonsingular on the grid, DDIM's step "
                  "coefficients); a repeated call finds all of it in the plan it is given (at most 64 entries, the "
                  "oldest dropped first; keyed by the path, the model's prediction, time input and input scaling, "
                  "the grid, and the batch size, dtype and device) and only runs the loop. "
                  "Per step our DDIM does the same tensor arithmetic as the hand-written loop "
                  "(x0 = (x - sigma eps)/alpha, then one multiply-add) plus one sum of the state (the non-finite "
                  "check; on a GPU it is read once at the end) and a few microseconds of Python; the tensor-indexing "
                  "hand-written loop spends more on 0-dim tensor arithmetic per step. On a 16x3x64x64 batch the time "
                  "is dominated by the tensor arithmetic and by page faults of freshly allocated 0.8 MB buffers, which "
                  "depend on the process's heap and vary from run to run."]
    os.makedirs(os.path.dirname(path_md), exist_ok=True)
    with open(path_md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path_md + ".tmp", path_md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="NFE 5 and 10 only, logsnr grids only")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--overhead", action="store_true", help="only the overhead (timing) part: same as --skip-accuracy")
    ap.add_argument("--note", default="", help="what else ran on the machine during the timing (for the report)")
    ap.add_argument("--reps", type=int, default=15, help="timing repetitions")
    ap.add_argument("--nfe", default=None, help="comma-separated NFEs to (re)run, merged into the saved results")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--problems", default="", help="comma-separated subset of 2d,64d,heavy (default: all)")
    ap.add_argument("--no-kdiffusion", action="store_true", help="skip the k-diffusion peer")
    ap.add_argument("--fresh", action="store_true", help="drop the saved accuracy results (with --nfe: start anew)")
    ap.add_argument("--no-limit", action="store_true", help="skip the physical-limit search")
    ap.add_argument("--limit-problems", default="2d", help="problems that get the physical-limit search (default 2d)")
    ap.add_argument("--digits", metavar="RUN", help="only the FD comparison on the digits run RUN (see sampler_peers)")
    ap.add_argument("--mnist", metavar="RUN", help="the same on an MNIST run (a latent run's samples are decoded)")
    args = ap.parse_args(argv)
    args.skip_accuracy = args.skip_accuracy or args.overhead
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    command = "python bench/samplers.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    nfes = [int(v) for v in args.nfe.split(",")] if args.nfe else [5, 10] if args.quick else NFES
    if args.digits or args.mnist:  # only the FD comparison on a trained digits or MNIST run
        res = P.digits_fd(args.digits or args.mnist, P.k_diffusion(), diffusers_configs=diffusers_configs,
                          diffusers_at=diffusers_at)
        base = os.path.join(args.out, "samplers-digits" if args.digits else "samplers-mnist")
        with open(base + ".json.tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(base + ".json.tmp", base + ".json")
        with open(base + ".md.tmp", "w") as f:
            f.write("\n".join(P.digits_lines(res, command)) + "\n")
        os.replace(base + ".md.tmp", base + ".md")
        print(f"wrote {base}.md")
        return
    md, png, js = (os.path.join(args.out, f"samplers.{ext}") for ext in ("md", "png", "json"))
    old = {}
    if os.path.exists(js):  # a part not rerun is kept from the previous run
        with open(js) as f:
            old = json.load(f)
        for res in (old.get("accuracy") or {}).values():
            res["rows"] = {int(k): v for k, v in res["rows"].items()}
    keep = (args.skip_accuracy or args.nfe or args.problems) and not args.fresh
    results = (old.get("accuracy") or {}) if keep else {}
    if not args.skip_accuracy:
        K = None if args.no_kdiffusion else P.k_diffusion()
        problems = [("2-D ring (8 Gaussians)", "2d", ring2d(), 2000),
                    ("64-D mixture (10 Gaussians)", "64d", mixture64(), 500),
                    ("16-D heavy-tailed, nearly low-rank", "heavy", P.heavy_lowrank(), 1000)]
        for problem, key, gm, n in problems:
            if args.problems and key not in args.problems.split(","):
                continue
            lim = () if args.no_limit or key not in args.limit_problems.split(",") else LIMIT_SAMPLERS
            new = accuracy(key, gm, n, nfes, args.quick, K, lim)
            if problem in results:  # merge the rerun NFEs into the saved ones (a limit not rerun is kept)
                for nfe, row in new["rows"].items():
                    kept = results[problem]["rows"].get(nfe, {}).get("limit")
                    results[problem]["rows"][nfe] = dict(row, **({"limit": kept} if kept and "limit" not in row else {}))
                results[problem].update({k: v for k, v in new.items() if k != "rows"})
            else:
                results[problem] = new
    meta = old.get("timing_meta")
    if not args.skip_timing:
        load0 = os.getloadavg()[0]
        times = timing(args.reps)
        load = (f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on "
                f"{os.cpu_count()} cores")
        meta = {"command": command, "load": load + (f" ({args.note})" if args.note else "")}
    else:
        times = old.get("timing")
    commands = dict(old.get("commands") or {})  # which command produced each part
    if not args.skip_accuracy:
        commands["accuracy"] = (commands.get("accuracy", "") + " + " if keep else "") + command
    if not args.skip_timing:
        commands["timing"] = command
    os.makedirs(args.out, exist_ok=True)
    if results:
        plot(results, png)
    with open(js + ".tmp", "w") as f:
        json.dump({"accuracy": results, "timing": times, "timing_meta": meta, "commands": commands}, f, indent=1,
                  default=str)
    os.replace(js + ".tmp", js)
    command = "; ".join(f"{part}: `{c}`" for part, c in commands.items()) or f"`{command}`"
    report(results, times, command, md, png, meta)
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

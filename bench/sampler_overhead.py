"""The overhead part of bench/samplers.py: sampling with a network that costs nothing, ours against diffusers and a
hand-written DDIM loop (see that script's docstring)."""
from __future__ import annotations

import math
import random
import statistics
import time

import torch

import unifuse as uf
from unifuse.paths import DDPM

PATH = DDPM.linear()


# --- overhead ------------------------------------------------------------------------------------------------------
def timing(reps: int):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    torch.set_num_threads(1)
    net = lambda x, t: x * 0
    model = uf.DiffusionModel(net, PATH, "eps")
    abar = PATH.alphas_cumprod.float()

    def diff(cls, noise):
        sched = cls(num_train_timesteps=1000, beta_schedule="linear")

        def run():
            sched.set_timesteps(25)
            x = noise
            for t in sched.timesteps:
                x = sched.step(net(x, t), t, x).prev_sample
            return x
        return run

    def hand(noise):  # the DDIM loop as one writes it by hand: trailing timesteps, table lookups per step
        def run():
            ts = torch.arange(999, -1, -40)
            x = noise
            for i, t in enumerate(ts):
                a_t = abar[t]
                a_p = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
                eps = net(x, t)
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
            return x
        return run

    def hand_floats(noise):  # the same loop with the table read once as Python floats (no 0-dim tensor ops)
        def run():
            ts = list(range(999, -1, -40))
            a = abar[ts].tolist() + [1.0]
            x = noise
            for i, t in enumerate(ts):
                eps = net(x, t)
                x0 = (x - math.sqrt(1.0 - a[i]) * eps) / math.sqrt(a[i])
                x = math.sqrt(a[i + 1]) * x0 + math.sqrt(1.0 - a[i + 1]) * eps
            return x
        return run

    out = {}
    grid = uf.paths.time_grid(PATH, 25, "trailing")
    plan = uf.samplers.Plan()  # kept between repeated calls: their set-up work is done once
    order = random.Random(0)
    for shape in ((16, 3, 64, 64), (1, 4, 64, 64)):
        noise = torch.randn(shape)
        # a new path and model per call, no plan: nothing of an earlier call is kept (the set-up cost of new settings)
        fresh = iter([uf.DiffusionModel(net, DDPM.linear(), "eps") for _ in range(reps + 1)])
        fs = {"diffusers ddim": diff(DDIMScheduler, noise),
              "diffusers dpmpp_2m": diff(DPMSolverMultistepScheduler, noise),
              "diffusers unipc": diff(UniPCMultistepScheduler, noise),
              "ours ddim": lambda: uf.sample(model, noise, "ddim", nfe=25, spacing="trailing", plan=plan),
              "ours dpmpp_2m": lambda: uf.sample(model, noise, "dpmpp_2m", nfe=25, spacing="linspace", plan=plan),
              "ours unipc": lambda: uf.sample(model, noise, "unipc", nfe=25, spacing="linspace", plan=plan),
              "ours dpmpp_2m (logsnr grid)": lambda: uf.sample(model, noise, "dpmpp_2m", nfe=25, plan=plan),
              "ours unipc (logsnr grid)": lambda: uf.sample(model, noise, "unipc", nfe=25, plan=plan),
              "hand-written ddim": hand(noise),
              "hand-written ddim (float coefficients)": hand_floats(noise),
              "network only (25 calls)": lambda: [net(noise, 0) for _ in range(25)],
              "ours ddim (low level, grid built once)": lambda: uf.samplers.sample_ddim(model, noise, grid, plan=plan),
              "ours ddim (first call: new path and model)":
                  lambda: uf.sample(next(fresh), noise, "ddim", nfe=25, spacing="trailing")}
        assert torch.allclose(fs["ours ddim"](), fs["hand-written ddim"](), rtol=1e-3, atol=1e-3 * noise.abs().max())
        times = {k: [] for k in fs}
        walls = {k: [] for k in fs}
        for _ in range(reps):  # interleaved, in a new random order each round
            keys = list(fs)
            order.shuffle(keys)
            for k in keys:
                t0, c0 = time.perf_counter(), time.thread_time()
                fs[k]()
                times[k].append(time.thread_time() - c0)
                walls[k].append(time.perf_counter() - t0)
        name = "x".join(map(str, shape))
        out[name] = {k: min(v) for k, v in times.items()}
        out[name + " (wall clock)"] = {k: min(v) for k, v in walls.items()}
        out[name + " (median)"] = {k: statistics.median(v) for k, v in times.items()}
        best, med = out[name], out[name + " (median)"]
        d = sum(best[f"diffusers {n}"] for n in ("ddim", "dpmpp_2m", "unipc"))
        o = sum(best[f"ours {n}"] for n in ("ddim", "dpmpp_2m", "unipc"))
        ref, tight = "hand-written ddim", "hand-written ddim (float coefficients)"
        print(f"[timing {shape}] ours/diffusers {o / d:.2f}; ddim/hand-written: min "
              f"{best['ours ddim'] / best[ref]:.2f}, median {med['ours ddim'] / med[ref]:.2f}; ddim/hand-written "
              f"(float coefficients): min {best['ours ddim'] / best[tight]:.2f}, median "
              f"{med['ours ddim'] / med[tight]:.2f}", flush=True)
    return out

"""Reflow (2-rectified flow, Liu, Gong & Liu 2022) and InstaFlow (Liu et al. 2023), ALGORITHMS card 14.

Reflow couples noise and data with the teacher's probability-flow ODE and retrains the straight path:

    z_j ~ N(0, I),  x0_j = ODE_teacher(z_j)                       j = 1..M, stored once, COUPLED as (z_j, x0_j)
    x_t = (1 - t) x0_j + t n_j,   t ~ p(t)                        (rectified-flow path, t = 0 data, t = 1 noise)
    loss = || u_theta(x_t, t) - (n_j - x0_j) ||^2                 (mean over dims; u = dx_t/dt, the velocity)

with n_j = z_j when the teacher starts at t = 1 (below: the exact start otherwise).

InstaFlow then distils the (nearly) straight 2-RF into one step: G(z) = x_s - t_s u_theta(x_s, t_s) with
x_s = sigma(t_s) z (one Euler step from the noise end t_s, = 1 on a plain RF path, to t = 0), regressed on the
stored x0_j with L2 (the paper's LPIPS is not available here).

The start on the rectified-flow path, exactly. A teacher starts at its own t_max from x = prior z. At equal
log-SNR its noise end is the RF time t* = sigma_edm / (1 + sigma_edm), sigma_edm = sigma/alpha at the teacher's
t_max (EDM: 80 -> t* = 80/81; an RF teacher: t* = 1), and its start state there is x_{t*} = t* z (the prior draw
keeps no data part). `uf.sample(ctx.teacher, z)` starts exactly there. The student is the teacher's network
re-expressed on RF too, so its noise end is the same t_s = t* and it starts from the same t_s z. The pair's line
must pass through that start state, so the RF noise of pair j is not z_j but

    n_j = z_j - (alpha(t_s) / sigma(t_s)) x0_j        (= z_j - x0_j / 80 for EDM; = z_j when t_s = 1)

which gives x_{t_s} = alpha(t_s) x0_j + sigma(t_s) n_j = sigma(t_s) z_j exactly; training times are drawn on the
student's own range [t_eps, t_s]. Then one Euler step of the exact 2-RF from (t_s, sigma(t_s) z_j) lands on x0_j.
The file stores the teacher's own standard-normal z_j (shared with DMD's regression, whose student keeps the
teacher's path); n_j is formed per batch with the student's t_s.

Pairs are a file `RUN/pairs.safetensors` ("noise" then "data", plus the header metadata) with a JSON sidecar
`pairs.json`; pair j's noise comes from its own stream `samplers.generators(seed, j, 1)`, so the pairs depend
only on the seed, never on the batch size. Written once (atomically); a resumed or repeated run reads them back,
and a file made with another teacher, solver, count or seed is refused with one message.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import UnifuseError, choose
from ..io import atomic_write, write_json
from ..objectives.losses import mean_dims
from ..objectives.time import rand_uniform
from ..samplers.base import generators, randn
from ..samplers.steps import step_euler
from ..sampling import sample

F64 = torch.float64
PAIRS_FILE = "pairs.safetensors"
TIMES = ("uniform", "u_shaped")


# --- the teacher's ODE pairs ----------------------------------------------------------------------------------
def teacher_start(teacher) -> tuple:
    """(t*, sigma(t*)): the teacher's noise end on its (student's) path and the prior scale it starts with."""
    t_star = float(getattr(teacher, "t_max", teacher.path.t_max))
    return t_star, float(teacher.path.sigma(torch.tensor(t_star, dtype=F64)))


def pair_noise(seed: int, start: int, count: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of pairs start .. start+count-1: pair j from its own stream (seed, j)."""
    return randn((count, *shape), generators(seed, start, count), dtype=dtype)


@torch.no_grad()
def make_pairs(teacher, shape, count: int, seed: int, solver: str = "unipc", nfe: int = 64, *,
               batch: int = 512, device=None, dtype=torch.float32) -> tuple:
    """(noise [M, *shape], data [M, *shape]) on the CPU: data_j = the teacher's ODE solution from noise_j,
    starting at the teacher's t_max from prior * noise_j (`uf.sample`, deterministic `solver` at `nfe`)."""
    noises, datas = [], []
    for start in range(0, count, batch):
        z = pair_noise(seed, start, min(batch, count - start), shape, dtype)
        x0 = sample(teacher, z.to(device), sampler=solver, nfe=nfe, grad=False, progress=False)
        noises.append(z)
        datas.append(x0.detach().to("cpu", dtype))
    return torch.cat(noises), torch.cat(datas)


def teacher_identity(teacher) -> str:
    """A fingerprint of the teacher: its description and a hash of its network's weights and buffers."""
    h = hashlib.sha256(repr(teacher).encode())
    for name, value in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", F64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_make_pairs(ctx, *, count: int, seed: int, solver: str, nfe: int, batch: int = 512,
                       dtype=torch.float32) -> dict:
    """The run's stored pairs {"noise", "data"} (CPU tensors): read from RUN/pairs.safetensors when present
    (never rewritten; a file made for another teacher/solver/count/seed is an error), else made and written once."""
    from safetensors.torch import load_file, safe_open, save_file

    shape = [int(s) for s in ctx.info["shape"]]
    t_star, prior = teacher_start(ctx.teacher)
    meta = dict(teacher=teacher_identity(ctx.teacher), path=repr(ctx.teacher.path), solver=solver, nfe=int(nfe),
                count=int(count), seed=int(seed), shape=shape, t_start=t_star, dtype=str(dtype).replace("torch.", ""))
    file = os.path.join(ctx.run_dir, PAIRS_FILE)
    sidecar = os.path.splitext(file)[0] + ".json"
    if os.path.exists(file):
        with safe_open(file, "pt") as fh:
            stored = json.loads(fh.metadata().get("pairs", "{}"))
        bad = {k: (stored.get(k), v) for k, v in meta.items() if stored.get(k) != v}
        if bad:
            what = ", ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in bad.items())
            raise UnifuseError(f"{file} holds teacher ODE pairs made differently ({what}); use another run folder "
                               f"or delete the file to make new pairs")
        pairs = load_file(file)
    else:
        noise, data = make_pairs(ctx.teacher, shape, count, seed, solver, nfe, batch=batch, device=ctx.device,
                                 dtype=dtype)
        pairs = {"noise": noise.contiguous(), "data": data.contiguous()}
        atomic_write(file, lambda tmp: save_file(pairs, tmp, metadata={"pairs": json.dumps(meta)}))
    if not os.path.exists(sidecar):
        write_json(sidecar, dict(meta, prior_sigma=prior, file=PAIRS_FILE, order=["noise", "data"]))
    return pairs


def pair_batch(pairs: dict, n: int, generator=None, device=None, dtype=None) -> tuple:
    """(noise, data) of n pairs drawn with replacement: ONE index per pair, so the two sides stay coupled."""
    where = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(0, pairs["noise"].shape[0], (n,), generator=generator, device=where).cpu()
    return tuple(pairs[k][idx].to(device=device, dtype=dtype) for k in ("noise", "data"))


# --- the rectified-flow loss on coupled pairs -------------------------------------------------------------------
def rand_u_shaped(n: int, a: float = 4.0, *, generator=None, device=None) -> torch.Tensor:
    """t in (0, 1) with density proportional to cosh(a (t - 1/2)) (rfpp's U-shaped law, Lee et al. 2024), by
    inversion of its CDF: t = 1/2 + asinh((2u - 1) sinh(a/2)) / a."""
    where = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand(n, generator=generator, device=where, dtype=F64)
    return 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a


def start_noise(model, z: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The noise n on `model`'s path whose line alpha x0 + sigma n meets model's start state sigma(t_s) z at its
    noise end t_s: n = z - (alpha(t_s) / sigma(t_s)) x0 (n = z where alpha(t_s) = 0)."""
    t_s = torch.tensor(float(getattr(model, "t_max", model.path.t_max)), dtype=F64)
    ratio = float(model.path.alpha(t_s)) / float(model.path.sigma(t_s))
    return z - ratio * data if ratio != 0.0 else z


def coupled_target(path, noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> tuple:
    """(x_t, u_target) on the coupled pair: x_t = alpha x0 + sigma z, u = alpha' x0 + sigma' z (= z - x0 on RF)."""
    a, s, da, ds = (c.to(data.dtype).reshape((-1,) + (1,) * (data.ndim - 1)) for c in path.coefficients(t))
    return a * data + s * noise, da * data + ds * noise


def one_step(model, noise: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """G(z) = one Euler step of `model` from its noise end (x = prior z) to the data end."""
    t_top = float(getattr(model, "t_max", model.path.t_max))
    prior = float(model.path.sigma(torch.tensor(t_top, dtype=F64)))
    t0 = float(model.path.t_min)
    return step_euler(model, noise * prior, t_top, t0, cond=cond)


@dataclass
class Reflow:
    """2-rectified flow on the teacher's ODE pairs (card 14); per-sample losses [B].

    pairs 4096 (small data; the RectifiedFlow README asks for >= 1M on images), made once by `solver` "unipc"
    at `solver_nfe` 64 from the teacher's t_max (the ODE's error becomes the student's target: card 14 pitfall),
    seed None = the run's seed. time: "uniform" (card 13/14: t ~ U(0, 1), here on the student's [t_eps, t_s]) or
    "u_shaped" (rfpp, density cosh(u_shape (t - 1/2)) on that range, u_shape 4). The student lives on "rf" with
    the teacher's prediction kind re-expressed there (an eps or score teacher whose path reaches zero SNR gives a
    student that cannot start at t_s = 1: the sampler says so) and samples with Euler on the uniform grid, any K.
    Solver choice, measured on the exact Gaussian teacher (max pair error at 64 NFE): unipc 1e-4 (EDM, DDPM) to
    9e-4 (RF), dpmpp_2m 4e-3 to 8e-3, heun 1.2e-2; "adaptive" (Dormand-Prince) 4e-6 in 37 NFE.
    Pairs are made unconditionally (the batch's condition belongs to the data batch, not to the pair)."""

    pairs: int = 4096
    solver: str = "unipc"
    solver_nfe: int = 64
    seed: int | None = None
    time: str = "uniform"
    u_shape: float = 4.0
    pair_batch: int = 512
    store: dict | None = field(default=None, init=False, repr=False)

    name = "reflow"
    student_path = "rf"
    student_prediction = None
    sampler = "euler"
    spacing = "uniform"
    nfe = None

    def __post_init__(self):
        choose("reflow time density", self.time, TIMES)
        if self.pairs < 1 or self.solver_nfe < 1:
            raise UnifuseError(f"pairs and solver_nfe must be >= 1, got pairs={self.pairs}, "
                               f"solver_nfe={self.solver_nfe}")

    def setup(self, ctx) -> None:
        seed = ctx.seed if self.seed is None else self.seed
        self.store = ctx.main_first(lambda: load_or_make_pairs(ctx, count=self.pairs, seed=seed, solver=self.solver,
                                                               nfe=self.solver_nfe, batch=self.pair_batch))

    def sample_time(self, n: int, model, generator=None, device=None) -> torch.Tensor:
        """Training times on the student's own range [t_eps, t_s] (t_s < 1 for a teacher with finite sigma_max)."""
        lo, hi = float(model.t_eps), float(getattr(model, "t_max", model.path.t_max))
        if self.time == "u_shaped":
            return lo + (hi - lo) * rand_u_shaped(n, self.u_shape, generator=generator, device=device)
        return rand_uniform(n, model.path, lo, hi, generator=generator, device=device)

    def reflow_loss(self, ctx, n: int, dtype, generator) -> torch.Tensor:
        """The flow-matching loss on n coupled pairs: mean_dims (u_theta(x_t, t) - (n - x0))^2."""
        z, data = pair_batch(self.store, n, generator, ctx.device, dtype)
        noise = start_noise(ctx.student, z, data)
        t = self.sample_time(n, ctx.student, generator, ctx.device)
        x_t, target = coupled_target(ctx.student.path, noise, data, t)
        u = ctx.student.predict(x_t, t, "velocity")
        return mean_dims((u - target.to(u.dtype)) ** 2)

    def loss(self, ctx, x, cond, *, generator=None, step: int = 0) -> torch.Tensor:
        return self.reflow_loss(ctx, x.shape[0], x.dtype, generator)


@dataclass
class InstaFlow(Reflow):
    """Reflow for the first `reflow_fraction` (0.5) of the budget, then one-step distillation of the 2-RF (card
    14; Liu et al. 2023): G(z) = one Euler step of the student from its noise end (t_s, sigma(t_s) z) to t = 0
    (z - u_theta(z, 1) when t_s = 1), loss mean_dims (G(z_j) - x0_j)^2 on the stored pairs. L2 only:
    InstaFlow's LPIPS stage needs a perceptual network this library does not ship. Samples with one Euler step
    only (nfe (1,)): the distillation trains the field at t = 1 alone and the other times drift. Measured on 2-D
    Gaussian data after 1000 steps (500 distilling): SW 0.055 / 0.113 / 0.146 at 1 / 2 / 4 Euler steps, against
    0.056 at every K for the 2-RF before distillation (sampling floor 0.054)."""

    reflow_fraction: float = 0.5

    name = "instaflow"
    nfe = (1,)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.reflow_fraction <= 1.0:
            raise UnifuseError(f"reflow_fraction must be in [0, 1], got {self.reflow_fraction}")

    def distill_loss(self, ctx, n: int, dtype, generator) -> torch.Tensor:
        """One-step regression mean_dims (G(z_j) - x0_j)^2 with G one Euler step of the student from its t_s."""
        noise, data = pair_batch(self.store, n, generator, ctx.device, dtype)
        out = one_step(ctx.student, noise)
        return mean_dims((out - data.to(out.dtype)) ** 2)

    def loss(self, ctx, x, cond, *, generator=None, step: int = 0) -> torch.Tensor:
        if ctx.progress < self.reflow_fraction:
            ctx.scalars["phase"] = 0
            return self.reflow_loss(ctx, x.shape[0], x.dtype, generator)
        ctx.scalars["phase"] = 1
        return self.distill_loss(ctx, x.shape[0], x.dtype, generator)


__all__ = ["InstaFlow", "Reflow", "coupled_target", "load_or_make_pairs", "make_pairs", "one_step", "pair_batch",
           "pair_noise", "rand_u_shaped", "start_noise", "teacher_start"]

"""What every sampler shares (DESIGN rules 5-6, after k-diffusion's `sampling.py` and EDM's `edm_sampler`).

A sampler is a plain function

    sample_NAME(model, x, ts, *, cond=None, noise=None, callback=None, **options) -> Tensor

over an explicit float64 time grid `ts` (t_0 > t_1 > ...; `x` is the state at t_0). When the grid ends on
the data end (sigma = 0) the last step returns the denoised estimate of the current point. All step
coefficients are computed from the float64 grid on the CPU before the loop (`Schedule`, in the call's
`plan.Plan`), so the loop only multiplies and adds tensors by Python floats: no host-device sync and no
schedule arithmetic in the model's dtype. Randomness comes from a `NoiseSource`, one stream per sample, so
sample i depends only on its seed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import UnifuseError
from ..model import Evaluation
from .plan import Schedule, as_plan, check_grid, evaluate_prepared, preparable, prepare_grid, schedule

F64 = torch.float64
INF = math.inf


# --- one time's coefficients ------------------------------------------------------------------------------
def t_at_lambda(path, lam: float) -> float:
    """Native time at half log-SNR lam (the inverse used for intermediate stages)."""
    return float(path.t_from_log_snr(torch.tensor(2.0 * lam, dtype=F64)))


def coefs_at(path, t: float):
    """(alpha, sigma, d_alpha, d_sigma, lambda) at one time, Python floats."""
    sch = schedule(path, [t])
    return sch.alpha[0], sch.sigma[0], sch.d_alpha[0], sch.d_sigma[0], sch.lam[0]


# --- exponential-integrator weights -------------------------------------------------------------------
def phi(k: int, z: float) -> float:
    """phi_k(z) = (e^z - sum_{j<k} z^j/j!) / z^k (phi_0 = e^z), accurate for small |z| (series)."""
    if z == -INF:  # e^z -> 0 and every phi_k(z) -> 0
        return 0.0
    if abs(z) < 0.2:  # series: sum_j z^j / (j + k)!
        return sum(z**j / math.factorial(j + k) for j in range(18))
    if k == 0:
        return math.exp(z)
    return (math.exp(z) - sum(z**j / math.factorial(j) for j in range(k))) / z**k


# --- noise, one stream per sample ----------------------------------------------------------------------
def _seed_for(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of base seed `seed` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def generators(seed: int, start: int, count: int) -> list:
    """The per-sample streams of samples start .. start + count - 1 of base seed `seed`: the streams an int
    seed gives (`NoiseSource(seed, batch)` uses generators(seed, 0, batch)), so a batch of any size, taken
    from anywhere in a run, draws exactly what one large batch would. Draw the initial noise with
    `randn(shape, generator=gens)` and pass the same list to the sampler: its noise continues each stream."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UnifuseError(f"seed must be an integer, got {seed!r}")
    if start < 0 or count < 0:
        raise UnifuseError(f"start and count must be >= 0, got start={start}, count={count}")
    return [torch.Generator().manual_seed(_seed_for(int(seed), i)) for i in range(start, start + count)]


class NoiseSource:
    """Standard normal draws for stochastic steps.

    generator: None (torch's global RNG), a torch.Generator (one stream for the whole batch), a list of
    torch.Generators (one per sample), an int seed (sample i gets its own stream seeded from (seed, i)) or
    a list of int seeds (one per sample). With a list or an int seed, sample i depends only on its own
    stream, whatever the batch size; that costs one RNG call per sample and stochastic step, so for very
    large batches of small samples a single torch.Generator is much faster.
    """

    def __init__(self, generator=None, batch: int | None = None):
        self.per_sample = None
        self.single = None
        if generator is None:
            return
        if isinstance(generator, torch.Generator):
            self.single = generator
            return
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            if batch is None:
                raise UnifuseError("an int seed needs the batch size to make one stream per sample")
            generator = generators(int(generator), 0, batch)
        if isinstance(generator, Sequence) and len(generator) > 0:
            gens = []
            for g in generator:
                if isinstance(g, torch.Generator):
                    gens.append(g)
                elif isinstance(g, (int, np.integer)) and not isinstance(g, bool):
                    gens.append(torch.Generator().manual_seed(int(g)))
                else:
                    raise UnifuseError("generator list entries must be torch.Generator or int seeds, "
                                       f"got {type(g).__name__}")
            if batch is not None and len(gens) != batch:
                raise UnifuseError(f"got {len(gens)} generators for a batch of {batch}; pass one per sample")
            self.per_sample = gens
            return
        raise UnifuseError("generator must be None, a torch.Generator, an int seed or a list of them, "
                           f"got {generator!r}")

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        """A standard normal tensor shaped like `like` (its dtype and device)."""
        if self.per_sample is not None:
            if len(self.per_sample) != like.shape[0]:
                raise UnifuseError(f"got {len(self.per_sample)} generators for a batch of {like.shape[0]}; "
                                   "pass one per sample")
            shape = like.shape[1:]
            parts = [torch.randn(shape, generator=g, device=g.device, dtype=like.dtype) for g in self.per_sample]
            return torch.stack(parts).to(like.device, non_blocking=True)
        if self.single is not None:
            z = torch.randn(like.shape, generator=self.single, device=self.single.device, dtype=like.dtype)
            return z.to(like.device, non_blocking=True)
        return torch.randn_like(like)


def randn(shape, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Initial noise drawn the same way as a sampler's noise (per-sample streams for lists and int seeds)."""
    like = torch.empty(tuple(shape), dtype=dtype, device=device)
    return NoiseSource(generator, like.shape[0])(like)


def as_noise_source(noise, batch: int) -> NoiseSource:
    return noise if isinstance(noise, NoiseSource) else NoiseSource(noise, batch)


# --- the evaluator: one call = one network evaluation ---------------------------------------------------
def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Samplers keep their state in float32 at least (float64 when given float64)."""
    return F64 if x.dtype == F64 else torch.float32


class Evaluator:
    """Evaluates the model (one call = one NFE) from the plan's prepared network inputs where it can
    (`plan.preparable`), else through `model.evaluate`; checks for non-finite states, drives the progress bar
    and the per-step callback."""

    def __init__(self, model, x: torch.Tensor, cond=None, callback: Callable | None = None,
                 name: str = "sampler", progress: bool = False, check_finite: bool = True, info=None):
        if not hasattr(model, "evaluate") or not hasattr(model, "path"):
            raise UnifuseError("samplers need a uf.DiffusionModel (with .evaluate and .path), "
                               f"got {type(model).__name__}")
        self.model, self.cond, self.callback, self.name = model, dict(cond or {}), callback, name
        self.in_dtype = x.dtype
        self.like = x.new_zeros(()).expand(x.shape)  # x's shape, dtype and device without holding its memory
        self.fast = preparable(model)  # evaluated from prepared network inputs (else through model.evaluate)
        self.cache, self.pending = {}, []
        self.nfe = 0
        self.step, self.n_steps, self.t = 0, 0, None
        self.progress, self.bar = progress, None
        self.check_finite = check_finite
        self.on_cpu = x.device.type == "cpu"
        self.sums = None  # device-side per-step checks, read once at the end (no sync per step)
        self.info = info
        self.constants = {}  # per-grid constants a sampler may keep between calls (see `setup`)

    @property
    def path(self):
        return self.model.path

    def prepare(self, t: float):
        """Queue time t; queued times are prepared together (one vectorized schedule computation)."""
        if self.fast and t not in self.cache:
            self.pending.append(t)

    def _flush(self):
        times = list(dict.fromkeys(t for t in self.pending if t not in self.cache))
        self.pending = []
        if times:
            self.cache.update(zip(times, prepare_grid(self.model, torch.tensor(times, dtype=F64), self.like)))

    def __call__(self, x: torch.Tensor, t: float) -> Evaluation:
        """x0_hat and eps_hat at (x, t); t is a Python float (a grid or stage time)."""
        self.nfe += 1
        self.t = t
        xin = x if x.dtype == self.in_dtype else x.to(self.in_dtype)
        try:
            if self.fast:
                prepared = self.cache.get(t)
                if prepared is None:
                    self.pending.append(t)
                    self._flush()
                    prepared = self.cache[t]
                return evaluate_prepared(self.model, xin, prepared, **self.cond)
            return self.model.evaluate(xin, torch.tensor(t, dtype=F64), **self.cond)
        except UnifuseError as err:
            raise UnifuseError(f"{self.name} at step {self.step} (t = {t:.6g}): {err}") from None
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise UnifuseError(f"{self.name}: the model failed at step {self.step} (t = {t:.6g}) on an input of shape "
                               f"{tuple(xin.shape)} and dtype {xin.dtype}: {str(err).splitlines()[0]}; pass noise "
                               "shaped like the model's data [batch, ...] and the condition it expects") from None

    # --- the step loop ---------------------------------------------------------------------------------
    def steps(self, n: int):
        """range(n) that tracks the step, shows progress and checks the state after each step."""
        self.n_steps = n
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, desc=self.name, leave=False)
        try:
            for i in range(n):
                self.step = i
                yield i
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def done(self, i: int, t: float, x: torch.Tensor, denoised: torch.Tensor | None = None) -> None:
        """After step i (ending at time t): finite check, progress, callback."""
        if self.check_finite:
            s = (x.detach() if x.requires_grad else x).sum()  # one reduction: NaN or inf anywhere makes it non-finite
            if self.on_cpu:  # checked now, so sampling stops at the step that failed
                v = s.item()
                if not math.isfinite(v):
                    self._fail(i, t, v)
            else:  # kept on the device and read once in `finish`: no host sync inside the loop
                self._defer(i, s)
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(i, t, x, denoised)

    def _defer(self, i, s):
        if self.sums is None:
            self.sums = torch.zeros(max(self.n_steps, 1), dtype=s.dtype, device=s.device)
        self.sums[min(i, self.sums.numel() - 1)] = s

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Read the deferred device-side checks once (one sync per call) and return x."""
        if self.sums is not None and not bool(torch.isfinite(self.sums).all()):
            i = int(torch.nonzero(~torch.isfinite(self.sums))[0])
            self._fail(i, None, float(self.sums[i]))
        if self.info is not None:
            self.info.update(nfe=self.nfe, steps=self.n_steps)
        return x

    def _fail(self, i, t, value):
        where = f" (t = {t:.6g})" if t is not None else ""
        raise UnifuseError(f"{self.name}: a non-finite value ({value}) appeared in the state at step {i} of "
                           f"{self.n_steps}{where}; the model output or the step is not finite there: check the "
                           "model at that time, use a prediction kind that is finite at the path's ends (v, x0, "
                           "velocity) or start below the noise end")


def setup(name, model, x, ts, cond, noise, callback, progress, info=None, check_finite=True, plan=None):
    """(evaluator, schedule, state, noise source) for one sampling call; all time-only work is done here, in
    `plan` (a `Plan` the caller keeps, so a second call with the same grid, model settings, batch size, dtype
    and device repeats none of it; None: a plan for this call only).
    `info`, a dict, receives the number of network evaluations ("nfe") and grid steps when sampling ends."""
    plan = as_plan(plan, name)
    path = getattr(model, "path", None)
    grid = plan.grid(path, ts) if path is not None else check_grid(ts)  # a model without a path: refused below
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        raise UnifuseError(f"{name}: x must be a floating-point tensor [batch, ...], got {type(x).__name__}")
    ev = Evaluator(model, x, cond, callback, name, progress, check_finite, info)
    ev.constants = grid.constants
    if ev.fast:  # the grid's evaluations, prepared from the same coefficients
        ev.cache.update(plan.network_inputs(model, grid, ev.like))
    return ev, grid.sch, x.to(state_dtype(x)), as_noise_source(noise, x.shape[0])


def singlestep_orders(sch: Schedule, orders, max_order: int, name: str, zero_snr_first_order: bool = True) -> list:
    """Order of each step that is not the final denoising step (for the exponential integrators a step from
    zero SNR is first order: its stage times are undefined there)."""
    n = len(sch.t) - 1 - (1 if sch.ends_on_data else 0)
    if orders is None:
        orders = [max_order] * n
    orders = [int(o) for o in orders]
    if len(orders) != n or any(o < 1 or o > max_order for o in orders):
        raise UnifuseError(f"{name}: orders must list {n} step orders in 1..{max_order} (the final step to the data "
                           f"is a denoising step), got {orders}")
    if n and zero_snr_first_order and sch.lam[0] == -INF:
        orders[0] = 1  # from alpha = 0 the higher-order stages are undefined (h = inf)
    return orders


def linear(x: torch.Tensor, cx: float, terms) -> torch.Tensor:
    """cx * x + sum_k c_k y_k for (c_k, y_k) in terms, with Python-float coefficients (zeros skipped)."""
    out = x * cx if cx != 1.0 else x.clone()
    for c, y in terms:
        if c != 0.0:
            out.add_(y, alpha=c)
    return out


def check_options(name: str, options: dict, allowed: Sequence[str]) -> None:
    """Refuse options the sampler does not take, naming them and the valid ones."""
    bad = [k for k in options if k not in allowed]
    if bad:
        valid = ", ".join(sorted(allowed)) or "none"
        raise UnifuseError(f"sampler {name!r} does not take option(s) {', '.join(map(repr, bad))}; "
                           f"its options: {valid}")

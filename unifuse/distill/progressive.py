"""Progressive distillation (Salimans & Ho 2022; ALGORITHMS card 15): one student DDIM step does the work of two
deterministic teacher DDIM steps, and each round halves the number of steps, N0 -> N0/2 -> ... -> 1.

On the student's N-step grid t_0 > t_1 > ... > t_N (the grid `uf.sample(student, noise, "ddim", nfe=N,
spacing=...)` uses), with i ~ U{0..N-1}, t = t_i, t'' = t_{i+1} and t' between them:

    z_t   = alpha_t x + sigma_t eps
    z_t'  = alpha_t'  xhat_T(z_t)  + (sigma_t'/sigma_t)   (z_t  - alpha_t  xhat_T(z_t))       teacher DDIM step
    z_t'' = alpha_t'' xhat_T(z_t') + (sigma_t''/sigma_t') (z_t' - alpha_t' xhat_T(z_t'))      teacher DDIM step
    x~    = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    loss  = max(SNR_t, 1) mean_dims(x~ - xhat_S(z_t))^2          (truncated SNR = max(x-loss, eps-loss))

x~ is the x0 for which ONE student DDIM step from z_t lands exactly on the teacher's z_t''. On the last interval
(t'' = the data end: sigma = 0, alpha = 1) it is z_t'' itself, the teacher's x-hat at z_t'.

t' is the teacher's own grid point where the 2N-step grid interleaves the N-step one (the paper's t - 0.5/N:
spacing "uniform" on a path whose network reaches the data end, e.g. rf or trigflow), else the log-SNR midpoint;
on an interval ending at the data end it is the 2N-step grid's least noisy time (a single teacher step where that
is t itself). Round r of R = log2(N0) + 1 runs on the fraction [r/R, (r+1)/R) of the budget; its teacher is the
frozen student of round r - 1 (round 0: the distillation teacher).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UnifuseError, choose
from ..model import DiffusionModel
from ..objectives.losses import draw_noise, mean_dims
from ..parameterization.kinds import defined_at_zero_snr
from ..paths.base import broadcast
from ..paths.grids import SPACINGS
from ..samplers.steps import step_ddim
from .base import Context, frozen_copy, rebind

F64 = torch.float64


def ddim_grid(model: DiffusionModel, steps: int, spacing: str = "") -> torch.Tensor:
    """The float64 grid of `uf.sample(model, noise, "ddim", nfe=steps, spacing=spacing or None)` (its own
    planning function, `sampling.planned_grid`, with uf.sample's default grid options)."""
    from .. import samplers
    from ..sampling import planned_grid

    spacing = spacing or samplers.get("ddim").spacing
    grid_kw = dict(rho=7.0, shift=3.0, sigma_min=None, sigma_max=None, t_max=float(model.t_max))
    zero_ok = defined_at_zero_snr(model.prediction)
    return planned_grid(model.path, "ddim", steps, spacing, grid_kw, zero_ok, {})[0]


def midpoints(path, grid: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """t' for each interval of `grid` (N steps) given the 2N-step grid `fine` (see the module docstring)."""
    n = grid.numel() - 1
    if fine.numel() == 2 * n + 1 and torch.allclose(fine[::2], grid, rtol=1e-12, atol=1e-12):
        return fine[1::2].clone()
    lam = path.log_snr(grid)
    mids = []
    for i in range(n):
        t, t2 = float(grid[i]), float(grid[i + 1])
        if float(path.sigma(grid[i + 1])) == 0.0:  # to the data end
            mids.append(min(t, float(fine[-2])))
        elif math.isfinite(float(lam[i])) and math.isfinite(float(lam[i + 1])):
            mids.append(float(path.t_from_log_snr(0.5 * (lam[i] + lam[i + 1]))))
        else:
            mids.append(0.5 * (t + t2))
    return torch.tensor(mids, dtype=F64)


class _Round:
    """The current round's index, kept in checkpoints (`Context.add_state`)."""

    def __init__(self):
        self.index = 0

    def state_dict(self) -> dict:
        return {"round": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["round"])


@dataclass
class ProgressiveDistillation:
    """Progressive distillation (card 15): 2 teacher DDIM steps -> 1 student step, rounds halving the steps.

    start_steps   N0 = 16, the first round's student steps (a power of 2; the paper starts from 1024 or 8192
                  teacher steps with 50k iterations per round, too long here: the loop's budget is split into
                  log2(N0) + 1 equal rounds N0, N0/2, ..., 1)
    spacing       "uniform": the paper's t = i/N (nested grids on rf/trigflow, so each round's teacher steps on
                  its own trained grid); "" = DDIM's default (karras), better on EDM-like paths
    student path: "trigflow" (alpha = cos t, sigma = sigma_d sin t: uniform t there is the paper's cosine schedule, and
                  the halved grids nest exactly); the teacher's own path with student_path=None
    student kind: the teacher's; the paper uses x- or v-prediction, an eps student breaks at zero SNR. No evaluation
    EMA (ema = False; the reference config uses none).
    """

    start_steps: int = 16
    spacing: str = "uniform"
    ema: bool = False
    student_path: str | None = "trigflow"
    student_prediction: str | None = None
    name: ClassVar[str] = "progressive"
    sampler: ClassVar[str] = "ddim"

    def __post_init__(self):
        n = self.start_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
            raise UnifuseError(f"start_steps must be a power of 2 (1, 2, 4, ...), got {n!r}")
        if self.spacing:
            choose("spacing", self.spacing, SPACINGS)
        self._round = _Round()
        self._grids: dict = {}

    @property
    def nfe(self) -> tuple:
        """The student's steps in each round: (N0, N0/2, ..., 1)."""
        return tuple(self.start_steps >> r for r in range(self.start_steps.bit_length()))

    @property
    def rounds(self) -> int:
        return len(self.nfe)

    def student_kind(self, teacher_prediction: str) -> str | None:
        """The student keeps the teacher's kind (None)."""
        return None

    def round_at(self, progress: float) -> int:
        """round = min(floor(progress * rounds), rounds - 1)."""
        return min(max(math.floor(progress * self.rounds), 0), self.rounds - 1)

    # --- setup and rounds ---------------------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        """Registers the round index, the round teacher and one snapshot per round but the last (all
        copies of the student until their round ends), so a resume restores whichever are in use."""
        grid = ddim_grid(ctx.student, self.start_steps, self.spacing)
        if not defined_at_zero_snr(ctx.student.prediction) and float(ctx.student.path.alpha(grid[:1])[0]) == 0.0:
            raise UnifuseError(f"a {ctx.student.prediction!r} student cannot start from zero SNR (the first step of "
                               f"the {self.spacing or 'default'!r} grid on this path): distil into a v or x0 student "
                               "(the paper's choice) or use spacing='karras'")
        self._round = _Round()
        ctx.add_state("progressive", self._round)
        ctx.add_net("round_teacher", frozen_copy(ctx.student_net))
        for k in self.nfe[:-1]:
            ctx.add_net(f"nfe_{k}", frozen_copy(ctx.student_net))
        ctx.scalars["round"] = 0

    def _advance(self, ctx: Context) -> None:
        """At a round change: snapshot the finished rounds' student; it becomes the new round's teacher."""
        target = self.round_at(ctx.progress)
        while self._round.index < target:
            done = self.nfe[self._round.index]
            ctx.nets[f"nfe_{done}"].load_state_dict(ctx.student_net.state_dict())
            ctx.nets["round_teacher"].load_state_dict(ctx.student_net.state_dict())
            self._round.index += 1
        ctx.scalars["round"] = self._round.index

    def teacher(self, ctx: Context) -> DiffusionModel:
        """This round's teacher: ctx.teacher in round 0, then the frozen student of the previous round."""
        if self._round.index == 0:
            return ctx.teacher
        return rebind(ctx.student, ctx.nets["round_teacher"])

    def snapshots(self, ctx: Context) -> dict:
        """{steps: network}: the student at the end of each finished round, and the live student for the current
        round's steps (so the last round's is the trained student itself)."""
        out = {self.nfe[r]: ctx.nets[f"nfe_{self.nfe[r]}"] for r in range(self._round.index)}
        out[self.nfe[self._round.index]] = ctx.student_net
        return out

    # --- the target and the loss -----------------------------------------------------------------------------
    def grids(self, model: DiffusionModel, steps: int) -> tuple:
        """(grid [N + 1], t' [N]) for `steps` student steps (kept per path, steps and time range)."""
        key = (model.path, steps, float(model.t_max), model.prediction)
        if key not in self._grids:
            grid = ddim_grid(model, steps, self.spacing)
            self._grids[key] = (grid, midpoints(model.path, grid, ddim_grid(model, 2 * steps, self.spacing)))
        return self._grids[key]

    def target(self, teacher: DiffusionModel, student: DiffusionModel, x: torch.Tensor, steps: int, cond: dict,
               generator=None) -> tuple:
        """(z_t, t, x~): the student's input at per-sample times t of its `steps`-step grid and the x-target
        of two teacher DDIM steps t -> t' -> t'' (module docstring), without gradients."""
        grid, mids = self.grids(student, steps)
        where = generator.device if generator is not None else x.device
        i = torch.randint(0, steps, (x.shape[0],), generator=generator, device=where).cpu()
        t, t1, t2 = grid[i], mids[i], grid[i + 1]
        noise = draw_noise(x, generator)
        path = student.path
        z_t = path.interpolate(x, noise, t.to(x.device)).to(x.dtype)
        with torch.no_grad():
            z1 = step_ddim(teacher, z_t, t, t1, eta=0.0, cond=cond).mean
            z2 = step_ddim(teacher, z1.to(x.dtype), t1, t2, eta=0.0, cond=cond).mean
            a, s, a2, s2 = path.alpha(t), path.sigma(t), path.alpha(t2), path.sigma(t2)
            ratio = s2 / s
            z_t64 = z_t.to(z2.dtype)
            x_tilde = (z2 - broadcast(ratio, z_t64) * z_t64) / broadcast(a2 - ratio * a, z_t64)
        return z_t, t, x_tilde

    def loss(self, ctx: Context, x: torch.Tensor, cond: dict, *, generator=None, step: int = 0) -> torch.Tensor:
        """max(SNR_t, 1) mean_dims(x~ - xhat_student(z_t))^2 per sample."""
        self._advance(ctx)
        cond = cond or {}
        steps = self.nfe[self._round.index]
        z_t, t, x_tilde = self.target(self.teacher(ctx), ctx.student, x, steps, cond, generator)
        x_hat = ctx.student.denoise(z_t, t.to(x.device), **cond)
        weight = torch.exp(ctx.student.path.log_snr(t)).clamp(min=1.0).to(x.device, x_hat.dtype)
        return weight * mean_dims((x_hat - x_tilde.to(x_hat.dtype)) ** 2)


__all__ = ["ProgressiveDistillation", "ddim_grid", "midpoints"]

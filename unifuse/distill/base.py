"""What every distillation method is, and what the distillation loop hands it (ALGORITHMS cards 14-20).

A method is a dataclass of hyperparameters (like an objective) with:

    name                      its registry name (`unifuse distill NAME`)
    student_path              where the student lives: a uf.paths name, or None for the teacher's own path
    student_prediction        the student's prediction kind, or None for the teacher's ("consistency" switches an
                              "edm" teacher's network to the boundary-condition scalings: the same network)
    sampler, nfe              how the student samples: a sampler name and the NFEs it supports (None: any K >= 1)
    setup(ctx)                once, before training and before a resume restores state: frozen copies, extra
                              networks and their optimizers (ctx.add_net / ctx.add_optimizer), stored pairs
    loss(ctx, x, cond, *, generator, step) -> [B]
                              per-sample losses whose gradient trains the student; a method with networks of its
                              own (DMD's fake score) updates them here first, with its own optimizer

The teacher is frozen and re-expressed on the student's path (`teacher.on(student_path)`), so nothing in a method
assumes the teacher's family: a method reads the teacher through `ctx.teacher.evaluate / predict / denoise` and
the one-step functions of `samplers.steps`, all in the student's native time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import DiffusionModel, rebind
from ..training.run import Holds


@dataclass
class Context(Holds):
    """What a method sees: the models, the data, the budget, and the registry of what a checkpoint holds.

    teacher        frozen (eval, no grad), on the student's path
    student        trainable: the network as trained (compiled / data-parallel), on the student's path
    student_net    the raw student network (its parameters, for optimizers and copies)
    ema            the evaluation EMA of the student (what samples and checkpoints use), or None
    info           data info: shape, num_classes, is_image, ...
    progress       fraction of the budget spent so far (the larger of steps and time), updated every step
    A network a method trains itself goes through `ctx.wrap` (data-parallel); a file every process needs is written
    once through `ctx.main_first`.
    """

    teacher: DiffusionModel
    student: DiffusionModel
    student_net: nn.Module
    ema: DiffusionModel | None
    info: dict
    device: torch.device
    run_dir: str
    seed: int = 0
    progress: float = 0.0
    total_steps: int = 1
    nets: dict = field(default_factory=dict)        # extra networks saved in every checkpoint: name -> module
    optimizers: dict = field(default_factory=dict)  # their optimizers: name -> torch.optim.Optimizer
    states: dict = field(default_factory=dict)      # objects with state_dict/load_state_dict kept for exact resume
    scalars: dict = field(default_factory=dict)     # logged with each metrics line (e.g. {"round": 3})
    env: object = None                              # the run's processes (`training.distributed.Env`); None: one

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` as a method trains it: wrapped for data-parallel gradient averaging in a multi-process run."""
        from ..training import distributed

        return distributed.wrap(module, self.env) if self.env is not None else module

    def main_first(self, fn):
        """fn() on the main process, then on the others (rank 0 writes a file, e.g. stored pairs, the rest read it)."""
        from ..training import distributed

        if self.env is None or not self.env.distributed:
            return fn()
        out = fn() if self.env.main else None
        distributed.barrier(self.env)
        return out if self.env.main else fn()


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off and in eval mode (a target network, a round's teacher)."""
    import copy

    out = copy.deepcopy(module)
    out.requires_grad_(False)
    return out.eval()


def surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 ||x - stopgrad(x - grad)||^2: its gradient with respect to x is exactly `grad` (card 19)."""
    d = x - (x - grad).detach()
    return 0.5 * d.reshape(d.shape[0], -1).pow(2).sum(1)


__all__ = ["Context", "frozen_copy", "rebind", "surrogate"]

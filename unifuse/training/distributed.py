"""Data-parallel training with PyTorch's own DDP, launched by `torchrun` (gloo on CPU, NCCL on GPU).

    torchrun --standalone --nproc_per_node=2 -m unifuse.cli train digits --out runs/ddp

`setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group and picks
the device; a plain `python` run is a world of one and touches no process group. Every rank draws its
own noise (seed + rank), takes its own slice of each global batch, and DDP averages the gradients, so
the weights stay identical on every rank (tests/test_distributed.py checks this).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import UnifuseError


@dataclass(frozen=True)
class Env:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> the local GPU when there is one, else the CPU; "cuda" -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnifuseError(f"train.device={name!r} but no CUDA GPU is available; use train.device=cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise UnifuseError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def setup(device: str = "auto") -> Env:
    """Join torchrun's process group when WORLD_SIZE > 1; return this process's Env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return Env(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Env(rank, world, local_rank, dev, backend)


def teardown(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def all_sum(env: Env, values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (in place on a copy); one collective."""
    if not env.distributed:
        return values
    work = values.to(env.device, copy=True)  # NCCL reduces GPU tensors only
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(values.device)


def gather_objects(env: Env, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: Env, obj):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(net: torch.nn.Module, env: Env) -> torch.nn.Module:
    """The network wrapped in DistributedDataParallel for a multi-process run (the net itself otherwise)."""
    if not env.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(net, device_ids=ids)


__all__ = ["Env", "setup", "teardown", "barrier", "all_sum", "gather_objects", "broadcast_object", "wrap",
           "pick_device"]

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
    owns_group: bool = False    # this setup() joined the process group, so its teardown() leaves it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0, key: str = "train.device") -> torch.device:
    """"auto" -> the local GPU when there is one, else the CPU; "cuda" -> this process's GPU. `key` names the
    setting in messages (train.device, or a flag such as --device)."""
    said = (lambda v: f"{key} {v}") if key.startswith("-") else (lambda v: f"{key}={v}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnifuseError(f"{said(name)} but no CUDA GPU is available on this machine; use {said('cpu')}")
        index = name.split(":", 1)[1] if ":" in name else str(local_rank)
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UnifuseError(f"{said(name)} but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                               f"cuda:{torch.cuda.device_count() - 1}); use {said('cuda:0')}")
        return torch.device(f"cuda:{index}")
    if name != "cpu":
        raise UnifuseError(f"unknown device {name!r} ({said(name)}); use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def resolve_precision(precision: str, device) -> str:
    """train.precision -> "bf16" or "fp32". "auto" takes bf16 autocast only where the hardware runs it natively
    (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX); elsewhere bf16 is emulated and much slower than fp32
    (18x on an AVX2-only CPU), so "auto" means fp32 there."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


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
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return Env(rank, world, local_rank, dev, backend, owns)


def teardown(env: Env) -> None:
    """Leave the process group, if `env`'s setup joined it. A caller that runs several stages in one launch (a latent
    run: the autoencoder, then the diffusion model) calls setup first and teardown last, so the stages share one
    group: a second init_process_group in a torchrun process reads the first group's stale rendezvous keys and hangs."""
    if env.distributed and env.owns_group and dist.is_initialized():
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
           "pick_device", "resolve_precision"]

"""diffusers interop: diffusers models in, unifuse models out (issue 17; docs/interop.md).

    model = uf.interop.from_diffusers("pipelines/ddpm")            # a DiffusionModel: any sampler, guidance, likelihood
    grid = uf.interop.diffusers_grid("pipelines/ddpm", 50)          # the native times diffusers' own loop visits
    x = uf.samplers.sample_ddim(model, noise, grid)                 # = DDIMScheduler's 50 steps from the same noise
    x = uf.sample(model, noise, "dpmpp_2m", nfe=10)                 # or any sampler (it starts at noise * sigma(t_0))
    uf.interop.to_diffusers(model, "exported")                      # scheduler_config.json (+ unet/ where it maps)

A scheduler's beta table becomes the library's `DDPM` path (native time = the diffusers timestep), a flow-match
scheduler rectified flow (timestep = N t); prediction_type becomes the prediction kind, clip_sample / thresholding
the `threshold` transform, variance_type learned_range a learned-variance model, vae/ a `LatentCodec`. diffusers is
an optional extra (pip install unifuse[diffusers]); nothing here imports it until it is used.
"""
from __future__ import annotations

import os

from .folder import codec, from_diffusers, is_diffusers_folder, load_run, run_meta, scheduler_spec, to_diffusers
from .network import DiffusersAutoencoder, DiffusersNet, net_from_config
from .scheduler import SchedulerSpec, read_scheduler, scheduler_config
from .scheduler import diffusers_grid as _grid


def diffusers_grid(source, steps: int):
    """The float64 native grid diffusers' own loop visits with `steps` inference steps (ending on the data end);
    `source` is a diffusers folder or a `SchedulerSpec`."""
    spec = scheduler_spec(source) if isinstance(source, (str, os.PathLike)) else source
    return _grid(spec, steps)


__all__ = ["from_diffusers", "to_diffusers", "diffusers_grid", "is_diffusers_folder", "scheduler_spec", "codec",
           "read_scheduler", "scheduler_config", "SchedulerSpec", "DiffusersNet", "DiffusersAutoencoder",
           "net_from_config", "load_run", "run_meta"]

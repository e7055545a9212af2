"""diffusers folders in and out: `from_diffusers(folder)` and `to_diffusers(model, folder)`, and a diffusers folder
read as a run (a config and a sidecar) so that every command that takes a run takes one.

A pipeline folder holds model_index.json, unet/, scheduler/ and optionally vae/; a bare pair holds unet/ and
scheduler/. Everything is read from disk (local_files_only): never the hub.
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import UnifuseError
from ..io import atomic_folder, write_json
from ..model import DiffusionModel
from .network import DiffusersNet, load_codec, load_unet, read_json, require_diffusers
from .scheduler import SchedulerSpec, read_scheduler, scheduler_config

SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
DATA_FILE = "unifuse.json"  # optional: {"data": {"name": "digits", ...}}, the unifuse data set a folder's model is of


def is_diffusers_folder(folder) -> bool:
    """A pipeline folder (model_index.json) or a unet/ + scheduler/ pair."""
    folder = os.fspath(folder)
    return os.path.isfile(os.path.join(folder, "model_index.json")) or os.path.isfile(
        os.path.join(folder, SCHEDULER_FILE))


def scheduler_spec(folder) -> SchedulerSpec:
    """The `SchedulerSpec` of a diffusers folder (path, prediction, time scale, grid and clipping settings)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise UnifuseError(f"no diffusers folder at {folder!r}; pass a folder written by a pipeline's save_pretrained")
    if not is_diffusers_folder(folder):
        raise UnifuseError(f"{folder!r} is not a diffusers folder: it needs model_index.json or {SCHEDULER_FILE}")
    return read_scheduler(read_json(os.path.join(folder, SCHEDULER_FILE), "scheduler config"))


def _parts(folder: str) -> tuple:
    """(unet folder, scheduler spec, vae folder or None), each checked."""
    spec = scheduler_spec(folder)
    folder = os.fspath(folder)
    unet = os.path.join(folder, "unet")
    if not os.path.isfile(os.path.join(unet, "config.json")):
        raise UnifuseError(f"{folder!r} has no unet/config.json; unifuse reads pipelines whose denoiser is a U-Net")
    vae = os.path.join(folder, "vae")
    return unet, spec, vae if os.path.isfile(os.path.join(vae, "config.json")) else None


def _check_channels(unet, spec: SchedulerSpec, where: str) -> None:
    c_in, c_out = int(unet.config.in_channels), int(unet.config.out_channels)
    if spec.variance == "learned" and c_out != 2 * c_in:
        raise UnifuseError(f"{where}: variance_type learned_range needs out_channels = 2 x in_channels = {2 * c_in}, "
                           f"the unet has {c_out}")
    if spec.variance != "learned" and c_out != c_in:
        raise UnifuseError(f"{where}: the unet returns {c_out} channels for {c_in} input channels; a learned-variance "
                           "unet needs variance_type=learned_range in the scheduler config")


def from_diffusers(folder, *, device="cpu", dtype=None, threshold: bool = True) -> DiffusionModel:
    """The `DiffusionModel` of a diffusers folder: its U-Net on the scheduler's path with its prediction kind.

    dtype: the network's dtype (default: as saved). threshold: apply the scheduler's clip_sample / thresholding to
    the denoised estimate (`uf.guidance.threshold`; the model is then that transform), as diffusers' own loop does.
    `uf.samplers.sample_ddim(model, noise, uf.interop.diffusers_grid(folder, steps))` reproduces diffusers' DDIM loop
    from the same noise; `uf.sample` runs any sampler, spacing and NFE (starting from noise * sigma(t_0))."""
    require_diffusers()
    unet_dir, spec, _ = _parts(folder)
    unet = load_unet(unet_dir, dtype)
    _check_channels(unet, spec, os.fspath(folder))
    net = DiffusersNet(unet, spec.time_scale, spec.config).to(device).eval()
    model = DiffusionModel(net, spec.path, spec.prediction, sigma_data=1.0, scale_input=False,
                           learned_variance=spec.variance == "learned")
    if threshold and spec.clip is not None:
        from ..guidance import threshold as clip

        model = clip(model, spec.clip, spec.percentile)
    return model


def codec(folder):
    """The `LatentCodec` of the folder's vae/ (an AutoencoderKL), or None when it has none. Loaded once per version
    of the vae/ files, however often the commands read the folder (its sidecar, then its model)."""
    vae = _parts(folder)[2]
    if vae is None:
        return None
    stamp = tuple((f, os.stat(os.path.join(vae, f)).st_mtime_ns) for f in sorted(os.listdir(vae)))
    return _loaded_codec(os.path.abspath(vae), stamp)


def _remembered_codec(folder):
    """`codec(folder)`, kept by `unifuse.latent.remember` for `find_codec`."""
    from ..latent import remember

    c = codec(folder)
    if c is not None:
        remember(c)
    return c


@functools.lru_cache(maxsize=4)
def _loaded_codec(vae: str, stamp: tuple):
    return load_codec(vae)


# --- out ---------------------------------------------------------------------------------------------------------
def _exportable_net(model) -> DiffusersNet:
    from ..model import ReexpressedModel, WrappedModel

    if isinstance(model, ReexpressedModel):
        raise UnifuseError("a model re-expressed on another path (model.on) has no diffusers scheduler of its own; "
                           "export the model it came from")
    while isinstance(model, WrappedModel):
        model = model.inner
    net = getattr(model.net, "module", model.net)  # a DDP-wrapped network: its module
    if not isinstance(net, DiffusersNet):
        family = getattr(net, "family", type(net).__name__)
        raise UnifuseError(f"a unifuse {family!r} network does not map onto a diffusers U-Net (different blocks, "
                           "embeddings, patching and attention layout), so no unet/ can be written; pass unet=False to "
                           "write the scheduler only, or export a model that came from diffusers (from_diffusers, or "
                           "one distilled or fine-tuned from it)")
    return net


def _same_model(spec: SchedulerSpec, model) -> bool:
    """Does the scheduler `spec` describe `model` (its path at every knot, its kind, its variance)?"""
    if (spec.prediction, spec.variance == "learned") != (model.prediction, model.learned_variance):
        return False
    if type(spec.path) is not type(model.path) or getattr(spec.path, "N", None) != getattr(model.path, "N", None):
        return False
    t = torch.linspace(model.path.t_min, model.path.t_max, 1001, dtype=torch.float64)
    return bool(torch.allclose(spec.path.alpha(t), model.path.alpha(t), rtol=1e-12, atol=1e-15))


def to_diffusers(model, folder, *, unet: bool = True, data: dict | None = None, overwrite: bool = False) -> str:
    """Write `model` as a diffusers folder: scheduler/scheduler_config.json reproducing its path and prediction kind
    and (unet=True) unet/ with config.json and safetensors weights, plus model_index.json; atomically (the folder
    appears whole or not at all). Refused, in one message naming what cannot be expressed, where diffusers has no
    scheduler for the path and kind, or the network is not a diffusers U-Net. data: keys of a run's data section
    (e.g. {"name": "digits"}) written to unifuse.json, so that `unifuse eval` knows what to compare the samples with
    (diffusers ignores the file). Returns the folder."""
    require_diffusers()
    folder = os.fspath(folder)
    if os.path.exists(folder) and os.listdir(folder) and not overwrite:
        raise UnifuseError(f"{folder!r} exists and is not empty; choose a new folder or pass overwrite=True")
    inner = model
    from ..model import WrappedModel

    while isinstance(inner, WrappedModel):
        inner = inner.inner
    config = scheduler_config(inner.path, inner.prediction, learned_variance=inner.learned_variance,
                              sigma_data=inner.sigma_data)
    net = _exportable_net(model) if unet else None
    if net is not None and net.scheduler and _same_model(read_scheduler(net.scheduler), inner):
        config = dict(net.scheduler)  # the scheduler it came with: its float32 table round-trips exactly
    if net is not None and config["_class_name"] == "FlowMatchEulerDiscreteScheduler":
        config["num_train_timesteps"] = round(net.time_scale)
    if net is not None and config["_class_name"] == "EDMEulerScheduler":
        raise UnifuseError("an EDM-preconditioned diffusers U-Net cannot be written: unifuse's DiffusersNet is bound to "
                           "DDPM tables and flow matching; pass unet=False to write the scheduler only")
    if net is not None and net.time_scale != 1.0 and config["_class_name"] != "FlowMatchEulerDiscreteScheduler":
        raise UnifuseError(f"the network takes timesteps scaled by {net.time_scale:g}, which a DDPM table's integer "
                           "timesteps cannot express; export it on its original path")

    def write(tmp):
        write_json(os.path.join(tmp, SCHEDULER_FILE), config)
        index = {"_class_name": "DiffusionPipeline", "_diffusers_version": require_diffusers().__version__,
                 "scheduler": ["diffusers", config["_class_name"]]}
        if net is not None:
            net.unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
            index["unet"] = ["diffusers", type(net.unet).__name__]
            if type(net.unet).__name__ == "UNet2DModel":  # loadable as diffusers' unconditional pipeline
                index["_class_name"] = "DDPMPipeline"
        write_json(os.path.join(tmp, "model_index.json"), index)
        if data:
            write_json(os.path.join(tmp, DATA_FILE), {"data": dict(data)})

    return atomic_folder(folder, write)


# --- a diffusers folder as a run, for the commands ----------------------------------------------------------------
def run_config(folder, spec: SchedulerSpec | None = None):
    """(Config, data info) describing a diffusers folder as a unifuse run: family ddpm/iddpm or rf, the "ddpm" path
    with the scheduler's betas (or "rf"), native time, the scheduler's clipping and a DDIM / Euler sampler."""
    from ..config import Config, DataConfig, ModelConfig, ObjectiveConfig, SampleConfig, validate

    spec = spec or scheduler_spec(folder)
    ucfg = read_json(os.path.join(os.fspath(folder), "unet", "config.json"), "unet config")
    if ucfg.get("_class_name") == "UNet2DConditionModel":
        raise UnifuseError(f"{folder}: a cross-attention UNet2DConditionModel needs encoder_hidden_states the commands "
                           "cannot make; sample it from Python: uf.interop.from_diffusers(folder) and cond=")
    size = ucfg.get("sample_size") or 32
    size = size[0] if isinstance(size, (list, tuple)) else size
    classes = int(ucfg.get("num_class_embeds") or 0)
    info = {"name": f"diffusers:{os.path.basename(os.path.abspath(folder))}",
            "shape": [int(ucfg.get("in_channels", 3)), int(size), int(size)], "num_classes": classes, "pad": 0,
            "class_names": [str(k) for k in range(classes)]}
    hint = os.path.join(os.fspath(folder), DATA_FILE)
    data = dict(name=info["name"], cond="class" if classes else "none")
    if os.path.isfile(hint):  # the unifuse data set this model is of (to_diffusers(..., data=))
        data.update(read_json(hint, "unifuse data hint").get("data") or {})
        info["name"] = data["name"]
        bad = sorted(set(data) - set(DataConfig.__dataclass_fields__))
        if bad:
            raise UnifuseError(f"{hint}: unknown data key(s) {', '.join(bad)}; use keys of a run's data section "
                               f"({', '.join(DataConfig.__dataclass_fields__)})")
    learned = spec.variance == "learned"
    if spec.flow:
        model = ModelConfig(family="rf", net="diffusers", path="rf", prediction="velocity", sigma_data=1.0,
                            time_input="native")
        objective, sample = ObjectiveConfig(name="flow"), SampleConfig(sampler="euler", nfe=28, spacing="shift")
    else:
        model = ModelConfig(family="iddpm" if learned else "ddpm", net="diffusers", path="ddpm",
                            path_options={"betas": spec.path.betas.tolist(), "name": "diffusers"},
                            prediction=spec.prediction, sigma_data=1.0, learned_variance=learned, time_input="native")
        objective = ObjectiveConfig(name="hybrid" if learned else "ddpm")
        sample = SampleConfig(sampler="ddim", nfe=50, spacing=spec.spacing,
                              clip_denoised=spec.clip or 0.0, threshold_percentile=spec.percentile or 0.0)
    cfg = Config(name=info["name"], description=f"diffusers {spec.class_name} model {folder}",
                 data=DataConfig(**data), model=model, objective=objective, sample=sample)
    return validate(cfg), info


def run_meta(folder) -> dict:
    """The sidecar a unifuse checkpoint would carry for this diffusers folder (step 0, no files)."""
    from ..config import to_dict
    from ..training.checkpoint import FORMAT

    cfg, info = run_config(folder)
    c = _remembered_codec(folder)
    if c is not None:  # a latent model: its samples decode with the folder's AutoencoderKL
        vcfg = c.autoencoder.vae.config
        f = 2 ** (len(vcfg.block_out_channels) - 1)  # the AutoencoderKL's downsampling factor
        info = dict(info, latent=dict(c.meta(), shape=[int(vcfg.in_channels), info["shape"][1] * f, info["shape"][2] * f]))
    ucfg = read_json(os.path.join(os.fspath(folder), "unet", "config.json"), "unet config")
    net = {"name": "diffusers", "family": "diffusers", "config": {"class": ucfg.get("_class_name", "UNet2DModel")}}
    return {"format": FORMAT, "config": to_dict(cfg), "data": info, "step": 0, "images": 0, "files": {},
            "path": cfg.model.path, "prediction": cfg.model.prediction, "family": cfg.model.family, "net": net,
            "diffusers": os.path.abspath(os.fspath(folder))}


def load_run(folder, device="cpu"):
    """(DiffusionModel in eval mode, Config) of a diffusers folder, as `unifuse.training.load_model` gives a run's;
    the clipping lives in the config's sample section (the commands apply it), not in the model."""
    spec = scheduler_spec(folder)
    cfg, _ = run_config(folder, spec)
    _remembered_codec(folder)  # the codec generate() finds by the digest in the sidecar
    model = from_diffusers(folder, device=device, threshold=False)
    return model.eval(), cfg


__all__ = ["is_diffusers_folder", "from_diffusers", "to_diffusers", "scheduler_spec", "codec", "run_config",
           "run_meta", "load_run"]

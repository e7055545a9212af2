"""Checkpoints: safetensors files plus a JSON sidecar, written atomically; no pickle on the load path.

    RUN/ckpt/step-00001000/  model.safetensors      raw network weights
                             ema.safetensors        EMA network weights (what sampling uses)
                             optimizer.safetensors  optimizer moments (its hyperparameters sit in the sidecar)
                             training.safetensors   random states of every process, objective and post-hoc EMA state
                             checkpoint.json        resolved config, path, prediction, step, library version,
                                                    data shape, network config, data position, file hashes
    RUN/ckpt/latest.json     {"dir": "step-00001000", "step": 1000}

A latent diffusion run's checkpoint also carries its autoencoder: autoencoder.safetensors (the `LatentCodec`'s
weights, shift and scale), described by the sidecar's data.latent (architecture, shift, scale, padding, digest);
`load_model` loads it (refusing one whose digest differs) so that sampling decodes (`unifuse.latent`).

A checkpoint is written into a temporary folder that is renamed into place, and `latest.json` moves to it
only afterwards (temporary file, then rename), so an interruption at any moment leaves the previous good
checkpoint intact (`unifuse.io`). Loading checks the sidecar and every file's SHA-256 and stops with one message naming
the broken file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from ..errors import UnifuseError
from ..io import atomic_folder, read_json, remove_temporaries, write_json

FORMAT = "unifuse-checkpoint"


def _diffusers(path) -> bool:
    """A diffusers pipeline folder (or unet/ + scheduler/ pair) rather than a unifuse run (`unifuse.interop`)."""
    from ..interop import is_diffusers_folder

    return not os.path.isfile(os.path.join(path, "checkpoint.json")) and is_diffusers_folder(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(state: dict) -> dict:
    """Detached, contiguous CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    """(tensors, JSON-able rest) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return _tensors(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict, rest: dict) -> dict:
    """Inverse of `optimizer_tensors`: a state_dict for `optimizer.load_state_dict`."""
    state = {}
    for key, value in list(tensors.items()) + list(rest.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: str, step: int, *, meta: dict, keep: int = 2, **files: dict) -> str:
    """Write RUN/ckpt/step-N atomically with one safetensors file per keyword (model=, ema=, optimizer=,
    training=: state dicts), point latest.json at it, keep the newest `keep`; returns the folder."""
    from safetensors.torch import save_file

    root, name = os.path.join(run_dir, "ckpt"), f"step-{step:08d}"
    if (meta.get("data") or {}).get("latent") and "autoencoder" not in files:  # a latent run carries its codec
        from ..latent import find_codec

        files = dict(files, autoencoder=find_codec(meta["data"]).state_dict())

    def write(folder):
        hashes = {}
        for key, state in files.items():
            path = os.path.join(folder, f"{key}.safetensors")
            save_file(_tensors(state), path)
            hashes[key] = _sha256(path)
        write_json(os.path.join(folder, "checkpoint.json"), dict(meta, format=FORMAT, step=int(step), files=hashes),
                   sync=True)

    remove_temporaries(root)  # folders of a save that was killed half-way
    final = atomic_folder(os.path.join(root, name), write)
    write_json(os.path.join(root, "latest.json"), {"dir": name, "step": int(step)}, sync=True)
    # Prune the oldest checkpoints (never the one just written).
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))
    for old in steps[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def find_checkpoint(path: str) -> str:
    """The checkpoint folder for a run folder, its ckpt/ folder, or a step folder."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "checkpoint.json")) or _diffusers(path):
        return path
    root = os.path.join(path, "ckpt") if os.path.isdir(os.path.join(path, "ckpt")) else path
    latest = os.path.join(root, "latest.json")
    if not os.path.isdir(path):
        raise UnifuseError(f"no run or checkpoint at {path!r}; train one with: unifuse train digits --out {path}")
    if not os.path.isfile(latest):
        raise UnifuseError(f"no checkpoint found in {path!r} (missing {latest}); train with: unifuse train PRESET "
                           f"--out {path}")
    try:
        with open(latest) as fh:
            name = json.load(fh)["dir"]
    except (ValueError, KeyError, TypeError):
        raise UnifuseError(f"checkpoint pointer {latest} is corrupt; point --ckpt at a step folder in {root}") from None
    folder = os.path.join(root, name)
    if not os.path.isfile(os.path.join(folder, "checkpoint.json")):
        raise UnifuseError(f"checkpoint {folder} named by {latest} is missing; point --ckpt at another step folder in "
                           f"{root}")
    return folder


def read_meta(folder: str) -> dict:
    """The sidecar of a checkpoint folder, checked."""
    if _diffusers(folder):  # a diffusers folder read as a run (unifuse.interop)
        from ..interop import run_meta

        return run_meta(folder)
    path = os.path.join(folder, "checkpoint.json")
    meta = read_json(path, "checkpoint sidecar", "use another checkpoint folder")
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UnifuseError(f"{path} is not a unifuse checkpoint sidecar; use a folder written by unifuse train")
    for key in ("step", "images"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UnifuseError(f"checkpoint sidecar {path} has {key}={value!r}, not a whole number >= 0; restore "
                               "the file (the folder name step-N gives the step) or use another checkpoint folder")
    return meta


def load_error(err: Exception) -> str:
    """The informative line of a load_state_dict error (its first line only names the module)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    text = (useful or lines or [type(err).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def load_tensors(folder: str, key: str, meta: dict | None = None) -> dict:
    """One safetensors file of a checkpoint, verified against the sidecar's hash."""
    from safetensors.torch import load_file

    meta = read_meta(folder) if meta is None else meta
    path = os.path.join(folder, f"{key}.safetensors")
    if not os.path.isfile(path):
        raise UnifuseError(f"checkpoint file {path} is missing; the checkpoint is incomplete, use another one")
    expected = meta.get("files", {}).get(key)
    if expected is not None and _sha256(path) != expected:
        raise UnifuseError(f"checkpoint file {path} is corrupt (its SHA-256 does not match the sidecar); "
                           "use an earlier checkpoint folder")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for truncated headers
        raise UnifuseError(f"checkpoint file {path} cannot be read ({type(err).__name__}); use an earlier "
                           "checkpoint") from None


def student_weights(cfg, meta: dict, nfe: int | None) -> str | None:
    """For a distilled student sampled with `nfe` evaluations: refuse an NFE it does not support (one message naming
    the ones it does), and name the weights kept for that NFE (progressive distillation's rounds), if any."""
    if not cfg.distill.method or nfe is None:
        return None
    supported = tuple(int(k) for k in cfg.distill.nfe.split(",") if k.strip())
    if supported and nfe not in supported:
        raise UnifuseError(f"this student ({cfg.distill.method} distillation) samples with --nfe in "
                           f"{', '.join(map(str, supported))}, not {nfe}; choose one of those")
    return f"nfe_{nfe}" if f"nfe_{nfe}" in meta.get("files", {}) else None


def load_model(run_dir: str, ema=True, device="cpu", nfe: int | None = None):
    """(DiffusionModel, Config) from a run, its ckpt/ folder or a step folder, ready to sample (eval mode).

    ema: True for the EMA weights, False for the raw weights, or a float sigma_rel for EDM2's post-hoc
    EMA reconstructed from the run's snapshots (train with optim.posthoc_ema=true). nfe: for a distilled
    student, the NFE it will be sampled with (checked; the weights kept for that NFE are loaded)."""
    from ..config import from_dict
    from .build import build_model, build_net
    from .ema import posthoc_ema

    folder = find_checkpoint(run_dir)
    if _diffusers(folder):
        from ..interop import load_run

        return load_run(folder, device=device)
    meta = read_meta(folder)
    try:
        cfg = from_dict(meta["config"])
    except UnifuseError as err:
        raise UnifuseError(f"the config stored in {folder} does not load with this version of unifuse: {err}") from None
    if cfg.model.family == "ae":
        raise UnifuseError(f"{folder} is an autoencoder run, not a diffusion model; train a latent model on it with "
                           f"--set data.latent={run_dir}")
    net = rebuild_net(meta, cfg, build_net)
    weights = student_weights(cfg, meta, nfe if nfe is not None else cfg.sample.nfe)
    if weights is not None:
        state = load_tensors(folder, weights, meta)
    elif isinstance(ema, bool):
        state = load_tensors(folder, "ema" if ema else "model", meta)
    else:
        state = posthoc_ema(os.path.dirname(os.path.dirname(folder)), float(ema), meta["step"])
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise UnifuseError(f"the weights in {folder} do not fit the network in its sidecar ({load_error(err)}); "
                           "use the checkpoint with the unifuse version that wrote it") from None
    model = build_model(cfg, net.to(device))
    model.eval()
    if meta["data"].get("latent"):  # a latent model: its samples decode with the autoencoder it carries
        load_codec(folder, device=device)
    return model, cfg


def check_codec(path: str, info: dict) -> None:
    """Refuse continuing the run at `path` on data encoded by another autoencoder (or on pixels instead of latents,
    or the reverse): one message naming both."""
    from ..latent import check_digest

    folder = find_checkpoint(path)
    old, new = (read_meta(folder).get("data") or {}).get("latent"), info.get("latent")
    if old or new:
        check_digest((new or {}).get("digest", "pixel space"), (old or {}).get("digest", "pixel space"), folder)


def load_codec(path: str, device="cpu"):
    """(LatentCodec, fitted) from an autoencoder run (its EMA weights; shift 0 and scale 1, fitted=False: fit them
    with `unifuse.latent.fit_scale`) or from a latent run's checkpoint (the codec it carries, fitted=True; its
    digest checked and the codec remembered for decoding)."""
    from ..latent import LatentCodec, codec_from_meta, remember
    from ..nets import AUTOENCODERS

    folder = find_checkpoint(path)
    meta = read_meta(folder)
    latent = (meta.get("data") or {}).get("latent")
    if latent:
        codec = codec_from_meta(latent, load_tensors(folder, "autoencoder", meta), folder).to(device)
        remember(codec)
        return codec, True
    net_meta = meta.get("net") or {}
    if net_meta.get("family") != "ae" or not isinstance(net_meta.get("config"), dict):
        raise UnifuseError(f"{path} is neither an autoencoder run nor a latent diffusion run; data.latent names one "
                           f"(train it with: unifuse train mnist-ae --out {path})")
    ae = AUTOENCODERS["ae"](**net_meta["config"])
    try:
        ae.load_state_dict(load_tensors(folder, "ema", meta))
    except RuntimeError as err:
        raise UnifuseError(f"the weights in {folder} do not fit the autoencoder in its sidecar ({load_error(err)}); "
                           "use the checkpoint as unifuse wrote it") from None
    return LatentCodec(ae, pad=int(meta["data"].get("pad", 0))).to(device), False


def rebuild_net(meta: dict, cfg, build_net):
    """The network of a checkpoint, from the architecture config it stored (or the run config)."""
    from ..nets import NETS
    from .build import fit_to_data

    net_meta = meta.get("net") or {}
    if net_meta.get("family") == "diffusers":  # a student or fine-tuned copy of a diffusers U-Net
        from ..interop import net_from_config

        return net_from_config(net_meta.get("config"))
    if net_meta.get("family") in NETS and isinstance(net_meta.get("config"), dict):
        return fit_to_data(NETS[net_meta["family"]](**net_meta["config"]), meta["data"])
    return build_net(cfg, meta["data"])


__all__ = ["check_codec", "find_checkpoint", "load_codec",
           "load_error", "load_model", "load_tensors", "optimizer_state", "optimizer_tensors", "read_meta",
           "rebuild_net", "save_checkpoint"]

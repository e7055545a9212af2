"""Where the CLI writes: outputs checked before any work starts, and sample folders that say how they were made.

    check_out_folder(out, data=info)        refuses a file, an unwritable place, a place inside the image folder
    check_out_file(path)                    the same for a file (eval's JSON)
    write_sample_folder(out, x, labels, info, metadata, png=True, trajectory=traj)

A sample folder holds samples.npz (uint8 images at the data's resolution, or points), grid.png, samples.json
(checkpoint, step, sampler, NFE, spacing, seed, guidance, class or prompt, batch, device, dtype, library
version), and on request one PNG per sample (png/000000.png, ...) and trajectory.gif (the first batch's
sampling trajectory, `unifuse.viz`).
"""
from __future__ import annotations

import os

from ..errors import UnifuseError
from ..io import atomic_write, write_json


def data_folder(data) -> str | None:
    """The image folder a run trains on (from its data info dict, its Config or a data name), else None."""
    from ..data.images import folder_path

    name = data.get("name") if isinstance(data, dict) else getattr(getattr(data, "data", None), "name", data)
    folder = folder_path(name)
    return os.path.realpath(os.path.expanduser(folder)) if folder else None


def _inside(path: str, folder: str | None) -> bool:
    if not folder:
        return False
    path = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_folder(out: str, *, data=None, flag: str = "--out") -> str:
    """Refuse, before any work, an output folder that is a file, that cannot be created or written, or that lies
    inside the run's training image folder (the next run would train on what is written there). Creates nothing:
    the test writes and removes a hidden folder in the nearest existing folder on the way."""
    folder = data_folder(data) if data is not None else None
    if _inside(out, folder):
        raise UnifuseError(f"{flag} {out} is inside the training image folder {folder}; the next run would train on "
                           f"what is written there: choose a folder outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UnifuseError(f"{flag} {out} is a file, not a folder; give the path of a folder (new or existing) "
                           "instead")
    parent = os.path.abspath(os.path.expanduser(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UnifuseError(f"{flag} {out} cannot be created: {parent} is a file; choose another path")
    probe = os.path.join(parent, f".unifuse-write-test-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        raise UnifuseError(f"{flag} {out} cannot be written ({err.strerror or type(err).__name__} in {parent}); "
                           "choose a folder you can write to") from None
    return out


def check_out_file(path: str, *, data=None, flag: str = "--out") -> str:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    if os.path.isdir(path):
        raise UnifuseError(f"{flag} {path} is a folder; give a file name (e.g. {flag} {os.path.join(path, 'eval.json')})")
    check_out_folder(os.path.dirname(os.path.abspath(path)), data=data, flag=flag)
    return path


def write_sample_folder(out: str, x, labels, info: dict, metadata: dict, *, png: bool = False,
                        trajectory=None) -> list:
    """samples.npz, grid.png, samples.json and, when asked, png/NNNNNN.png and trajectory.gif; returns the paths."""
    import json

    import numpy as np

    from .plots import plot_points, save_grid

    arrays, written = {}, []
    if x.ndim == 4:
        from ..data import to_uint8

        arrays["images"] = to_uint8(x, info.get("pad", 0))
        written.append(save_grid(x[:256], os.path.join(out, "grid.png")))
    else:
        arrays["points"] = x.numpy()
        written.append(plot_points(x, os.path.join(out, "grid.png")))
    if labels is not None:
        arrays["labels"] = labels.numpy()
    written.insert(0, atomic_write(os.path.join(out, "samples.npz"), lambda tmp: np.savez_compressed(tmp, **arrays)))
    if png:
        written.append(_write_pngs(os.path.join(out, "png"), arrays.get("images"), x.ndim))
    if trajectory is not None:
        written.append(_write_gif(os.path.join(out, "trajectory.gif"), trajectory, x.ndim))
    metadata = dict(metadata, n=int(x.shape[0]), files=[os.path.relpath(p, out) for p in written])
    written.append(write_json(os.path.join(out, "samples.json"), json.loads(json.dumps(metadata, default=str))))
    return written


def _write_pngs(folder: str, images, ndim: int) -> str:
    from PIL import Image

    if ndim != 4:
        raise UnifuseError("--png writes one picture per image sample; this run makes points (see grid.png)")
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        pic = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        atomic_write(os.path.join(folder, f"{i:06d}.png"), lambda tmp, pic=pic: pic.save(tmp, format="PNG"))
    return folder


def _write_gif(path: str, trajectory, ndim: int) -> str:
    from ..viz import save_points_gif, save_trajectory_gif

    states = [s[:64].float().cpu() for s in trajectory.states]
    if ndim == 4:
        scale = max(float(s.abs().max()) for s in states[:1]) or 1.0  # the start is pure noise: show it in range
        frames = [states[0] / scale] + states[1:]
        return save_trajectory_gif(frames, path)
    return save_points_gif(states, path)


def sample_metadata(args, cfg, meta: dict, folder: str, *, device: str, dtype: str) -> dict:
    """What samples.json records: enough to make the same samples again."""
    from .. import __version__
    from ..samplers import SAMPLERS

    sampler = args.sampler or cfg.sample.sampler
    spacing = args.spacing or cfg.sample.spacing or (SAMPLERS[sampler].spacing if sampler in SAMPLERS else None)
    return {"checkpoint": os.path.abspath(folder), "step": meta["step"], "preset": cfg.name, "data": meta["data"]["name"],
            "sampler": sampler, "nfe": args.nfe or cfg.sample.nfe, "spacing": spacing, "seed": args.seed,
            "guidance": args.guidance, "guidance_interval": args.guidance_interval, "autoguide": args.autoguide,
            "classifier": args.classifier, "classifier_scale": args.classifier_scale, "class": args.class_label,
            "prompt": args.prompt, "clip_denoised": args.clip_denoised, "threshold_percentile":
                args.threshold_percentile, "weights": "raw" if args.raw else "ema", "batch": args.batch,
            "device": device, "dtype": dtype, "library_version": __version__}


__all__ = ["check_out_file", "check_out_folder", "data_folder", "sample_metadata", "write_sample_folder"]

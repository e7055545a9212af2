"""`unifuse eval`: sample a trained run and measure it against data it did not train on.

    report = evaluate_run("runs/digits", n=1000, device="cuda")

digits and MNIST: the Frechet distance in the bundled classifier's features to the training set and to the
held-out split beside its real-vs-real floor, precision/recall, class statistics. An image folder: metrics that
need no download (`unifuse.metrics.evaluate_folder`) against the folder's held-out split (data.heldout; the
training images when that split is empty), labelled as not comparable to published FID. 2-D sets: the toy
metrics. `--nll` adds bits/dim of 64 held-out images.

A latent run: the samples are decoded and measured as images; the report adds "autoencoder", the held-out distance
(fd_heldout, fd_ratio) of training images passed through the autoencoder (encode, decode): the ceiling a latent
model can reach. Its `--nll` is a density of the held-out latents, labelled as such (not pixel bits/dim).
"""
from __future__ import annotations

import math
import sys
import time

import torch

from ..errors import UnifuseError

MIN_FD_SAMPLES = 100   # below this a Frechet distance is mostly the noise of its covariance estimate


def check_eval_numbers(n, nfe) -> None:
    """Refuse --n and --nfe below 1; warn on stderr when n is too small for a meaningful Frechet distance."""
    if n is not None and n < 1:
        raise UnifuseError(f"--n must be >= 1 samples, got {n}; use --n 1000 (the default is the run's eval.n)")
    if nfe is not None and nfe < 1:
        raise UnifuseError(f"--nfe must be >= 1 network evaluations, got {nfe}; e.g. --nfe 20")
    if n is not None and n < MIN_FD_SAMPLES:
        print(f"warning: --n {n} is too few samples for a meaningful Frechet distance (its estimate is dominated by "
              f"noise below {MIN_FD_SAMPLES}); use --n 1000 for numbers you compare", file=sys.stderr, flush=True)


def evaluate_run(ckpt: str, n=None, *, nll: bool = False, sampler=None, nfe=None, seed: int = 0, progress=True,
                 device="cpu", dtype=torch.float32) -> dict:
    """Sample a run and measure it against the held-out split: the dict `unifuse eval` prints."""
    from .checkpoint import find_checkpoint, load_model, read_meta
    from .sampling import generate

    check_eval_numbers(n, nfe)
    folder = find_checkpoint(ckpt)
    meta = read_meta(folder)
    model, cfg = load_model(folder, device=device, nfe=nfe)
    info = meta["data"]
    n = n or cfg.eval.n
    start = time.time()
    x, labels = generate(model, cfg.sample, info, n, conditioning=cfg.data.cond, seed=seed, sampler=sampler, nfe=nfe,
                         progress=progress, device=device, dtype=dtype)
    report = {"run": folder, "step": meta["step"], "preset": cfg.name, "data": info["name"], "n": n,
              "sampler": sampler or cfg.sample.sampler, "nfe": nfe or cfg.sample.nfe, "seed": seed,
              "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "sample_seconds": round(time.time() - start, 2)}
    report.update(sample_metrics(x, labels, info, pixel_config(cfg), seed))
    if info.get("latent"):
        report["autoencoder"] = reconstruction_metrics(cfg, info, n, seed)
    if nll:
        report["nll"] = (latent_nll if info.get("latent") else heldout_nll)(model, cfg, progress, device)
    return report


def pixel_config(cfg):
    """The run's config in pixel space (data.latent dropped): what its images are compared with."""
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, latent="", latent_options={}))


def reconstruction_metrics(cfg, info: dict, n: int, seed: int = 0) -> dict:
    """The autoencoder's ceiling: n training images (a seeded random subset) passed through encode and decode,
    measured against the held-out split as the samples are (fd_heldout beside its floor, fd_ratio; for a folder,
    `folder_metrics`), with the recognised share and the reconstruction's mean squared error and PSNR. Not the
    distance to the training set: those images are the reconstructions' own originals."""
    from .. import metrics
    from ..latent import find_codec
    from .build import build_data
    from .demo import heldout_fd
    from .outputs import data_folder

    codec, pixel = find_codec(info), pixel_config(cfg)
    data = build_data(pixel, "train")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    x, labels = data.images[idx], None if data.labels is None else data.labels[idx]
    with torch.no_grad():
        recon = codec.decode(codec.encode(x)).clamp(-1, 1).cpu()
    mse = float((recon - x).square().mean())
    report = {"n": int(x.shape[0]), "mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}  # peak-to-peak 2
    if data_folder(info) is not None:
        return dict(report, **folder_metrics(recon, labels, pixel, seed))
    report.update(heldout_fd(recon, info["name"], seed=seed))
    report["recognised"] = metrics.evaluate_images(recon, info["name"])["recognised"]
    return report


def latent_nll(model, cfg, progress: bool, device) -> dict:
    """-log p(z) of 64 held-out latents by the PF-ODE, in bits per latent dimension: a density of the latents
    z = (E(x) - shift) / scale (continuous, no dequantization), not a bound on the pixels' bits/dim."""
    from ..likelihood import log_likelihood
    from .build import build_data

    z = build_data(cfg, "heldout").images[:64].to(device)
    logp = log_likelihood(model, z, batch_size=32, progress=progress).double()
    bits = -logp / (z[0].numel() * math.log(2))
    return {"latent_bits_per_dim": float(bits.mean()), "latent_bits_per_dim_sem": float(bits.std() / len(bits) ** 0.5),
            "n": int(z.shape[0]), "space": "latent", "note": "density of the autoencoder's normalised latents, not "
            "pixel bits/dim; it excludes the decoder's likelihood"}


def sample_metrics(x, labels, info: dict, cfg, seed: int = 0) -> dict:
    """The metrics of samples x for the run's kind of data (bundled images, an image folder, 2-D points)."""
    from .. import metrics
    from .outputs import data_folder

    if x.ndim != 4:
        return metrics.evaluate_toy(x, info["name"])
    if data_folder(info) is not None:
        return folder_metrics(x, labels, cfg, seed)
    from .demo import heldout_fd

    report = metrics.evaluate_images(x, info["name"], labels=labels)
    report.update(heldout_fd(x, info["name"]))
    return report


def folder_metrics(x, labels, cfg, seed: int = 0) -> dict:
    """`unifuse.metrics.evaluate_folder` against the folder's held-out images (its training images when the
    held-out split is empty, data.heldout=0)."""
    from ..metrics import evaluate_folder
    from .build import build_data

    real, split = build_data(cfg, "heldout"), "heldout"
    if len(real) == 0:
        real, split = build_data(cfg, "train"), "train"
    report = dict(evaluate_folder(x, real.images, labels=labels, real_labels=real.labels, seed=seed))
    if "n" in report:  # the samples the metrics compared (the report's n stays the number drawn)
        report["n_compared"] = report.pop("n")
    return dict(report, reference_split=split, n_reference=len(real))


def heldout_nll(model, cfg, progress: bool, device) -> dict:
    """Bits/dim of 64 held-out images, scored as 8-bit images (PF-ODE; the VLB on DDPM paths)."""
    from ..likelihood import nll_report
    from .build import build_data

    held = build_data(cfg, "heldout").images[:64]
    if held.ndim != 4:
        raise UnifuseError("--nll measures bits/dim of images; for the 2-D sets use unifuse.likelihood.log_likelihood")
    # Score the held-out images as 8-bit images (digits' 17 grey levels rounded to the nearest of 256).
    held = torch.round((held + 1) * 127.5) / 127.5 - 1
    return nll_report(model, held.to(device), progress=progress)


__all__ = ["MIN_FD_SAMPLES", "check_eval_numbers", "evaluate_run", "folder_metrics", "latent_nll", "pixel_config",
           "reconstruction_metrics", "sample_metrics"]

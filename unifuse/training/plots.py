"""Pictures of a run: sample grids (scatter plots for 2-D data) and the loss curve, written atomically."""
from __future__ import annotations

import json
import math
import os

import torch

from ..errors import UnifuseError
from .build import build_model


def sample_grid(cfg, net, info: dict, path: str, device, n: int | None = None, seed: int = 0) -> str | None:
    """A PNG grid of samples from `net` with the config's sampler (skipped with a note if sampling fails)."""
    from .sampling import generate

    n = n or cfg.sample.grid
    try:
        model = build_model(cfg, net)
        images, _ = generate(model, cfg, info, n, seed=seed, device=device)
    except (ImportError, AttributeError, UnifuseError) as err:
        print(f"note: no sample grid ({err})")
        return None
    if images.ndim != 4:
        return plot_points(images, path)
    return save_grid(images, path, nrow=int(math.ceil(math.sqrt(n))))


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, min_side: int = 32) -> str:
    """`viz.save_image_grid` with small images enlarged (nearest neighbour) to at least `min_side` pixels, so an
    8x8 digit is visible; the saved arrays (samples.npz) keep the data's own resolution."""
    from ..viz import save_image_grid

    scale = max(1, min_side // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    return save_image_grid(images, path, nrow=nrow)


def plot_points(points: torch.Tensor, path: str) -> str:
    """Scatter plot of 2-D samples (the toy sets' "grid")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import _tmp_then_rename

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    pts = points.detach().cpu().float().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    fig.tight_layout()
    out = _tmp_then_rename(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


def plot_loss_curve(metrics_path: str, png: str) -> str | None:
    """Loss against step (log scale; raw and smoothed) from a metrics.jsonl file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import _tmp_then_rename

    steps, losses = [], []
    if not os.path.isfile(metrics_path):
        return None
    with open(metrics_path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and rec["loss"] is not None:
                steps.append(rec["step"]), losses.append(rec["loss"])
    if not steps:
        return None
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.9 * acc + 0.1 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="smoothed")
    ax.set_xlabel("step"), ax.set_ylabel("training loss")
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3), ax.legend()
    fig.tight_layout()
    out = _tmp_then_rename(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


__all__ = ["sample_grid", "save_grid", "plot_points", "plot_loss_curve"]

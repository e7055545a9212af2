"""Pictures of a run: sample grids (scatter plots for 2-D data) and the loss curve, written atomically."""
from __future__ import annotations

import math

import torch

from ..errors import UnifuseError
from ..io import atomic_write


def sample_grid(model, sample_cfg, info: dict, path: str, device, *, conditioning: str, n: int | None = None,
                seed: int = 0) -> str | None:
    """A PNG grid of samples from the built `model` with the sampler settings `sample_cfg` (a run's cfg.sample),
    sample_cfg.grid of them unless n is given; skipped with a note if sampling fails."""
    from .sampling import generate

    n = n or sample_cfg.grid
    try:
        images, _ = generate(model, sample_cfg, info, n, conditioning=conditioning, seed=seed, device=device)
    except (ImportError, AttributeError, UnifuseError) as err:
        print(f"note: no sample grid ({err})")
        return None
    if images.ndim != 4:
        return plot_points(images, path)
    return save_grid(images, path, nrow=math.ceil(math.sqrt(n)))


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

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    pts = points.detach().cpu().float().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


def plot_loss_curve(metrics_path: str, png: str) -> str | None:
    """Loss against step (log scale; raw and smoothed) from a metrics.jsonl file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .run import read_metrics

    logged = [rec for rec in read_metrics(metrics_path) if rec.get("loss") is not None]
    steps, losses = [rec["step"] for rec in logged], [rec["loss"] for rec in logged]
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
    out = atomic_write(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


__all__ = ["sample_grid", "save_grid", "plot_points", "plot_loss_curve"]

"""Pictures of samples and samplers: image grids, trajectory GIFs, denoised-estimate grids, error-vs-NFE plots.

Images are tensors [N, C, H, W] with values in [-1, 1] (C = 1 or 3). Every writer goes through
`unifuse.io.atomic_write`, so an interrupted run never leaves a half-written picture.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import UnifuseError
from .io import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (values clipped)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UnifuseError(f"images must be a tensor [N, C, H, W] with C in (1, 3, 4), got {shape}")
    x = images.detach().to("cpu", torch.float32).nan_to_num(0.0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N images into one uint8 array [H', W', C] with `nrow` images per row (default ~sqrt(N))."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = max(1, int(nrow) if nrow else math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


def _pil(grid: np.ndarray):
    from PIL import Image

    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_image_grid(images: torch.Tensor, path, nrow: int | None = None) -> str:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid; returns the path."""
    img = _pil(image_grid(images, nrow))
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


def _frames(trajectory, field: str = "states") -> list:
    trajectory = getattr(trajectory, field, trajectory)  # a uf.sample Trajectory, or the frames themselves
    if isinstance(trajectory, torch.Tensor):
        trajectory = list(trajectory.unbind(0))
    if not isinstance(trajectory, Sequence) or len(trajectory) == 0:
        raise UnifuseError("a trajectory must be a non-empty list of [N, C, H, W] tensors "
                           "(or a [T, N, C, H, W] tensor)")
    return list(trajectory)


def save_trajectory_gif(trajectory, path, nrow: int | None = None, duration_ms: int = 120,
                        hold_last_ms: int = 1000) -> str:
    """Write a sampling trajectory (a `uf.sample(..., return_trajectory=True)` Trajectory, or frames of
    [N, C, H, W] in [-1, 1]) as an animated GIF of image grids."""
    frames = [_pil(image_grid(f, nrow)).convert("RGB") for f in _frames(trajectory)]
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]

    def write(p):
        frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)

    return atomic_write(path, write)


def save_denoised_grid(estimates, path, max_samples: int = 8) -> str:
    """Write intermediate denoised estimates as a PNG: one row per sample, one column per step."""
    frames = _frames(estimates, "denoised")
    n = min(max_samples, frames[0].shape[0])
    cols = torch.stack([f[:n] for f in frames], 1)  # [n, T, C, H, W]
    return save_image_grid(cols.reshape((-1,) + tuple(cols.shape[2:])), path, nrow=len(frames))


def save_points_gif(trajectory, path, lim: float | None = None, duration_ms: int = 120) -> str:
    """Write a trajectory of 2-D point clouds (a Trajectory or frames [N, 2]) as an animated scatter GIF."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    frames = [f.detach().cpu().reshape(f.shape[0], -1)[:, :2].float().numpy() for f in _frames(trajectory)]
    lim = lim or float(max(np.abs(frames[-1]).max(), 1.0) * 1.2)
    images = []
    for k, pts in enumerate(frames):
        fig, ax = plt.subplots(figsize=(3, 3), dpi=80)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_title(f"step {k}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        fig.canvas.draw()
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
        plt.close(fig)

    def write(p):
        images[0].save(p, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)

    return atomic_write(path, write)


def plot_error_vs_nfe(curves: Mapping[str, tuple], path, title: str = "", ylabel: str = "error") -> str:
    """Log-log plot of error against NFE; curves maps a label to (nfes, errors) (or (nfes, errors, style))."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for label, curve in curves.items():
        nfes, errs = curve[0], curve[1]
        style = curve[2] if len(curve) > 2 else "-o"
        ax.loglog(nfes, errs, style, label=label, markersize=3, linewidth=1.2)
    ax.set_xlabel("NFE"), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


__all__ = ["to_uint8", "image_grid", "save_image_grid", "save_trajectory_gif", "save_denoised_grid",
           "save_points_gif", "plot_error_vs_nfe"]

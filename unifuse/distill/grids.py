"""A student's sample grids over training: one row block per number of steps (1, 2 and 4 where it supports them),
from the same noise, so the picture shows what each extra step buys."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import UnifuseError
from ..io import atomic_write

GRID_NFE = (1, 2, 4)


def student_models(ctx, method, cfg) -> list:
    """[(K, model)] for K in GRID_NFE that the student supports: per-K weights where the method keeps them
    (progressive distillation's finished rounds), the evaluation EMA otherwise."""
    from ..training.build import build_model
    from .loop import supported_nfe

    nfe = supported_nfe(cfg)
    snapshots = method.snapshots(ctx) if hasattr(method, "snapshots") else {}
    out = []
    for k in GRID_NFE:
        if nfe and k not in nfe:
            continue
        out.append((k, build_model(cfg, snapshots[k]) if k in snapshots else ctx.ema))
    return out


def student_grid(ctx, method, cfg, png: str, per_row: int = 16) -> str | None:
    """Write the grid PNG: `per_row` samples for each K (images), or one scatter panel per K (2-D data)."""
    from ..training.plots import save_grid
    from ..training.sampling import generate

    rows = []
    try:
        for k, model in student_models(ctx, method, cfg):
            x, _ = generate(model, replace(cfg.sample, nfe=k), ctx.info, per_row if ctx.info.get("is_image", True)
                            else 1000, conditioning=cfg.data.cond, seed=0, device=ctx.device)
            rows.append((k, x))
    except UnifuseError as err:
        print(f"note: no sample grid ({err})")
        return None
    if not rows:
        return None
    if rows[0][1].ndim == 4:
        return save_grid(torch.cat([x for _, x in rows]), png, nrow=per_row)
    return _scatter(rows, png)


def _scatter(rows, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3), dpi=100, squeeze=False)
    for ax, (k, x) in zip(axes[0], rows):
        pts = x.detach().cpu().float().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{k} step" + ("s" if k > 1 else ""))
        ax.set_aspect("equal")
    fig.tight_layout()
    out = atomic_write(png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


__all__ = ["GRID_NFE", "student_grid", "student_models"]

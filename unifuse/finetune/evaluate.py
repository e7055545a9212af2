"""What a fine-tuning run measures as it goes: reward, KL to the base and FD of fresh samples, grids, the plot.

Every evaluation draws the same `finetune.eval_n` samples (fixed per-sample seeds) from the current plain network
with the base's own sampler settings, so the numbers over time differ only by the weights:

    reward   the mean reward of those samples
    kl       the KL in nats between the policy's and the base's rollout processes (the sum over the stochastic steps
             of `step_kl`, averaged over rollouts from the policy): an upper bound on the KL of the final samples
    fd       for digits / MNIST the Frechet distance to the training images in the shipped classifier's features
             (with `class_fraction`); for 2-D sets the sliced Wasserstein distance
    cpu_s    this process's CPU seconds spent training so far (evaluations excluded)
"""
from __future__ import annotations

import json
import time

import torch

from ..training.build import build_model
from ..training.plots import sample_grid
from ..training.run import append_metrics, read_metrics
from .trajectory import rollout

EVAL_SEED = 424242


class Evaluator:
    def __init__(self, cfg, ctx, exported, run):
        self.cfg, self.ctx, self.exported, self.run = cfg, ctx, exported, run
        self.t0, self.eval_cpu, self.last = time.process_time(), 0.0, {}

    def model(self):
        return build_model(self.cfg, self.exported.refresh()).eval()

    def grid(self, png: str):
        start = time.process_time()
        out = sample_grid(self.model(), self.cfg.sample, self.ctx.info, png, self.ctx.device,
                          conditioning=self.cfg.data.cond)
        self.eval_cpu += time.process_time() - start
        return out

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        if not self.run.env.main or self.cfg.finetune.eval_n < 1:
            return {}
        start = time.process_time()
        record = {"step": step, "event": "eval", "cpu_s": round(start - self.t0 - self.eval_cpu, 2),
                  **measure(self.model(), self.ctx, self.cfg, self.cfg.finetune.eval_n)}
        self.eval_cpu += time.process_time() - start
        append_metrics(self.run.path("metrics.jsonl"), record)
        self.run.log(json.dumps(record))
        self.last = {k: v for k, v in record.items() if k in ("reward", "kl", "fd")}
        return record


def measure(model, ctx, cfg, n: int, seed: int = EVAL_SEED) -> dict:
    """reward, kl and fd of n fresh samples of `model` (see the module docstring)."""
    from ..latent import find_codec
    from ..samplers import generators, randn
    from ..training.sampling import generate

    z, labels = generate(model, cfg.sample, ctx.info, n, conditioning=cfg.data.cond, seed=seed, device=ctx.device,
                         decode=False)  # latents for a latent run (what the reward takes), else the images
    cond = {"class_labels": labels.to(ctx.device)} if labels is not None and cfg.data.cond == "class" else {}
    out = {"reward": float(ctx.reward(z.to(ctx.device), cond).mean())}
    codec = find_codec(ctx.info)
    x = codec.decode(z.to(ctx.device)).cpu() if codec is not None else z
    m = min(n, 128)
    gens = generators(seed + 1, 0, m)
    noise = randn((m, *ctx.info["shape"]), generator=gens).to(ctx.device)
    r = rollout(model, noise, ctx.grid(), cond=ctx.condition(m, torch.Generator().manual_seed(seed)) or None,
                generator=gens, sampler=ctx.sampler, eta=ctx.eta, reference=ctx.reference)
    out["kl"] = float(r.kl.sum(0).mean()) if r.kl is not None else None
    out.update(sample_quality(x, ctx.info))
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


def sample_quality(x: torch.Tensor, info: dict) -> dict:
    """fd (and the class fractions) for the bundled image sets, swd for the 2-D sets, nothing otherwise."""
    from .. import metrics

    name = info.get("name")
    if x.ndim == 4 and name in metrics.CLASSIFIER_SETS and x.shape[0] > 3:
        r = metrics.evaluate_images(x, name)
        return {"fd": r["fd"], "class_fraction": [round(v, 4) for v in r["class_fraction"]]}
    if x.ndim == 2 and x.shape[1] == 2:
        try:
            return {"swd": metrics.evaluate_toy(x, name)["swd"]}
        except Exception:  # a user 2-D set without a reference
            return {}
    return {}


def plot_rewards(metrics_path: str, png: str) -> str | None:
    """reward.png: the evaluations' reward (and KL, FD) against training CPU seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    evals = [r for r in read_metrics(metrics_path) if r.get("event") == "eval"]
    if len(evals) < 2:
        return None
    keys = [k for k in ("reward", "kl", "fd", "swd") if any(r.get(k) is not None for r in evals)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(r["cpu_s"] / 60, r[k]) for r in evals if r.get(k) is not None]
        ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel("training CPU minutes")
        ax.set_title(k)
    fig.tight_layout()
    out = atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out


__all__ = ["Evaluator", "measure", "plot_rewards", "sample_quality"]

"""`make demo`: train the default digits model on the CPU, sample it with a fast sampler, evaluate it
against the held-out digits and the real-vs-real floor, and write everything under one folder."""
from __future__ import annotations

import functools
import os
import shutil
import time


def run_demo(out: str = "runs/demo", minutes: float = 7.0, preset: str = "digits", n_eval: int = 1000,
             fd_draws: int = 3, log=print) -> dict:
    """Train `preset` for at most `minutes`, sample n_eval images, evaluate, write grid/metrics/plots under `out`.
    The held-out Frechet distance is the mean over `fd_draws` sample seeds (one draw of 1,000 varies by ~25%)."""
    import numpy as np
    import torch

    from ..config import get_config
    from ..data import to_uint8
    from ..io import write_json
    from .checkpoint import find_checkpoint, load_model, read_meta
    from .loop import train
    from .plots import save_grid
    from .sampling import generate

    start = time.time()
    if os.path.isfile(os.path.join(out, "config.yaml")):
        log(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    cfg = get_config(preset, [f"train.minutes={minutes}", "train.device=cpu"])
    threads = cfg.train.threads or max(1, min(os.cpu_count() or 1, 4))
    torch.set_num_threads(threads)
    log(f"training {cfg.name} ({cfg.description}) on CPU with {threads} thread{'s' * (threads > 1)} for at most "
        f"{minutes:g} minutes or {cfg.train.steps} steps")
    summary = train(cfg, out)

    model, cfg = load_model(out)
    info = read_meta(find_checkpoint(out))["data"]
    log(f"sampling {n_eval} images with {cfg.sample.sampler} at {cfg.sample.nfe} network evaluations")
    t0 = time.time()
    x, _ = generate(model, cfg.sample, info, n_eval, conditioning=cfg.data.cond, seed=0)
    sample_s = time.time() - t0
    grid = save_grid(x[:100], os.path.join(out, "grid.png"), nrow=10)
    npz = os.path.join(out, "samples.npz")
    np.savez_compressed(npz, images=to_uint8(x, info.get("pad", 0)))

    from .. import metrics

    log("evaluating against the held-out digits")
    report = {"preset": cfg.name, "family": cfg.model.family, "steps": summary["step"],
              "train_seconds": summary["seconds"], "stopped_by": summary["stopped_by"], "sampler": cfg.sample.sampler,
              "nfe": cfg.sample.nfe, "n_samples": n_eval, "sample_seconds": round(sample_s, 1)}
    draws = [heldout_fd(x, info["name"])] + [
        heldout_fd(generate(model, cfg.sample, info, n_eval, conditioning=cfg.data.cond, seed=s)[0], info["name"])
        for s in range(1, fd_draws)]
    fds = [d["fd_heldout"] for d in draws]
    fd = sum(fds) / len(fds)
    report.update(draws[0], fd_heldout=fd, fd_seeds=fds, fd_ratio=fd / draws[0]["fd_floor"])
    report.update({k: v for k, v in metrics.evaluate_images(x, info["name"]).items() if _scalar(v)})
    report["total_seconds"] = round(time.time() - start, 1)
    metrics_path = os.path.join(out, "metrics.json")
    write_json(metrics_path, report)
    log("")
    log(f"demo finished in {report['total_seconds']:.0f} s: {summary['step']} training steps")
    log(f"  Frechet distance to the held-out digits {report['fd_heldout']:.3f} (mean of {len(fds)} sample draws: "
        f"{', '.join(f'{v:.3f}' for v in fds)}); real-vs-real floor for {n_eval} i.i.d. real images "
        f"{report['fd_floor']:.3f} (ratio {report['fd_ratio']:.2f})")
    log(f"  samples grid   {grid}")
    log(f"  metrics        {metrics_path}")
    log(f"  loss curve     {os.path.join(out, 'loss.png')}")
    log(f"  training log   {os.path.join(out, 'metrics.jsonl')}")
    log(f"  checkpoint     {summary['checkpoint']}")
    return report


def heldout_fd(samples, dataset: str, seed: int = 0, floor_repeats: int = 200) -> dict:
    """Frechet distance (classifier features) of the samples to the held-out split, beside the real-vs-real floor:
    the same distance for as many real images drawn as a perfect generator draws them, i.i.d. from the training
    split (with replacement), averaged over `floor_repeats` draws.

    The draws are i.i.d. on purpose. The held-out split is stratified, and a subset of 1,000 of the 1,528 digits
    training images drawn without replacement has almost exactly the training class counts; a generator's
    class counts are multinomial. The class-count noise dominates this distance, so a perfect generator has an
    expected distance about 1.5x the subset value on digits (1.2x on MNIST-5k): no sampler could reach a subset
    floor (`python bench/train_quality.py --floors`, docs/benchmarks/training.md). `fd_floor_subset` keeps that value
    for comparison."""
    from ..data import load_dataset
    from ..metrics import classify, frechet_distance, load_classifier
    from ..metrics.frechet import as_model_images, reference_features

    x = as_model_images(samples, load_dataset(dataset, "train"))
    features, f_held = classify(load_classifier(dataset), x)[0], reference_features(dataset, "heldout")
    floor, floor_sd, subset = heldout_floor(dataset, x.shape[0], seed, floor_repeats)
    fd = frechet_distance(features, f_held)
    return {"fd_heldout": fd, "fd_floor": floor, "fd_floor_sd": floor_sd, "fd_ratio": fd / floor, "n_fd": x.shape[0],
            "n_heldout": f_held.shape[0], "fd_floor_subset": subset}


@functools.lru_cache(maxsize=16)
def heldout_floor(dataset: str, n: int, seed: int = 0, repeats: int = 200) -> tuple[float, float, float]:
    """(mean, sd) of the held-out Frechet distance of n training images drawn i.i.d. (with replacement) over
    `repeats` draws (one draw varies by ~25%, so the mean of 200 is within ~2%), and the mean over 10 subsets drawn
    without replacement (the older, unreachable floor)."""
    import torch

    from ..metrics.frechet import frechet_distance, reference_features

    f_train, f_held = reference_features(dataset, "train"), reference_features(dataset, "heldout")
    g = torch.Generator().manual_seed(seed)
    iid = torch.tensor([frechet_distance(f_train[torch.randint(len(f_train), (n,), generator=g)], f_held)
                        for _ in range(repeats)], dtype=torch.float64)
    m = min(n, len(f_train))
    subset = [frechet_distance(f_train[torch.randperm(len(f_train), generator=g)[:m]], f_held) for _ in range(10)]
    return float(iid.mean()), float(iid.std()) if repeats > 1 else 0.0, sum(subset) / len(subset)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


__all__ = ["run_demo"]

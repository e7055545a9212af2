"""`make demo`: train the default digits model on the CPU, sample it with a fast sampler, evaluate it
against the held-out digits and the real-vs-real floor, and write everything under one folder."""
from __future__ import annotations

import os
import shutil
import time


def run_demo(out: str = "runs/demo", minutes: float = 7.0, preset: str = "digits", n_eval: int = 1000,
             log=print) -> dict:
    """Train `preset` for at most `minutes`, sample n_eval images, evaluate, write grid/metrics/plots under `out`."""
    import numpy as np
    import torch

    from ..config import get_config
    from ..data import to_uint8
    from .checkpoint import find_checkpoint, load_model, read_meta, write_json
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
    x, labels = generate(model, cfg, info, n_eval, seed=0)
    sample_s = time.time() - t0
    grid = save_grid(x[:100], os.path.join(out, "grid.png"), nrow=10)
    npz = os.path.join(out, "samples.npz")
    np.savez_compressed(npz, images=to_uint8(x, info.get("pad", 0)))

    from .. import metrics

    log("evaluating against the held-out digits")
    report = {"preset": cfg.name, "family": cfg.model.family, "steps": summary["step"],
              "train_seconds": summary["seconds"], "stopped_by": summary["stopped_by"], "sampler": cfg.sample.sampler,
              "nfe": cfg.sample.nfe, "n_samples": n_eval, "sample_seconds": round(sample_s, 1)}
    report.update(heldout_fd(x, info["name"]))
    report.update({k: v for k, v in metrics.evaluate_images(x, info["name"]).items() if _scalar(v)})
    report["total_seconds"] = round(time.time() - start, 1)
    metrics_path = os.path.join(out, "metrics.json")
    write_json(metrics_path, report)
    log("")
    log(f"demo finished in {report['total_seconds']:.0f} s: {summary['step']} training steps")
    log(f"  Frechet distance to the held-out digits {report['fd_heldout']:.3f}; real-vs-real floor with the same "
        f"number of images {report['fd_floor']:.3f} (ratio {report['fd_ratio']:.2f})")
    log(f"  samples grid   {grid}")
    log(f"  metrics        {metrics_path}")
    log(f"  loss curve     {os.path.join(out, 'loss.png')}")
    log(f"  training log   {os.path.join(out, 'metrics.jsonl')}")
    log(f"  checkpoint     {summary['checkpoint']}")
    return report


def heldout_fd(samples, dataset: str, seed: int = 0, floor_repeats: int = 10) -> dict:
    """Frechet distance (classifier features) of the samples to the held-out split, beside the real-vs-real
    floor: the same distance for as many training images as samples, averaged over `floor_repeats` random
    subsets (with a few hundred held-out images a single subset varies by about 20%)."""
    import torch

    from ..data import load_dataset
    from ..metrics import classify, frechet_distance, load_classifier
    from ..metrics.frechet import as_model_images

    held, train = load_dataset(dataset, "heldout"), load_dataset(dataset, "train")
    x = as_model_images(samples, train)
    n = min(x.shape[0], len(train))
    net = load_classifier(dataset)
    f_held = classify(net, held.images)[0]
    f_x = classify(net, x[:n])[0]
    f_train = classify(net, train.images)[0]
    g = torch.Generator().manual_seed(seed)
    floors = torch.tensor([frechet_distance(f_train[torch.randperm(len(train), generator=g)[:n]], f_held)
                           for _ in range(floor_repeats)], dtype=torch.float64)
    fd, floor = frechet_distance(f_x, f_held), float(floors.mean())
    return {"fd_heldout": fd, "fd_floor": floor, "fd_floor_sd": float(floors.std()) if floor_repeats > 1 else 0.0,
            "fd_ratio": fd / floor, "n_fd": n, "n_heldout": len(held)}


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


__all__ = ["run_demo"]

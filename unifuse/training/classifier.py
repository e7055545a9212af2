"""Training a noise-conditional classifier for classifier guidance (Dhariwal & Nichol 2021, ALGORITHMS card 10):
a short straight-line loop (AdamW, cosine decay) over `objectives.ClassifierLoss`, and the named presets
`unifuse train digits-classifier|mnist-classifier` run (held-out accuracy per noise level in the sidecar).
"""
from __future__ import annotations

import math
import time

import torch

from ..errors import choose
from ..nets.classifier import CLASSIFIER_PRESETS, NoisyClassifier, clean_time, save_noisy_classifier
from ..objectives.classifier import ClassifierLoss


def train_classifier(classifier: NoisyClassifier, images: torch.Tensor, labels: torch.Tensor, steps: int = 2000,
                     batch: int = 128, lr: float = 2e-3, loss: ClassifierLoss | None = None,
                     generator: torch.Generator | None = None, progress: bool = False,
                     minutes: float = 0.0) -> NoisyClassifier:
    """A short straight-line loop: AdamW, cosine learning-rate decay, batches drawn with replacement;
    stops after `steps` or after `minutes` of wall clock (0: no limit), whichever comes first."""
    loss = loss or ClassifierLoss()
    deadline = time.time() + 60 * minutes if minutes > 0 else math.inf
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / steps, 1.0))))
    classifier.train()
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="classifier", leave=False)
    for _ in bar:
        if time.time() > deadline:
            break
        idx = torch.randint(images.shape[0], (batch,), generator=generator)
        value = loss(classifier, images[idx], labels[idx], generator).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        if progress:
            bar.set_postfix(loss=f"{value.item():.3f}")
    return classifier.eval()


@torch.no_grad()
def accuracy(classifier: NoisyClassifier, images: torch.Tensor, labels: torch.Tensor, t=None,
             batch: int = 500) -> float:
    """Fraction of images assigned to their label (clean images by default: t = the path's data end)."""
    path = classifier.path
    if t is None:
        t = clean_time(path)
    hits = 0
    for i in range(0, images.shape[0], batch):
        logits = classifier(images[i:i + batch], t)
        hits += int((logits.argmax(1).cpu() == torch.as_tensor(labels[i:i + batch]).cpu()).sum())
    return hits / images.shape[0]


def train_classifier_preset(name: str, out: str, steps: int | None = None, minutes: float = 0.0, seed: int = 0,
                            progress: bool = True, log=print) -> dict:
    """Train a preset's noise-conditional classifier and save it to `out` (classifier.safetensors + .json)."""
    from ..data import load_dataset
    from ..paths import get as get_path

    choose("classifier preset", name, CLASSIFIER_PRESETS)
    data_name, path_name, default_steps, batch, width = CLASSIFIER_PRESETS[name]
    steps = int(steps or default_steps)
    train_set, heldout = load_dataset(data_name, "train"), load_dataset(data_name, "heldout")
    torch.manual_seed(seed)
    clf = NoisyClassifier(get_path(path_name), in_channels=train_set.shape[0], num_classes=train_set.num_classes,
                          width=width)
    start = time.time()
    train_classifier(clf, train_set.images, train_set.labels, steps, batch,
                     generator=torch.Generator().manual_seed(seed), progress=progress, minutes=minutes)
    seconds = time.time() - start
    # held-out accuracy at a few noise levels, by EDM sigma = sigma/alpha (what a user reads as "how noisy")
    acc = {f"sigma={s:g}": accuracy(clf, heldout.images, heldout.labels,
                                    float(clf.path.t_from_sigma_edm(torch.tensor(s))))
           for s in (0.0, 0.5, 1.0, 2.0, 5.0)}
    record = {"preset": name, "data": data_name, "shape": list(train_set.shape),
              "class_names": list(train_set.class_names), "path": path_name, "config": clf.config, "steps": steps,
              "seconds": round(seconds, 1), "seed": seed, "heldout_accuracy": acc}
    weights = save_noisy_classifier(clf, out, record)
    log(f"trained {name} in {seconds:.0f} s; held-out accuracy " + ", ".join(f"{k}: {v:.3f}" for k, v in acc.items())
        + f"; saved {weights}")
    return record


__all__ = ["train_classifier", "accuracy", "train_classifier_preset"]

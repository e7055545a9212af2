"""Train the Frechet-feature classifier of a bundled data set and ship it in unifuse/assets/.

    python -m unifuse.metrics.train_classifier digits|mnist [--epochs N] [--seed S]

Trains on the train split with random shifts (and small rotations/scalings for MNIST), reports accuracy on the
held-out split, and writes classifier-<name>.safetensors plus a JSON sidecar.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F

from ..data import load_dataset
from ..io import atomic_write, write_text
from .classifier import CLASSIFIER_SETS, FeatureNet, asset_paths, augment, classify

RECIPES = {  # name -> (epochs, batch, learning rate, max shift in pixels, max rotation in radians, width)
    "digits": (60, 64, 3e-3, 1, 0.0, 24),
    "mnist":  (10, 64, 3e-3, 2, 0.2, 24),
}


def train_classifier(name: str, epochs: int | None = None, seed: int = 0, log=print) -> tuple[FeatureNet, dict]:
    """Train with AdamW and a one-cycle cosine schedule; return the net (eval mode) and its sidecar record."""
    n_epochs, batch, lr, shift, rotate, width = RECIPES[name]
    n_epochs = epochs or n_epochs
    train, held = load_dataset(name, "train"), load_dataset(name, "heldout")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = FeatureNet(train.shape[0], train.shape[1], width, num_classes=train.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    steps = n_epochs * ((len(train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(n_epochs):
        net.train()
        perm = torch.randperm(len(train), generator=g)
        for idx in perm.split(batch):
            x = augment(train.images[idx], shift, g, rotate)
            loss = F.cross_entropy(net(x), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == n_epochs - 1:
            acc = accuracy(net.eval(), held.images, held.labels)
            log(f"epoch {epoch + 1}/{n_epochs}  loss {loss.item():.4f}  held-out accuracy {acc:.4f}  "
                f"({time.time() - t0:.0f}s)")
    net.eval()
    record = dict(dataset=name, heldout_accuracy=accuracy(net, held.images, held.labels),
                  train_accuracy=accuracy(net, train.images, train.labels), heldout_size=len(held),
                  feature_dim=net.config["feature_dim"], config=net.config, epochs=n_epochs, seed=seed,
                  date=datetime.date.today().isoformat(), torch=torch.__version__,
                  command=f"python -m unifuse.metrics.train_classifier {name}")
    return net, record


def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classify(net, images)[1].argmax(1) == labels).double().mean())


def save_classifier(net: FeatureNet, record: dict, name: str) -> None:
    """Write the weights (safetensors) and the JSON sidecar atomically."""
    from safetensors.torch import save_file

    weights, sidecar = asset_paths(name)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}

    def write_weights(tmp):
        save_file(state, tmp)
        os.chmod(tmp, 0o644)  # a package asset: readable by everyone

    atomic_write(weights, write_weights)
    write_text(sidecar, json.dumps(record, indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=CLASSIFIER_SETS)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, record = train_classifier(args.name, args.epochs, args.seed)
    save_classifier(net, record, args.name)
    print(json.dumps({k: record[k] for k in ("dataset", "heldout_accuracy", "train_accuracy", "feature_dim")}))


if __name__ == "__main__":
    main()

"""Sample-quality metrics for a run on the user's own image folder, with nothing downloaded.

FID (Heusel et al. 2017) needs Inception-v3 weights; here the features come from a small conv net
(`FeatureNet`) made on the spot from the folder's own images: trained for a few hundred steps on the folder's
classes when it has two or more, else left at a seeded random initialisation with its batch-norm statistics set
from the images (a fixed, training-free feature map). In those features: the Frechet distance, KID (Binkowski et
al. 2018; unbiased, so ~0 for a perfect generator at any n) and improved precision/recall (Kynkaanniemi et al.
2019); in pixel space: the sliced Wasserstein distance (Rabin et al. 2011).

Every distance comes with a floor: the real images are split at random into a reference part (which the feature
net is trained on) and a held part of m = min(samples, real // 2) images, and m samples are compared (a seeded
subset when there are more); `*_floor` is the held part against the reference, i.e. what a perfect generator
scores at this sample size with these features. Images larger than 64x64 are area-downsampled to 64x64 first.
Numbers are comparable between runs on the same folder at the same n and seed, never with published FID.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnifuseError
from .classifier import FeatureNet, augment, classify
from .frechet import frechet_distance, precision_recall
from .kernel import kid
from .toy import sliced_wasserstein

FEATURE_STEPS = 300   # AdamW steps of the folder classifier: ~10-30 s on one CPU core at 32x32
FEATURE_WIDTH = 16
MAX_SIZE = 64         # images are area-downsampled to at most 64x64 first: SWD holds N x C*H*W float64 values, and
                      # the feature net trains in seconds (FID likewise resizes to Inception's 299x299)
K = 3                 # neighbours of the precision/recall manifolds
NOTE = ("features of a small network made from this folder's images (see 'features'), not Inception-v3: not "
        "comparable to published FID/KID, nor across folders, resolutions or seeds; read each distance against "
        "its *_floor (two disjoint random parts of the real images at the same sizes)")


def _images(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 4 or not x.is_floating_point():
        raise UnifuseError(f"{name} must be float images [N, C, H, W] in [-1, 1], got "
                           f"{x.dtype} {tuple(x.shape)}")
    with torch.inference_mode(False):  # a fresh tensor, usable for training even if made under inference_mode
        return x.detach().to("cpu", torch.float32).clamp(-1, 1).clone()


def _labels(y, n: int, name: str) -> torch.Tensor | None:
    if y is None:
        return None
    with torch.inference_mode(False):
        y = torch.as_tensor(y).detach().to("cpu").reshape(-1).long().clone()
    if y.shape[0] != n or (n and int(y.min()) < 0):
        raise UnifuseError(f"{name} must hold one class index >= 0 per image ({n}), got {tuple(y.shape)}")
    return y


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = FEATURE_STEPS,
                      batch: int = 64, lr: float = 3e-3) -> FeatureNet:
    """A FeatureNet classifier trained with AdamW and a one-cycle schedule on random shifts of labelled images."""
    C, H, W = images.shape[1:]
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)  # the initialisation and dropout, without touching the caller's random state
        net = FeatureNet(C, max(H, W), FEATURE_WIDTH, num_classes=int(labels.max()) + 1).train()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        shift = 1 if max(H, W) <= 16 else 2
        for _ in range(steps):
            idx = torch.randint(len(images), (min(batch, len(images)),), generator=g)
            loss = F.cross_entropy(net(augment(images[idx], shift, g)), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def random_feature_net(images: torch.Tensor, seed: int = 0) -> FeatureNet:
    """A FeatureNet at a seeded random initialisation whose batch-norm statistics are those of `images`."""
    C, H, W = images.shape[1:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(C, max(H, W), FEATURE_WIDTH, num_classes=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the chunks below, not an exponential one
    net.body.train()
    for chunk in images.split(512):
        net.body(chunk)
    return net.eval()


def split_real(n_real: int, n_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, held) indices of a seeded random split of the real images; held has min(n_samples, n_real // 2)."""
    m = min(n_samples, n_real // 2)
    perm = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed))
    return perm[m:].sort().values, perm[:m].sort().values


def _downsampled(x: torch.Tensor) -> torch.Tensor:
    H, W = x.shape[2:]
    if max(H, W) <= MAX_SIZE:
        return x
    return F.adaptive_avg_pool2d(x, (min(H, MAX_SIZE), min(W, MAX_SIZE)))


def distances(fake: torch.Tensor, ref: torch.Tensor, fake_px: torch.Tensor, ref_px: torch.Tensor, seed: int) -> dict:
    """fd, kid (and its std over subsets of half the smaller set), precision, recall in features; swd in pixels."""
    kid_mean, kid_std = kid(fake, ref, subset_size=max(2, min(fake.shape[0], ref.shape[0]) // 2), seed=seed)
    precision, recall = precision_recall(ref, fake, K)
    return dict(fd=frechet_distance(ref, fake), kid=kid_mean, kid_std=kid_std, precision=precision, recall=recall,
                swd=sliced_wasserstein(fake_px.flatten(1), ref_px.flatten(1), seed=seed))


def evaluate_folder(samples, real, labels=None, real_labels=None, seed: int = 0, *, steps: int = FEATURE_STEPS) -> dict:
    """Distances of samples [N, C, H, W] in [-1, 1] from the real images of a folder (same layout), each with its
    real-vs-real floor at the same sizes; with real_labels of >= 2 classes the features are those of a classifier
    trained on the reference part (`steps` steps), and `labels` (the samples' requested classes) are scored by it."""
    x, r = _images(samples, "samples"), _images(real, "real images")
    if x.shape[1:] != r.shape[1:]:
        raise UnifuseError(f"samples {tuple(x.shape[1:])} and real images {tuple(r.shape[1:])} must have one shape; "
                           "pass the real images at the run's resolution and channels")
    y, ry = _labels(labels, x.shape[0], "labels"), _labels(real_labels, r.shape[0], "real_labels")
    x, r = _downsampled(x), _downsampled(r)
    if r.shape[0] < 2 * (K + 1) or x.shape[0] <= K:
        raise UnifuseError(f"folder metrics need at least {2 * (K + 1)} real images and {K + 1} samples, got "
                           f"{r.shape[0]} and {x.shape[0]}; use more images (or --n)")
    ref_idx, held_idx = split_real(r.shape[0], x.shape[0], seed)
    m = held_idx.shape[0]
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:m].sort().values
    x, y = (x, y) if m == x.shape[0] else (x[keep], None if y is None else y[keep])  # samples at the floor's size
    classes = 0 if ry is None else int(torch.unique(ry[ref_idx]).numel())
    if classes >= 2:
        net = train_feature_net(r[ref_idx], ry[ref_idx], seed, steps)
        features = f"a conv net trained {steps} steps on {classes} classes of {len(ref_idx)} images (seed {seed})"
    else:
        net = random_feature_net(r[ref_idx], seed)
        features = f"a random conv net (seed {seed}), batch-norm set from {len(ref_idx)} images"
    (f_ref, _), (f_held, held_logits), (f_x, x_logits) = (classify(net, v) for v in (r[ref_idx], r[held_idx], x))
    out = distances(f_x, f_ref, x, r[ref_idx], seed)
    floor = distances(f_held, f_ref, r[held_idx], r[ref_idx], seed)
    out.update({f"{k}_floor": v for k, v in floor.items() if k != "kid_std"})
    out.update(n=m, n_ref=len(ref_idx), features=features, resolution=list(x.shape[2:]))
    if classes >= 2:
        pred = x_logits.argmax(1)
        out["class_hist"] = torch.bincount(pred, minlength=x_logits.shape[1]).tolist()
        out["classifier_accuracy"] = float((held_logits.argmax(1) == ry[held_idx]).double().mean())
        if y is not None:
            out["label_accuracy"] = float((pred == y).double().mean())
    if m < f_ref.shape[1]:
        out["warning"] = (f"only {m} samples against {len(ref_idx)} reference images: the distances are noisy; "
                          "compare them with their floors, or use more samples and images")
    out["note"] = NOTE
    return out


__all__ = ["FEATURE_STEPS", "NOTE", "distances", "evaluate_folder", "random_feature_net", "split_real",
           "train_feature_net"]

"""Sample-quality metrics for the bundled image sets, on the features of a small shipped classifier.

Frechet distance between Gaussians fitted to features (Heusel et al. 2017, "GANs trained by a two time-scale
update rule"); improved precision and recall from k-NN manifolds (Kynkaanniemi et al. 2019); and the
histogram of predicted classes (mode dropping shows as a lopsided histogram). FD is biased upward at small n:
compare numbers at equal n, against `real_floor(name, n)`, the FD between n train and n held-out images.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..data import from_uint8, load_dataset
from ..errors import UnifuseError
from .classifier import CLASSIFIER_SETS, FeatureNet, classify, load_classifier

F64 = torch.float64


def mean_cov(features: torch.Tensor):
    """Sample mean [D] and unbiased covariance [D, D] of features [N, D] in float64."""
    f = torch.as_tensor(features).to(F64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UnifuseError(f"features must be [N >= 2, D], got shape {tuple(f.shape)}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), with the matrix roots from symmetric eigensolves."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(a).to(F64) for a in (mu1, cov1, mu2, cov2))
    w, v = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T                          # S1^1/2
    m = root1 @ cov2 @ root1
    tr_cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_cross
    return float(fd.clamp_min(0))


def frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_from_stats(*mean_cov(features1), *mean_cov(features2))


def _cdist_chunks(a: torch.Tensor, b: torch.Tensor, fn, chunk: int = 1024):
    return torch.cat([fn(torch.cdist(a[i:i + chunk], b)) for i in range(0, a.shape[0], chunk)])


def knn_radius(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = torch.as_tensor(features).to(F64)
    if f.shape[0] <= k:
        raise UnifuseError(f"k-NN radius with k={k} needs more than {k} points, got {f.shape[0]}")
    return _cdist_chunks(f, f, lambda d: d.topk(k + 1, dim=1, largest=False).values[:, k])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (fakes inside the real k-NN manifold) and recall (reals inside the fake manifold)."""
    real, fake = torch.as_tensor(real).to(F64), torch.as_tensor(fake).to(F64)
    r_real, r_fake = knn_radius(real, k), knn_radius(fake, k)
    precision = _cdist_chunks(fake, real, lambda d: (d <= r_real[None]).any(1)).double().mean()
    recall = _cdist_chunks(real, fake, lambda d: (d <= r_fake[None]).any(1)).double().mean()
    return float(precision), float(recall)


def as_model_images(samples, dataset) -> torch.Tensor:
    """Samples as float [N, C, H, W] in [-1, 1] at the data set's padded resolution: accepts that, the unpadded
    resolution (padded here with -1), or uint8 [N, h, w, C] as written to samples.npz."""
    if isinstance(samples, np.ndarray) and samples.dtype == np.uint8:
        return from_uint8(samples, dataset.pad)
    x = torch.as_tensor(samples).detach().to("cpu", torch.float32)
    if x.dtype == torch.uint8:
        return from_uint8(x.numpy(), dataset.pad)
    C, H, W = dataset.shape
    if x.ndim == 4 and x.shape[1:] == (C, H - 2 * dataset.pad, W - 2 * dataset.pad) and dataset.pad:
        x = torch.nn.functional.pad(x, (dataset.pad,) * 4, value=-1.0)
    if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
        raise UnifuseError(f"samples for {dataset.name!r} must be [N, {C}, {H}, {W}] floats in [-1, 1] or uint8 "
                           f"[N, {H - 2 * dataset.pad}, {W - 2 * dataset.pad}, {C}], got shape {tuple(x.shape)}")
    return x.clamp(-1, 1)


def _subset(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


@functools.lru_cache(maxsize=8)
def reference_features(dataset_name: str, split: str = "train", n: int | None = None, seed: int = 1) -> torch.Tensor:
    """Shipped-classifier features [n, D] of a fixed subset of a split (memoised: a pure function of the assets)."""
    data = load_dataset(dataset_name, split)
    feats, _ = classify(load_classifier(dataset_name), data.images[_subset(len(data), n, seed)])
    return feats


RECOGNISED = 0.9  # classifier probability at which a sample counts as a recognisable digit


def evaluate_images(samples, dataset_name: str, n_ref: int | None = None, labels=None,
                    classifier: FeatureNet | None = None, k: int = 3) -> dict:
    """fd, precision, recall (k-NN, k=3) against n_ref train images (all by default), the predicted-class
    histogram and fractions, mean classifier confidence, the samples the classifier recognises (probability >=
    RECOGNISED for one class; `recognised_hist` counts them per class, `recognised_per_class` is, for each class,
    the share of the samples predicted as that class that are recognised), and (given the requested labels) the
    label accuracy."""
    if dataset_name not in CLASSIFIER_SETS:
        raise UnifuseError(f"image metrics exist for {', '.join(CLASSIFIER_SETS)}, not {dataset_name!r}")
    ref = load_dataset(dataset_name, "train")
    x = as_model_images(samples, ref)
    if x.shape[0] <= k:
        raise UnifuseError(f"evaluate_images needs more than {k} samples, got {x.shape[0]}")
    net = classifier or load_classifier(dataset_name)
    feats, logits = classify(net, x)
    if classifier is None:
        ref_feats = reference_features(dataset_name, "train", n_ref)
    else:
        ref_feats, _ = classify(net, ref.images[_subset(len(ref), n_ref, seed=1)])
    precision, recall = precision_recall(ref_feats, feats, k)
    probs = logits.double().softmax(1)
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=ref.num_classes)
    frac = hist.double() / hist.sum()
    out = dict(fd=frechet_distance(ref_feats, feats), precision=precision, recall=recall,
               class_hist=hist.tolist(), class_fraction=frac.tolist(),
               class_kl=float((frac * (frac * ref.num_classes).clamp_min(1e-12).log()).sum()),  # KL(pred || uniform)
               confidence=float(probs.max(1).values.mean()), n=int(x.shape[0]), n_ref=int(ref_feats.shape[0]))
    sure = probs.max(1).values >= RECOGNISED
    out.update(recognised=float(sure.double().mean()),
               recognised_hist=torch.bincount(pred[sure], minlength=ref.num_classes).tolist())
    out["recognised_per_class"] = [r / h if h else 0.0 for r, h in zip(out["recognised_hist"], out["class_hist"])]
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != x.shape[0]:
            raise UnifuseError(f"labels must have one entry per sample ({x.shape[0]}), got {labels.shape[0]}")
        out["label_accuracy"] = float((pred == labels).double().mean())
    return out


def real_floor(dataset_name: str, n: int, seed: int = 0) -> float:
    """FD between n train and n held-out images: what a perfect model scores at sample size n."""
    if dataset_name not in CLASSIFIER_SETS:
        raise UnifuseError(f"image metrics exist for {', '.join(CLASSIFIER_SETS)}, not {dataset_name!r}")
    held = load_dataset(dataset_name, "heldout")
    if not 2 <= n <= len(held):
        raise UnifuseError(f"real_floor n must be in 2..{len(held)} (the held-out size of {dataset_name}), got {n}")
    return frechet_distance(reference_features(dataset_name, "train", n, seed),
                            reference_features(dataset_name, "heldout", n, seed + 1))

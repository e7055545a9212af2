"""The noise-conditional classifier's objective for classifier guidance (Dhariwal & Nichol 2021, ALGORITHMS card 10).

The cross-entropy of p(y | x_t) on x_t = alpha x + sigma noise with the log-SNR drawn uniformly
(`rand_logsnr_uniform`, the density of likelihood-weighted training) and a share of the batch kept clean. The
network and its files live in `unifuse.nets.classifier`, its training loop in `unifuse.training.classifier`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nets.classifier import NoisyClassifier, clean_time
from .time import rand_logsnr_uniform


class ClassifierLoss:
    """Cross-entropy of a noise-conditional classifier on x_t = alpha x + sigma noise (per sample, [B]).

    lam_range: log-SNR range the noise levels are drawn from, uniformly; clean_fraction: share of the
    batch kept clean (t = t_min), so the same classifier also judges finished samples.
    """

    def __init__(self, lam_range=(-10.0, 10.0), clean_fraction: float = 0.1):
        self.lam_range, self.clean_fraction = tuple(float(v) for v in lam_range), float(clean_fraction)

    def __call__(self, classifier: NoisyClassifier, x: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        path = classifier.path
        # log-SNR uniform in lam_range, drawn on the generator's device (the CPU by default), then moved
        t = rand_logsnr_uniform(x.shape[0], path, generator=generator, clip=self.lam_range).to(x.device)
        clean = torch.rand(x.shape[0], generator=generator) < self.clean_fraction
        t_clean = clean_time(path)
        t = torch.where(clean.to(x.device), torch.full_like(t, t_clean), t)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_t = path.interpolate(x, noise, t).to(x.dtype)
        return F.cross_entropy(classifier(x_t, t), labels.to(x.device).long(), reduction="none")


__all__ = ["ClassifierLoss"]

"""The loss of the latent-diffusion autoencoder (Rombach et al. 2022, App. G; the LDM KL-autoencoder recipe without
its LPIPS network and patch discriminator, with an optional feature loss from the shipped classifier instead).

Per image, with D pixels, x_hat = decode(z), z ~ q(z | x) = N(mean, diag(exp(logvar))):

    L = l1 |x - x_hat|_1 / D + l2 |x - x_hat|^2 / D + perceptual |phi(x) - phi(x_hat)|^2 / d_phi
        + kl KL(q(z | x) || N(0, I)) / D,      KL = 1/2 sum_j (mean_j^2 + exp(logvar_j) - 1 - logvar_j)

LDM sums the reconstruction over pixels and adds kl * KL (kl = 1e-6); dividing both by D gives the same optimum and
keeps the paper's meaning of the KL weight. phi: the penultimate features of the bundled digit classifier
(`unifuse.metrics.load_classifier(name).embed`), frozen; the images are padded back to the classifier's input size.
"""
from __future__ import annotations

import torch

from ..errors import UnifuseError


class AutoencoderLoss:
    """loss(ae, x, generator=) -> (per-image loss [B], {"l1", "l2", "kl", "perceptual": batch means})."""

    def __init__(self, kl: float = 1e-6, l1: float = 1.0, l2: float = 0.0, perceptual: float = 0.0,
                 features: str = "", pad: int = 0):
        if min(kl, l1, l2, perceptual) < 0 or l1 + l2 + perceptual <= 0:
            raise UnifuseError(f"autoencoder loss weights must be >= 0 with some reconstruction term, got kl={kl}, "
                               f"l1={l1}, l2={l2}, perceptual={perceptual}")
        if perceptual > 0 and not features:
            raise UnifuseError("objective.options.perceptual > 0 needs features=digits or features=mnist (the shipped "
                               "classifier whose features it compares)")
        self.kl, self.l1, self.l2, self.perceptual, self.pad = float(kl), float(l1), float(l2), float(perceptual), pad
        self.features = features
        self._phi = None

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen classifier features of images padded (with the background -1) to the classifier's input."""
        if self._phi is None:
            from ..metrics import load_classifier

            self._phi = load_classifier(self.features).requires_grad_(False).to(x.device)
        if self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4, value=-1.0)
        return self._phi.embed(x)

    def __call__(self, ae, x: torch.Tensor, generator: torch.Generator | None = None):
        x_hat, mean, logvar = ae(x, generator=generator)
        D = x[0].numel()
        err = (x_hat - x).flatten(1)
        parts = {"l1": err.abs().mean(1), "l2": err.square().mean(1)}
        loss = self.l1 * parts["l1"] + self.l2 * parts["l2"]
        if logvar is not None:
            parts["kl"] = kl_divergence(mean, logvar)
            loss = loss + self.kl * parts["kl"] / D
        if self.perceptual > 0:
            parts["perceptual"] = (self.phi(x_hat) - self.phi(x)).square().mean(1)
            loss = loss + self.perceptual * parts["perceptual"]
        return loss, {k: float(v.detach().mean()) for k, v in parts.items()}


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) in nats per sample [B]: 1/2 sum (mean^2 + var - 1 - logvar)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


__all__ = ["AutoencoderLoss", "kl_divergence"]

"""The small CNN classifiers whose penultimate activations are the Frechet features for the bundled data sets.

The role Inception-v3 plays for FID (Heusel et al. 2017), scaled to 8x8 digits and 32x32 MNIST: trained once by
`python -m unifuse.metrics.train_classifier digits|mnist`, shipped as safetensors in unifuse/assets/ with a JSON
sidecar (accuracy, feature dimension, date), and loaded without pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError, choose

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_SETS = ("digits", "mnist")
FEATURE_DIM = 64


class FeatureNet(nn.Module):
    """[strided conv stem down to 16x16] -> 3 stages of (conv-BN-ReLU) x2 with 2x2 max-pooling while the map is
    larger than 4x4 -> global average pool -> Linear-ReLU features [B, feature_dim] -> Linear logits."""

    def __init__(self, in_channels: int = 1, resolution: int = 8, width: int = 32, feature_dim: int = FEATURE_DIM,
                 num_classes: int = 10):
        super().__init__()
        self.config = dict(in_channels=in_channels, resolution=resolution, width=width, feature_dim=feature_dim,
                           num_classes=num_classes)
        layers, c, res = [], in_channels, resolution
        while res > 16:  # a strided stem: MNIST-sized inputs are classified at 16x16, 4x cheaper
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c, res = width, res // 2
        for i, w in enumerate([width, 2 * width, 4 * width]):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
            if res > 4 and i < 2:
                layers.append(nn.MaxPool2d(2))
                res //= 2
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(c, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] (the Frechet features)."""
        return self.features(self.body(x).mean((2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def asset_paths(name: str):
    return ASSETS / f"classifier-{name}.safetensors", ASSETS / f"classifier-{name}.json"


def load_classifier(name: str) -> FeatureNet:
    """The shipped classifier for a bundled data set, in eval mode (safetensors weights; no pickle)."""
    from safetensors.torch import load_file

    choose("classifier data set", name, CLASSIFIER_SETS)
    weights, sidecar = asset_paths(name)
    if not weights.exists() or not sidecar.exists():
        raise UnifuseError(f"the {name} classifier is missing from {ASSETS}; "
                           f"train it with `python -m unifuse.metrics.train_classifier {name}`")
    info = json.loads(sidecar.read_text())
    net = FeatureNet(**info["config"])
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def classifier_info(name: str) -> dict:
    """The JSON sidecar of a shipped classifier: held-out accuracy, feature dimension, date, config."""
    choose("classifier data set", name, CLASSIFIER_SETS)
    return json.loads(asset_paths(name)[1].read_text())


@torch.no_grad()
def classify(net: FeatureNet, images: torch.Tensor, batch: int = 512):
    """(features [N, feature_dim] float64, logits [N, classes]) of images [N, C, H, W] in [-1, 1]."""
    feats, logits = [], []
    for chunk in images.split(batch):
        f = net.embed(chunk.to(torch.float32))
        feats.append(f.double())
        logits.append(net.head(f))
    return torch.cat(feats), torch.cat(logits)


def augment(x: torch.Tensor, shift: int, generator: torch.Generator, rotate: float = 0.0) -> torch.Tensor:
    """Random translation by up to `shift` pixels and rotation by up to `rotate` radians (background -1)."""
    B = x.shape[0]
    ang = (torch.rand(B, generator=generator) * 2 - 1) * rotate
    scale = 1 + (torch.rand(B, generator=generator) * 2 - 1) * (0.1 if rotate else 0.0)
    txy = (torch.randint(-shift, shift + 1, (B, 2), generator=generator).float() * 2 / x.shape[-1])
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, txy[:, 0]], 1), torch.stack([sin, cos, txy[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1

"""A noise-conditional classifier p(y | x_t) for classifier guidance (Dhariwal & Nichol 2021, ALGORITHMS
card 10): the network, its presets and its files. It is trained with cross-entropy on noisy samples
x_t = alpha x + sigma noise of any path (`unifuse.objectives.classifier`, trained by `unifuse.training.classifier`).

The classifier sees only path-invariant inputs: the log-SNR lambda and x_t / sqrt(alpha^2 s_d^2 + sigma^2)
(at equal log-SNR, x_t on two paths differ by the factor |(alpha, sigma)| that this divides out; NOTATION
section 5). So one trained classifier guides a model of any family; `unifuse.guidance.classifier_guidance`
maps the model's time to the classifier's path at equal log-SNR.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError
from ..io import atomic_write, write_json
from ..paths.base import Path, as_time


def log_snr_features(lam: torch.Tensor, dim: int) -> torch.Tensor:
    """Fourier features cos/sin(f_i lambda) with f_i geometric in [1/32, 2]: smooth over lambda in [-20, 20]."""
    freqs = torch.exp(torch.linspace(math.log(1 / 32), math.log(2.0), dim // 2, device=lam.device))
    arg = lam.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], 1)


class Block(nn.Module):
    """Residual conv block with the noise-level embedding as scale and shift (FiLM)."""

    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(min(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(min(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.film = nn.Linear(emb, 2 * c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, 1)
        h = self.c2(F.silu(self.n2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class NoisyClassifier(nn.Module):
    """classifier(x_t [B, C, H, W], t [B] on `path`) -> logits [B, num_classes].

    Three stages of residual blocks (width, 2 width, 2 width) with 2x average pooling between them,
    global average pooling and a linear head; the noise level enters every block through FiLM.
    """

    def __init__(self,
                 path:        Path,
                 in_channels: int = 1,
                 num_classes: int = 10,
                 width:       int = 32,
                 mult:        Sequence[int] = (1, 2, 2),
                 sigma_data:  float = 0.5,
                 emb_dim:     int = 64):
        super().__init__()
        if not isinstance(path, Path):
            raise UnifuseError(f"NoisyClassifier needs a unifuse path (e.g. uf.paths.get('vp-linear')), got {path!r}")
        self.path, self.sigma_data = path, float(sigma_data)
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, mult=list(mult),
                           sigma_data=sigma_data, emb_dim=emb_dim)
        self.num_classes, self.emb_dim = num_classes, emb_dim
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        chans = [width * m for m in mult]
        self.blocks = nn.ModuleList(Block(c_in, c_out, emb_dim) for c_in, c_out in zip([width] + chans[:-1], chans))
        self.head = nn.Sequential(nn.GroupNorm(min(8, chans[-1]), chans[-1]), nn.SiLU())
        self.out = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.ndim != 4:
            raise UnifuseError(f"NoisyClassifier expects images [B, C, H, W], got shape {tuple(x.shape)}")
        t = as_time(t).to(device=x.device, dtype=torch.float64)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a, s = self.path.alpha(t), self.path.sigma(t)
        # path-invariant input scale and noise label (see the module docstring)
        x = x / torch.sqrt((a * self.sigma_data) ** 2 + s * s).to(x.dtype).reshape(-1, 1, 1, 1)
        lam = self.path.log_snr(t).clamp(-30, 30)
        e = self.embed(log_snr_features(lam, self.emb_dim).to(self.out.weight.dtype))
        h = self.inp(x.to(self.out.weight.dtype))
        for i, block in enumerate(self.blocks):
            h = block(h, e)
            if i < len(self.blocks) - 1 and min(h.shape[-2:]) >= 4:
                h = F.avg_pool2d(h, 2, ceil_mode=True)
        return self.out(self.head(h).mean((-2, -1)))


def clean_time(path: Path) -> float:
    """The data end t_min where it is finite (VE: its least-noisy time t_eps)."""
    return float(path.t_min) if math.isfinite(path.t_min) else float(path.t_eps)


# --- presets for `unifuse train digits-classifier|mnist-classifier` ------------------------------------------
# name -> (data set, path the classifier is trained on, steps, batch, width). The path does not limit use:
# the classifier's inputs are path-invariant, so it guides models of every family.
CLASSIFIER_PRESETS = {
    "digits-classifier": ("digits", "edm", 1500, 128, 32),
    "mnist-classifier":  ("mnist", "edm", 3000, 128, 32),
}


def save_noisy_classifier(classifier: NoisyClassifier, out: str, record: dict) -> str:
    """Write classifier.safetensors and its JSON sidecar `record` into the folder `out`; returns the weights' path."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    weights, sidecar = os.path.join(out, "classifier.safetensors"), os.path.join(out, "classifier.json")
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp))
    write_json(sidecar, record)
    return weights


def load_noisy_classifier(folder: str, shape: Sequence[int] | None = None,
                          num_classes: int | None = None) -> NoisyClassifier:
    """A classifier saved by `train_classifier_preset` (safetensors weights, JSON sidecar; no pickle).
    shape, num_classes: the data shape [C, H, W] and class count it must have been trained on (checked)."""
    from safetensors.torch import load_file

    from ..paths import get as get_path

    weights, sidecar = os.path.join(folder, "classifier.safetensors"), os.path.join(folder, "classifier.json")
    if not (os.path.isfile(weights) and os.path.isfile(sidecar)):
        raise UnifuseError(f"{folder} holds no noise-conditional classifier (classifier.safetensors + "
                           "classifier.json); train one with `unifuse train digits-classifier --out DIR`")
    with open(sidecar) as fh:
        record = json.load(fh)
    fix = f"train one on the run's data: unifuse train {'|'.join(CLASSIFIER_PRESETS)} --out DIR"
    if shape is not None:
        trained = record.get("shape")
        if trained is None:  # sidecars written before the shape was recorded
            from ..data import load_dataset

            trained = list(load_dataset(record["data"], "heldout").shape)
        if [int(v) for v in trained] != [int(v) for v in shape]:
            raise UnifuseError(f"classifier {folder} was trained on {record.get('data')} images of shape "
                               f"{list(trained)}, but the model makes {list(shape)}; {fix}")
    k = int(record["config"].get("num_classes", 10))
    if num_classes is not None and k != int(num_classes):
        raise UnifuseError(f"classifier {folder} knows {k} classes, but the model's data has {num_classes}; {fix}")
    clf = NoisyClassifier(get_path(record["path"]), **record["config"])
    clf.load_state_dict(load_file(weights))
    return clf.eval()


__all__ = ["NoisyClassifier", "Block", "log_snr_features", "clean_time", "CLASSIFIER_PRESETS", "save_noisy_classifier",
           "load_noisy_classifier"]

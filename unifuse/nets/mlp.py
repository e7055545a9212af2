"""A residual MLP for 2-D and tabular data (the toy networks of score-based and flow-matching papers,
e.g. Song et al. 2021, Lipman et al. 2022), with the same noise-label/class/text conditioning as the image nets;
two_times=True adds the end time r of a jump (few-step MeanFlow / shortcut models, `layers.ConditionEmbedding`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError
from .layers import ConditionEmbedding, zero_


class MLPBlock(nn.Module):
    """h = h + W2 dropout(silu(W1 (LN(h) (1 + scale) + shift))), (scale, shift) from the embedding."""

    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.emb = nn.Linear(emb_dim, 2 * width)
        self.fc1, self.drop, self.fc2 = nn.Linear(width, width), nn.Dropout(dropout), zero_(nn.Linear(width, width))

    def forward(self, h, emb):
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)
        return h + self.fc2(self.drop(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift))))


class MLP(nn.Module):
    """net(x [B, D], t [B], class_labels=None, text=None, text_mask=None, r=None) -> [B, D] ([B, 2D] with learned
    variance); r [B], the end time in t's units, only for two_times=True (None: r = t)."""

    family = "mlp"

    def __init__(self,
                 dim:              int = 2,
                 width:            int = 256,
                 depth:            int = 4,
                 emb_dim:          int = 128,
                 dropout:          float = 0.0,
                 num_classes:      int = 0,
                 text_dim:         int = 0,
                 learned_variance: bool = False,
                 two_times:        bool = False):
        super().__init__()
        self.config = dict(dim=dim, width=width, depth=depth, emb_dim=emb_dim, dropout=dropout,
                           num_classes=num_classes, text_dim=text_dim, learned_variance=learned_variance,
                           two_times=two_times)
        self.two_times = bool(two_times)
        self.dim, self.out_dim = dim, dim * (2 if learned_variance else 1)
        self.embed = ConditionEmbedding(emb_dim, emb_dim, num_classes, text_dim, two_times)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([MLPBlock(width, emb_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out = zero_(nn.Linear(width, self.out_dim))

    def forward(self, x, t, class_labels=None, text=None, text_mask=None, r=None):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UnifuseError(f"MLP expects x of shape [B, {self.dim}], got {tuple(x.shape)}; "
                               "flatten the data or set dim=")
        emb = self.embed(t, x, class_labels, text, text_mask, r)
        h = self.inp(x.to(self.inp.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm(h)))

"""A small Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify, fixed 2-D sine-cosine position embedding, transformer blocks with adaLN-Zero modulation by the
noise-label/class/pooled-text embedding, optional cross-attention to caption tokens between self-attention and the
MLP (as in PixArt-alpha, Chen et al. 2023), and a zero-initialised adaLN output layer, then unpatchify.
`two_times=True` adds the end time r of a jump (`net(x, t, r=...)`, few-step MeanFlow / shortcut models) through
a zero-initialised embedding (`layers.ConditionEmbedding`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError
from .layers import Attention, ConditionEmbedding, zero_


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed position embedding: half the channels encode the row, half the column."""
    if dim % 4:
        raise UnifuseError(f"DiT width {dim} must be divisible by 4 for the 2-D position embedding")
    pos = torch.arange(grid, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ang = pos[:, None] * freqs[None]                                  # [grid, dim/4]
    one = torch.cat([torch.sin(ang), torch.cos(ang)], 1)             # [grid, dim/2]
    rows, cols = one[:, None, :].expand(grid, grid, -1), one[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(grid * grid, dim).float()


def modulate(h, shift, scale):
    return h * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero block: h += gate_a * attn(mod(LN h)); [h += cross(LN h, text)]; h += gate_m * mlp(mod(LN h))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, emb_dim: int, text_dim: int, dropout: float,
                 impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, impl=impl)
        self.cross = None
        if text_dim:
            self.norm_c = nn.LayerNorm(width, eps=1e-6)
            self.cross = Attention(width, heads, context_dim=text_dim, impl=impl)
            zero_(self.cross.out)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.ada = zero_(nn.Linear(emb_dim, 6 * width))

    def forward(self, h, emb, text=None, text_mask=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(emb)).chunk(6, dim=1)
        h = h + g1[:, None] * self.attn(modulate(self.norm1(h), sh1, sc1))
        if self.cross is not None and text is not None and text.ndim == 3:
            h = h + self.cross(self.norm_c(h), text, text_mask)
        return h + g2[:, None] * self.mlp(modulate(self.norm2(h), sh2, sc2))


class DiT(nn.Module):
    """net(x [B, C, H, W], t [B], class_labels=None, text=None, text_mask=None, r=None) -> [B, C or 2C, H, W];
    r [B], the end time in t's units, only for two_times=True (None: r = t)."""

    family = "dit"

    def __init__(self,
                 in_channels:      int = 1,
                 resolution:       int = 8,
                 patch:            int = 2,
                 width:            int = 192,
                 depth:            int = 6,
                 heads:            int = 4,
                 mlp_ratio:        float = 4.0,
                 dropout:          float = 0.0,
                 num_classes:      int = 0,
                 text_dim:         int = 0,
                 learned_variance: bool = False,
                 attn_impl:        str = "auto",
                 two_times:        bool = False):
        super().__init__()
        self.config = dict(in_channels=in_channels, resolution=resolution, patch=patch, width=width, depth=depth,
                           heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, num_classes=num_classes,
                           text_dim=text_dim, learned_variance=learned_variance, attn_impl=attn_impl, two_times=two_times)
        self.two_times = bool(two_times)
        if resolution % patch:
            raise UnifuseError(f"resolution {resolution} is not divisible by patch={patch}; "
                               "choose a patch size dividing it")
        self.in_channels, self.out_channels = in_channels, in_channels * (2 if learned_variance else 1)
        self.patch, self.grid = patch, resolution // patch
        self.embed = ConditionEmbedding(width, 256, num_classes, text_dim, two_times)
        self.patchify = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(self.grid, width)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio, width, text_dim, dropout, attn_impl)
                                     for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = zero_(nn.Linear(width, 2 * width))
        self.out = zero_(nn.Linear(width, patch * patch * self.out_channels))

    def forward(self, x, t, class_labels=None, text=None, text_mask=None, r=None):
        B = x.shape[0]
        side = self.grid * self.patch
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, side, side):
            raise UnifuseError(f"DiT expects x of shape [B, {self.in_channels}, {side}, {side}], got {tuple(x.shape)}")
        emb = self.embed(t, x, class_labels, text, text_mask, r)
        dtype = self.patchify.weight.dtype
        h = self.patchify(x.to(dtype)).flatten(2).transpose(1, 2) + self.pos.to(dtype)
        for block in self.blocks:
            h = block(h, emb, text, text_mask)
        shift, scale = self.ada_out(F.silu(emb)).chunk(2, dim=1)
        h = self.out(modulate(self.norm_out(h), shift, scale))       # [B, grid^2, p*p*C]
        g, p, c = self.grid, self.patch, self.out_channels
        return h.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

"""The diffusion U-Net (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

Residual blocks (GroupNorm, SiLU, dropout) conditioned by scale-shift on the noise-label/class/text embedding,
self-attention (and text cross-attention, Rombach et al. 2022) at low resolutions, strided-conv downsampling,
nearest-neighbour upsampling, skip connections, and a zero-initialised output convolution so the untrained net
predicts 0. `patch=p` folds p x p pixel blocks into channels before the first convolution and unfolds the output
(space-to-depth, as in "simple diffusion", Hoogeboom et al. 2023): p^2 times less compute at full resolution, which
is what makes 32x32 training fast on a CPU. `attn_resolutions` are feature-map sizes after patching.
`learned_variance=True` doubles the output channels for the Improved-DDPM variance head.
`two_times=True` adds the end time r of a jump (`net(x, t, r=...)`, few-step MeanFlow / shortcut models) through
a zero-initialised embedding (`layers.ConditionEmbedding`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError
from .layers import Attention, ConditionEmbedding, num_groups, zero_


class ResBlock(nn.Module):
    """h = x + conv(dropout(silu(GN(conv(silu(GN(x)))) * (1 + scale) + shift))), (scale, shift) from the embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(num_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.drop = nn.GroupNorm(num_groups(c_out), c_out), nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, then (with text) cross-attention to the caption tokens."""

    def __init__(self, ch: int, heads: int, text_dim: int, impl: str):
        super().__init__()
        self.norm, self.attn = nn.GroupNorm(num_groups(ch), ch), Attention(ch, heads, impl=impl)
        zero_(self.attn.out)
        self.cross = None
        if text_dim:
            self.cross_norm, self.cross = nn.LayerNorm(ch), Attention(ch, heads, context_dim=text_dim, impl=impl)
            zero_(self.cross.out)

    def forward(self, x, text=None, text_mask=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)            # [B, HW, C]
        h = x.flatten(2).transpose(1, 2) + self.attn(h)
        if self.cross is not None and text is not None and text.ndim == 3:
            h = h + self.cross(self.cross_norm(h), text, text_mask)
        return h.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """net(x [B, C, H, W], t [B], class_labels=None, text=None, text_mask=None, r=None) -> [B, C or 2C, H, W];
    r [B], the end time in t's units, only for two_times=True (None: r = t)."""

    family = "unet"

    def __init__(self,
                 in_channels:      int = 1,
                 channels:         int = 64,
                 channel_mult:     Sequence[int] = (1, 2),
                 num_res_blocks:   int | Sequence[int] = 2,
                 attn_resolutions: Sequence[int] = (4,),
                 heads:            int = 4,
                 dropout:          float = 0.1,
                 resolution:       int = 8,
                 patch:            int = 1,
                 num_classes:      int = 0,
                 text_dim:         int = 0,
                 learned_variance: bool = False,
                 attn_impl:        str = "auto",
                 two_times:        bool = False):
        super().__init__()
        self.config = dict(in_channels=in_channels, channels=channels, channel_mult=list(channel_mult),
                           num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else list(num_res_blocks),
                           attn_resolutions=list(attn_resolutions), heads=heads, dropout=dropout,
                           resolution=resolution, patch=patch, num_classes=num_classes, text_dim=text_dim,
                           learned_variance=learned_variance, attn_impl=attn_impl, two_times=two_times)
        self.two_times = bool(two_times)
        if resolution % (patch * 2 ** (len(channel_mult) - 1)):
            raise UnifuseError(f"resolution {resolution} is not divisible by patch * 2^(levels - 1) = "
                               f"{patch * 2 ** (len(channel_mult) - 1)}; use fewer channel_mult levels or pad "
                               "the images")
        self.in_channels, self.out_channels = in_channels, in_channels * (2 if learned_variance else 1)
        blocks = [num_res_blocks] * len(channel_mult) if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(blocks) != len(channel_mult):
            raise UnifuseError(f"num_res_blocks {num_res_blocks} needs one entry per channel_mult level "
                               f"({len(channel_mult)})")
        emb_dim = 4 * channels
        self.embed = ConditionEmbedding(emb_dim, channels, num_classes, text_dim, two_times)
        self.patch = patch  # space-to-depth: the U-Net runs at resolution / patch (Hoogeboom et al. 2023)
        self.conv_in = nn.Conv2d(in_channels * patch * patch, channels, 3, padding=1)

        def attn(ch, res):
            return AttnBlock(ch, heads, text_dim, attn_impl) if res in attn_resolutions else None

        # Contracting path: record the width of every skip connection.
        self.down, skips, ch, res = nn.ModuleList(), [channels], channels, resolution // patch
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks[level]):
                self.down.append(nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout),
                                                attn(channels * mult, res)]))
                ch = channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch, heads, text_dim, attn_impl),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        # Expanding path: one more block per level than the contracting path, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(blocks[level] + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout),
                                              attn(channels * mult, res)]))
                ch = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.norm_out = nn.GroupNorm(num_groups(ch), ch)
        self.conv_out = zero_(nn.Conv2d(ch, self.out_channels * patch * patch, 3, padding=1))

    def forward(self, x, t, class_labels=None, text=None, text_mask=None, r=None):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UnifuseError(f"UNet expects x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        emb = self.embed(t, x, class_labels, text, text_mask, r)
        x = x.to(self.conv_in.weight.dtype)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        hs = [h]
        for layer in self.down:
            h = self.block(layer, h, emb, text, text_mask)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h, text, text_mask)
        h = self.mid[2](h, emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self.block(layer, h, emb, text, text_mask)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out

    @staticmethod
    def block(layer, h, emb, text, text_mask):
        if not isinstance(layer, nn.ModuleList):  # a resampling layer
            return layer(h)
        res, attn = layer
        h = res(h, emb)
        return h if attn is None else attn(h, text, text_mask)

"""A small convolutional autoencoder for latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"; ALGORITHMS card 12), the LDM KL-autoencoder recipe scaled down to 28-64 pixels.

    encoder: conv -> [ResBlock x num_res_blocks, downsample (stride-2 conv)] per level -> ResBlock -> GN, SiLU, conv
             -> (mean, log variance) of a diagonal Gaussian posterior q(z | x)     (variational=True, the KL-AE)
             -> z                                                                 (variational=False, the plain AE)
    decoder: conv -> ResBlock -> [ResBlock x num_res_blocks, upsample (nearest x2, conv)] per level -> GN, SiLU, conv

GroupNorm with groups dividing the channels (`layers.num_groups`) and SiLU throughout. The downsampling factor is
f = 2^(len(channel_mult) - 1): 28x28x1 -> 7x7x4 and 32x32x3 -> 8x8x4 with channel_mult of length 3. The losses
(reconstruction, KL to N(0, I) with the paper's weight 1e-6, optional classifier features) are
`unifuse.objectives.AutoencoderLoss`; the latent scale is `unifuse.latent.LatentCodec`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnifuseError
from .layers import num_groups, zero_

LOGVAR_RANGE = (-30.0, 20.0)  # the LDM clamp of the posterior's log variance


class Block(nn.Module):
    """h = skip(x) + conv(silu(GN(conv(silu(GN(x)))))) (the LDM ResnetBlock without a time embedding)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(num_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(num_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Autoencoder(nn.Module):
    """encode(x [B, C, H, W]) -> (mean, logvar) [B, latent_channels, H/f, W/f] (logvar None when not variational);
    decode(z) -> x_hat [B, C, H, W]; forward(x, generator=) -> (x_hat, mean, logvar) with z drawn from q(z | x)
    (its mean when not variational or in eval mode)."""

    family = "ae"

    def __init__(self,
                 in_channels:     int = 1,
                 channels:        int = 32,
                 channel_mult:    tuple = (1, 2, 2),
                 num_res_blocks:  int = 1,
                 latent_channels: int = 4,
                 variational:     bool = True):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or channels < 1 or latent_channels < 1 or num_res_blocks < 0:
            raise UnifuseError(f"autoencoder needs channels >= 1, latent_channels >= 1, num_res_blocks >= 0 and a "
                               f"non-empty channel_mult; got {channels}, {latent_channels}, {num_res_blocks}, "
                               f"{channel_mult}")
        self.config = dict(in_channels=in_channels, channels=channels, channel_mult=list(channel_mult),
                           num_res_blocks=num_res_blocks, latent_channels=latent_channels, variational=variational)
        self.in_channels, self.latent_channels, self.variational = in_channels, latent_channels, bool(variational)
        self.factor = 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult]
        self.encoder = self._encoder(in_channels, widths, num_res_blocks, latent_channels * (1 + self.variational))
        self.decoder = self._decoder(in_channels, widths, num_res_blocks, latent_channels)

    @staticmethod
    def _encoder(c_in, widths, blocks, c_out) -> nn.Sequential:
        layers, c = [nn.Conv2d(c_in, widths[0], 3, padding=1)], widths[0]
        for i, w in enumerate(widths):
            for _ in range(blocks):
                layers.append(Block(c, w))
                c = w
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # H -> ceil(H / 2)
        layers += [Block(c, c), nn.GroupNorm(num_groups(c), c), nn.SiLU(), nn.Conv2d(c, c_out, 3, padding=1)]
        return nn.Sequential(*layers)

    @staticmethod
    def _decoder(c_out, widths, blocks, c_in) -> nn.Sequential:
        c = widths[-1]
        layers = [nn.Conv2d(c_in, c, 3, padding=1), Block(c, c)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(blocks):
                layers.append(Block(c, w))
                c = w
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [nn.GroupNorm(num_groups(c), c), nn.SiLU(), zero_(nn.Conv2d(c, c_out, 3, padding=1))]
        return nn.Sequential(*layers)

    def check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise UnifuseError(f"the autoencoder takes images [B, {self.in_channels}, H, W] with H and W divisible by "
                               f"its downsampling factor {self.factor}, got {tuple(x.shape)}; crop or resize the images")

    def encode(self, x: torch.Tensor):
        """(mean, logvar) of q(z | x); logvar is None for the plain (deterministic) autoencoder."""
        self.check(x)
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UnifuseError(f"the decoder takes latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mean, logvar = self.encode(x)
        z = mean
        if logvar is not None and self.training:  # the reparameterised posterior sample z = mean + std * noise
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * noise
        return self.decode(z), mean, logvar

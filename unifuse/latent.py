"""The latent codec of latent diffusion (Rombach et al. 2022; ALGORITHMS card 12): a diffusion model whose data are
an autoencoder's normalised latents.

    z = (E(crop(x)) - shift) / scale          encode: per-channel shift and scale, so z has mean 0 and std 1
    x = pad(D(z * scale + shift))             decode: back to the data set's pixel shape (padding with -1)

E(x) is the posterior mean of the KL-autoencoder (deterministic; `encode(x, generator=g)` draws
z ~ q(z | x) instead), or the plain autoencoder's code. shift[c] and scale[c] are the mean and standard deviation
of channel c of E(x) over the WHOLE training set (`fit_scale`), not over one batch (LDM's `scale_by_std` uses the
first batch; MAR, LTH14/mar#2, uses the whole set); a forgotten or wrong scale leaves latents far from unit
variance and every noise schedule off (diffusers#5166, Open-Sora#493).

A codec is identified by `digest()`, the SHA-256 of its weights, shift, scale and padding. A latent run's data info
(`info["latent"]`, stored in every checkpoint sidecar) holds `meta()`: the autoencoder's architecture, shift, scale,
padding and that digest; the checkpoint folder holds the weights (autoencoder.safetensors). Codecs loaded in this
process are kept by digest (`remember`, `find_codec`), so `unifuse.training.sampling.generate` decodes a latent
model's samples given only the run's data info: a content-addressed cache, the same weights under the same key.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .errors import UnifuseError

CHUNK = 500          # images per encoder or decoder call (encoding a data set happens once, in chunks)
MAX_REMEMBERED = 8   # codecs kept by digest in one process


class LatentCodec(nn.Module):
    """encode(images [N, C, H, W] in [-1, 1]) -> latents [N, c, h, w]; decode(latents) -> images. shift, scale [c]:
    buffers (so they travel with the state dict); pad: pixels of padding per side removed before encoding and
    restored (with the background -1) after decoding (MNIST: 2, so 32x32 -> 28x28 -> 7x7)."""

    def __init__(self, autoencoder: nn.Module, shift=None, scale=None, pad: int = 0):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        c = autoencoder.latent_channels
        shift = torch.zeros(c) if shift is None else torch.as_tensor(shift, dtype=torch.float32).reshape(-1)
        scale = torch.ones(c) if scale is None else torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if shift.shape != (c,) or scale.shape != (c,) or not bool((scale > 0).all()):
            raise UnifuseError(f"a latent codec needs shift and scale of {c} values (one per latent channel) with "
                               f"scale > 0, got {shift.tolist()} and {scale.tolist()}; refit them with fit_scale")
        self.register_buffer("shift", shift.float())
        self.register_buffer("scale", scale.float())
        self.pad = int(pad)

    def train(self, mode: bool = True):  # the codec is frozen: always in eval mode
        return super().train(False)

    def raw_encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """E(crop(x)) before normalisation: the posterior mean, or a posterior sample given a generator."""
        x = images[..., self.pad:-self.pad, self.pad:-self.pad] if self.pad else images
        ae = self.autoencoder
        mean, logvar = ae.encode(x.to(self.shift.device, self.shift.dtype))
        if generator is None or logvar is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, chunk: int = CHUNK):
        """Normalised latents (E(x) - shift) / scale of images [N, C, H, W], CHUNK images at a time."""
        out = [(self.raw_encode(images[i:i + chunk], generator) - self._c(self.shift)) / self._c(self.scale)
               for i in range(0, images.shape[0], chunk)]
        return torch.cat(out) if out else images.new_zeros((0, self.autoencoder.latent_channels))

    def decode(self, latents: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
        """Images D(z scale + shift), padded back to the data set's shape; float32 (decoding in fp32, card 12).
        Differentiable (a reward on decoded images can back-propagate into the latents)."""
        out = []
        for i in range(0, latents.shape[0], chunk):
            z = latents[i:i + chunk].to(self.shift.device, torch.float32)
            x = self.autoencoder.decode(z * self._c(self.scale) + self._c(self.shift))
            out.append(torch.nn.functional.pad(x, (self.pad,) * 4, value=-1.0) if self.pad else x)
        return torch.cat(out)

    @staticmethod
    def _c(v: torch.Tensor) -> torch.Tensor:
        return v[None, :, None, None]

    def digest(self) -> str:
        """SHA-256 of the weights, shift, scale (float32 bytes, sorted names) and padding."""
        h = hashlib.sha256(f"pad={self.pad};".encode())
        for name, value in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes())
        return h.hexdigest()

    def meta(self) -> dict:
        """What a sidecar stores beside the weights: architecture, shift, scale, padding, digest."""
        ae = self.autoencoder
        return {"autoencoder": {"family": getattr(ae, "family", None), "config": getattr(ae, "config", None)},
                "shift": [round(float(v), 8) for v in self.shift], "scale": [round(float(v), 8) for v in self.scale],
                "pad": self.pad, "digest": self.digest()}


@torch.no_grad()
def fit_scale(codec: LatentCodec, images: torch.Tensor, chunk: int = CHUNK) -> LatentCodec:
    """Set codec.shift and codec.scale to the per-channel mean and standard deviation of the raw latents E(x) over
    ALL of `images` (accumulated in float64 chunk by chunk: sum z and sum z^2 over images and positions), so that
    encode(images) has mean 0 and variance 1 in every channel. Returns the codec."""
    c = codec.autoencoder.latent_channels
    total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for i in range(0, images.shape[0], chunk):
        z = codec.raw_encode(images[i:i + chunk]).double().cpu()
        total += z.sum((0, 2, 3))
        total_sq += z.square().sum((0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    if count < 2:
        raise UnifuseError(f"fit_scale needs at least one image to estimate the latent scale, got {images.shape[0]}")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    codec.shift.copy_(mean.float())
    codec.scale.copy_(std.float())
    return codec


# --- codecs by digest ---------------------------------------------------------------------------------
_REMEMBERED: dict = {}


def remember(codec: LatentCodec) -> str:
    """Keep `codec` under its digest (the newest MAX_REMEMBERED); returns the digest."""
    key = codec.digest()
    _REMEMBERED.pop(key, None)
    _REMEMBERED[key] = codec
    while len(_REMEMBERED) > MAX_REMEMBERED:
        _REMEMBERED.pop(next(iter(_REMEMBERED)))
    return key


def find_codec(info: dict) -> LatentCodec | None:
    """The codec of a run's data info (None for pixel-space data); refused when this process has not loaded it."""
    latent = (info or {}).get("latent")
    if not latent:
        return None
    codec = _REMEMBERED.get(latent.get("digest"))
    if codec is None:
        raise UnifuseError("this is a latent diffusion model, but its autoencoder is not loaded; load the run with "
                           "unifuse.training.load_model (it loads the autoencoder the checkpoint carries) or pass "
                           "codec=")
    return codec


def codec_from_meta(latent: dict, state: dict, where: str) -> LatentCodec:
    """Rebuild the codec a sidecar describes from its weights `state`; refuse one whose digest differs."""
    from .nets import AUTOENCODERS

    spec = latent.get("autoencoder") or {}
    if spec.get("family") not in AUTOENCODERS or not isinstance(spec.get("config"), dict):
        raise UnifuseError(f"{where} describes no autoencoder architecture; use a checkpoint written by unifuse train")
    codec = LatentCodec(AUTOENCODERS[spec["family"]](**spec["config"]), pad=int(latent.get("pad", 0)))
    try:
        codec.load_state_dict(state)
    except RuntimeError as err:
        raise UnifuseError(f"the autoencoder weights in {where} do not fit the autoencoder in its sidecar "
                           f"({str(err).splitlines()[0][:200]}); use the checkpoint as unifuse wrote it") from None
    check_digest(codec.digest(), latent.get("digest"), where)
    return codec


def check_digest(found: str, expected: str | None, where: str) -> None:
    """One message for a mismatched autoencoder (latents of one autoencoder decoded by another are garbage)."""
    if expected is not None and found != expected:
        raise UnifuseError(f"mismatched autoencoder: {where} was trained on the latents of autoencoder "
                           f"{str(expected)[:12]}, but the autoencoder given is {found[:12]}; use the autoencoder the "
                           "run was trained with (data.latent) or start a new run")


__all__ = ["LatentCodec", "check_digest", "codec_from_meta", "find_codec", "fit_scale", "remember"]

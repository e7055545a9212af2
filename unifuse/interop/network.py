"""diffusers networks as unifuse networks: `net(x, t, **cond)` in native time, and an AutoencoderKL as a latent codec.

`DiffusersNet` feeds a UNet2DModel / UNet2DConditionModel exactly what diffusers' own loop feeds it: x_t unscaled
and the timestep time_scale * t (the DDPM index itself for a beta table, N sigma for flow matching), fractional
timesteps allowed (the sinusoidal embedding is defined for any real t). The timestep is formed in float32, as
diffusers forms it, so a flow-match grid of float32 sigmas gives the very timesteps the scheduler gives.
Cross-attention conditioning arrives as `encoder_hidden_states` (or unifuse's `text` / `text_mask`), class labels as
`class_labels`. Weights are read from safetensors only (never a pickle).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .. import io
from ..errors import UnifuseError

UNETS = ("UNet2DModel", "UNet2DConditionModel")
INSTALL = "diffusers is not installed; install it with: pip install unifuse[diffusers]"


def require_diffusers():
    """The diffusers module, or one message naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise UnifuseError(INSTALL) from None
    return diffusers


def read_json(path: str, what: str) -> dict:
    """A JSON object of a diffusers folder (`unifuse.io.read_json`)."""
    return io.read_json(path, what, "use a diffusers folder written by save_pretrained")


class DiffusersNet(nn.Module):
    """A diffusers U-Net called as a unifuse network: net(x_t, t) = unet(x_t, time_scale * t).

    scale_input = False: the network takes x_t as diffusers feeds it (no EDM input scaling). scheduler: the scheduler
    config it came with (kept so that `to_diffusers` writes it back verbatim: float32 tables round-trip exactly)."""

    family = "diffusers"
    scale_input = False

    def __init__(self, unet: nn.Module, time_scale: float = 1.0, scheduler: dict | None = None):
        super().__init__()
        check_unet(unet)
        self.unet = unet
        self.integer_times = unet.config.get("time_embedding_type", "positional") == "learned"
        self.time_scale = float(time_scale)
        self.scheduler = json.loads(json.dumps(scheduler)) if scheduler else None

    @property
    def config(self) -> dict:
        """JSON-able description that `net_from_config` rebuilds (weights apart)."""
        unet = json.loads(json.dumps({k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}))
        return {"class": type(self.unet).__name__, "unet": unet, "time_scale": self.time_scale,
                "scheduler": self.scheduler}

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None, class_labels=None, text=None,
                text_mask=None, added_cond_kwargs=None):
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if self.integer_times and t.device.type == "cpu" and not bool((t == t.round()).all()):
            raise UnifuseError(f"this U-Net embeds integer timesteps only (time_embedding_type='learned'), got t = "
                               f"{t[0].item():g}; sample on an integer grid (spacing 'leading' or 'trailing', or "
                               "uf.interop.diffusers_grid)")
        if self.integer_times:  # an nn.Embedding of the timestep (checked above on the CPU; rounded on a GPU: no sync)
            t = t.round().long()
        if self.time_scale != 1.0:  # float32, as diffusers forms sigma * N
            t = t.float() * torch.tensor(self.time_scale, dtype=torch.float32)
        kw = {}
        if encoder_hidden_states is None and text is not None:
            encoder_hidden_states, encoder_attention_mask = text, text_mask
        if type(self.unet).__name__ == "UNet2DConditionModel":
            if encoder_hidden_states is None:
                raise UnifuseError("this diffusers UNet2DConditionModel needs cond={'encoder_hidden_states': tensor "
                                   "[batch, tokens, cross_attention_dim]}")
            kw = dict(encoder_hidden_states=encoder_hidden_states.to(x.dtype))
            if encoder_attention_mask is not None:
                kw["encoder_attention_mask"] = encoder_attention_mask
        elif encoder_hidden_states is not None:
            raise UnifuseError("this diffusers UNet2DModel takes no encoder_hidden_states (it has no cross-attention)")
        if class_labels is not None:
            kw["class_labels"] = class_labels
        if added_cond_kwargs is not None:  # SDXL-style additional embeddings (addition_embed_type)
            kw["added_cond_kwargs"] = added_cond_kwargs
        return self.unet(x, t, return_dict=False, **kw)[0]


def check_unet(unet: nn.Module) -> None:
    """Refuse U-Nets whose time input this wrapper cannot give: fourier embeddings (score-SDE models take sigma and
    divide their output by it) and LCM's guidance embedding (time_cond_proj_dim)."""
    name = type(unet).__name__
    if name not in UNETS:
        raise UnifuseError(f"unet must be one of {', '.join(UNETS)}, got {name}")
    if unet.config.get("time_embedding_type", "positional") == "fourier":
        raise UnifuseError(f"{name} with time_embedding_type='fourier' (a score-SDE model: it takes sigma and divides "
                           "its output by it) is not supported; supported: positional and learned embeddings")
    if unet.config.get("time_cond_proj_dim"):
        raise UnifuseError(f"{name} with time_cond_proj_dim={unet.config.get('time_cond_proj_dim')} (LCM's guidance "
                           "embedding) is not supported; use a U-Net without it")


def net_from_config(config: dict) -> DiffusersNet:
    """The `DiffusersNet` a checkpoint sidecar describes (random weights; the caller loads the state dict)."""
    diffusers = require_diffusers()
    if not isinstance(config, dict) or config.get("class") not in UNETS or not isinstance(config.get("unet"), dict):
        raise UnifuseError(f"a diffusers network config needs class in {', '.join(UNETS)} and a unet config, got "
                           f"{str(config)[:120]}")
    unet = getattr(diffusers, config["class"]).from_config(config["unet"])
    return DiffusersNet(unet, float(config.get("time_scale", 1.0)), config.get("scheduler"))


def load_unet(folder: str, dtype=None) -> nn.Module:
    """A UNet2DModel / UNet2DConditionModel from `folder` (config.json + safetensors weights), on the CPU."""
    diffusers = require_diffusers()
    name = read_json(os.path.join(folder, "config.json"), "unet config").get("_class_name", "UNet2DModel")
    if name not in UNETS:
        raise UnifuseError(f"{folder}: network class {name!r} is not supported; supported: {', '.join(UNETS)}")
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise UnifuseError(f"{folder} has no .safetensors weights (unifuse never loads pickled .bin files); convert them "
                           "once with diffusers: Model.from_pretrained(folder, local_files_only=True)"
                           ".save_pretrained(folder)")
    kw = {} if dtype is None else {"torch_dtype": dtype}
    return getattr(diffusers, name).from_pretrained(folder, local_files_only=True, use_safetensors=True, **kw)


class DiffusersAutoencoder(nn.Module):
    """An AutoencoderKL with the interface `unifuse.latent.LatentCodec` expects: encode(x) -> (mean, logvar),
    decode(z) -> x, latent_channels."""

    family = "diffusers-vae"

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def config(self) -> dict:
        return json.loads(json.dumps({k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}))

    def encode(self, x):
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar

    def decode(self, z):
        return self.vae.decode(z).sample


def load_codec(folder: str):
    """The `LatentCodec` of an AutoencoderKL folder: z = (E(x) - shift_factor) * scaling_factor, i.e. unifuse's
    shift = shift_factor and scale = 1 / scaling_factor."""
    diffusers = require_diffusers()
    from ..latent import LatentCodec

    name = read_json(os.path.join(folder, "config.json"), "vae config").get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UnifuseError(f"{folder}: autoencoder class {name!r} is not supported; supported: AutoencoderKL")
    vae = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    ae = DiffusersAutoencoder(vae)
    c = ae.latent_channels
    shift = float(vae.config.get("shift_factor") or 0.0)
    scale = 1.0 / float(vae.config.get("scaling_factor") or 1.0)
    return LatentCodec(ae, shift=[shift] * c, scale=[scale] * c)


__all__ = ["DiffusersNet", "DiffusersAutoencoder", "net_from_config", "load_unet", "load_codec", "require_diffusers"]

"""Network architectures. Every net is called as

    net(x, t, class_labels=None, text=None, text_mask=None) -> tensor shaped like x (2C channels with learned_variance)

where t [B] is the noise label `path.c_noise(t_native)` (roughly -1500..1100 across paths), class_labels a
LongTensor [B] with -1 the null class, text [B, L, d_text] caption tokens with text_mask [B, L] (True = real token)
or a pooled [B, d_text] embedding. Nets know nothing of paths or parameterizations; the one exception is the
noise-conditional classifier of classifier guidance (`classifier.py`, logits instead of a denoiser output), whose
input is made path-invariant with its own path.

The autoencoders of latent diffusion (`autoencoder.py`, family "ae") have their own dicts (AUTOENCODERS,
AE_PRESETS: they are called as encode(x) / decode(z), not as denoisers); `build_net("ae-mnist")` builds one and
`AUTOENCODERS[family](**config)` rebuilds one from what a checkpoint stores.

`build_net("unet-digits", num_classes=10)` builds a preset with overrides; `build_net("unet", **net.config)`
rebuilds any net from the `config` dict it carries (what checkpoints store, with `net.family`).
"""
from __future__ import annotations

from torch import nn

from ..errors import UnifuseError, choose
from .autoencoder import Autoencoder
from .classifier import NoisyClassifier
from .dit import DiT
from .mlp import MLP
from .unet import UNet

NETS = {"mlp": MLP, "unet": UNet, "dit": DiT}
AUTOENCODERS = {"ae": Autoencoder}

TEXT_DIM = 384  # width of the bundled caption encoder's token embeddings (all-MiniLM-L6-v2)

# name -> (family, keyword arguments). Sizes chosen for quality per CPU-minute (docs/benchmarks/nets.md).
NET_PRESETS = {
    "mlp-toy":     ("mlp",  dict(dim=2, width=256, depth=4, emb_dim=128)),
    "unet-digits": ("unet", dict(in_channels=1, resolution=8, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(4,), dropout=0.1)),
    "unet-mnist":  ("unet", dict(in_channels=1, resolution=32, patch=2, channels=32, channel_mult=(1, 2, 2),
                                 num_res_blocks=1, attn_resolutions=(8, 4), dropout=0.1)),
    "dit-digits":  ("dit",  dict(in_channels=1, resolution=8, patch=2, width=128, depth=6, heads=4)),
    "dit-mnist":   ("dit",  dict(in_channels=1, resolution=32, patch=4, width=128, depth=6, heads=4)),
}
for _name in list(NET_PRESETS):  # conditional variants: "<preset>-cond" (10 classes) and "<preset>-text" (captions)
    _family, _kw = NET_PRESETS[_name]
    NET_PRESETS[_name + "-cond"] = (_family, dict(_kw, num_classes=2 if _name == "mlp-toy" else 10))
    NET_PRESETS[_name + "-text"] = (_family, dict(_kw, text_dim=TEXT_DIM))
del _name, _family, _kw
# autoencoders (downsampling factor 4: 28x28x1 -> 7x7x4, 32x32x3 -> 8x8x4, 64x64x3 -> 16x16x4); "-plain": deterministic,
# no KL term
AE_PRESETS = {
    "ae-mnist":       ("ae", dict(in_channels=1, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                                  latent_channels=4, variational=True)),
    "ae-mnist-plain": ("ae", dict(in_channels=1, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                                  latent_channels=4, variational=False)),
    "ae-rgb32":       ("ae", dict(in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                  latent_channels=4, variational=True)),
    "ae-rgb64":       ("ae", dict(in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                  latent_channels=4, variational=True)),   # 64x64x3 -> 16x16x4 (docs/latent.md)
}


def build_net(name: str, **overrides) -> nn.Module:
    """A network from a family name ("unet") or a preset name ("unet-digits", "ae-mnist"), with keyword overrides."""
    presets, families = {**NET_PRESETS, **AE_PRESETS}, {**NETS, **AUTOENCODERS}
    if name in presets:
        family, kwargs = presets[name]
        kwargs = dict(kwargs, **overrides)
    else:
        family, kwargs = choose("network", name, sorted(families) + sorted(presets)), overrides
    try:
        return families[family](**kwargs)
    except TypeError as e:  # an unknown keyword: say which ones exist
        import inspect
        valid = [p for p in inspect.signature(families[family]).parameters]
        raise UnifuseError(f"bad arguments for network {name!r} ({e}); valid keywords: {', '.join(valid)}") from None


def num_params(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


__all__ = ["AE_PRESETS", "AUTOENCODERS", "NETS", "NET_PRESETS", "TEXT_DIM", "MLP", "UNet", "DiT", "Autoencoder",
           "NoisyClassifier", "build_net", "num_params"]

"""Latent diffusion's presets (unifuse.config re-exports them): the autoencoders and the diffusion models on their
latents, for MNIST and for a folder of the user's RGB images. Pure data, as unifuse.config."""
from __future__ import annotations

from dataclasses import replace

from .config_sections import Config, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, SampleConfig, TrainConfig

AE_FAMILY, AE_OBJECTIVE = "ae", "autoencoder"   # an autoencoder run (latent diffusion's first stage)
# mnist-latent's autoencoder share of --minutes (data.latent_share; 0.3 elsewhere): mnist-ae reconstructs at 0.47x the
# real floor after 3 CPU-minutes as after 6 (docs/latent.md), so 15% of 20 minutes leaves the diffusion model 17.
MNIST_AE_SHARE = 0.15
FOLDER_UNSET = "folder:<DIR>"   # the folder presets' data.name: the user gives the folder (--set data.name=folder:DIR)
FOLDER_AUTOENCODERS = {32: ("ae-rgb32", "8x8x4", 64), 64: ("ae-rgb64", "16x16x4", 32)}  # size: net, latent, batch


def latent_presets(mnist: Config, mnist_cond: Config, mnist_text: Config) -> dict:
    """mnist-ae (the LDM KL-autoencoder, f=4: 28x28 -> 7x7x4, KL weight 1e-6), mnist-ae-plain (deterministic, no KL),
    and mnist-latent / -cond / -text: the mnist models on those latents, training mnist-ae first in
    MNIST_AE_SHARE of the budget, with the digits recipe (an MLP on the flattened 196 numbers, batch 512, beta2
    0.99, lr decay after 150 steps; sigma_data 1 for unit-variance latents and EDM's noise levels shifted by ln 2 to
    match). At 5 CPU-minutes it reached 15x the floor where a DiT with 1x1 patches reached 108x (docs/latent.md).
    digits has no autoencoder preset: 8x8 at f=2 gives 4x4x4, as many numbers as the pixels.

    folder-ae-32 / -64 and folder-latent-32 / -64: the same recipe on the user's folder of images (data.name
    FOLDER_UNSET until --set data.name=folder:DIR; centre-cropped and resized to 32 or 64 pixels, RGB unless every
    file is grayscale), f=4 at both sizes: 32x32x3 -> 8x8x4 (ae-rgb32), 64x64x3 -> 16x16x4 (ae-rgb64)."""
    ae = Config(name="mnist-ae", description="KL autoencoder (LDM recipe, f=4: 28x28 -> 7x7x4) on mnist",
                data=DataConfig(name="mnist", batch=64), model=ModelConfig(family=AE_FAMILY, net="ae-mnist"),
                objective=ObjectiveConfig(name=AE_OBJECTIVE, options={"kl": 1e-6, "l1": 1.0}),
                optim=OptimConfig(lr=1e-3, warmup_steps=50, ema_halflife=2000.0),
                train=TrainConfig(steps=2000, ckpt_every=500, log_every=25, sample_every=0), sample=SampleConfig(grid=32))
    plain = replace(ae, name="mnist-ae-plain", description="plain (deterministic) autoencoder, f=4, on mnist",
                    model=replace(ae.model, net="ae-mnist-plain"), objective=replace(ae.objective, options={"kl": 0.0}))
    out = {"mnist-ae": ae, "mnist-ae-plain": plain,
           "mnist-latent": _latent(mnist, "mnist-latent", "mnist-ae", "7x7x4", MNIST_AE_SHARE),
           "mnist-latent-cond": _latent(mnist_cond, "mnist-latent-cond", "mnist-ae", "7x7x4", MNIST_AE_SHARE),
           "mnist-latent-text": _latent(mnist_text, "mnist-latent-text", "mnist-ae", "7x7x4", MNIST_AE_SHARE)}
    for size, (net, shape, batch) in FOLDER_AUTOENCODERS.items():
        pixels = DataConfig(name=FOLDER_UNSET, size=size, batch=batch)
        out[f"folder-ae-{size}"] = replace(
            ae, name=f"folder-ae-{size}", data=pixels, model=replace(ae.model, net=net),
            description=f"KL autoencoder (f=4: {size}x{size}x3 -> {shape}) on --set data.name=folder:DIR")
        lat = _latent(mnist, f"folder-latent-{size}", f"folder-ae-{size}", shape)
        out[lat.name] = replace(lat, data=replace(lat.data, name=FOLDER_UNSET, size=size),
                                description=f"{lat.model.family} on the {shape} latents of folder-ae-{size} (trained "
                                            f"first) of --set data.name=folder:DIR at {size} px")
    return out


def _latent(base: Config, name: str, autoencoder: str, shape: str, share: float = 0.3) -> Config:
    """`base` on the latents of the autoencoder preset `autoencoder` (trained first in `share` of the minutes): the
    digits recipe."""
    cond = "" if base.data.cond == "none" else f", {base.data.cond}-conditional"
    return replace(base, name=name, description=f"{base.model.family} on the {shape} latents of {autoencoder} "
                                                f"(trained first){cond}",
                   data=replace(base.data, latent=f"train:{autoencoder}", latent_share=share, batch=512),
                   model=replace(base.model, net="mlp-toy", net_options={"width": 1024}, sigma_data=1.0),
                   objective=replace(base.objective, options={"mean": -0.5, "std": 1.2}),
                   optim=replace(base.optim, lr=2e-3, betas=(0.9, 0.99), warmup_steps=100, decay_after=150),
                   sample=replace(base.sample, clip_denoised=0.0))

"""Randomly initialised TINY diffusers models saved to a folder, and diffusers' own sampling loops in float64."""
import torch

SIZE, C = 8, 1
UNET = dict(sample_size=SIZE, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, attention_head_dim=8)


def randomize(module, scale=0.1, seed=0):
    """Random weights everywhere (diffusers zero-initialises nothing here, but a fresh net is too close to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def unet2d(out_channels=C, class_embeds=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return randomize(UNet2DModel(in_channels=C, out_channels=out_channels, num_class_embeds=class_embeds,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **UNET))


def unet_cross(context_dim=8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return randomize(UNet2DConditionModel(in_channels=C, out_channels=C, cross_attention_dim=context_dim,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **UNET))


def save(folder, unet, scheduler, pipeline=True):
    """A pipeline folder (model_index.json) or a bare unet/ + scheduler/ pair."""
    import json

    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    if pipeline:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", "unet": [
            "diffusers", type(unet).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}))
    return folder


def float64_tables(scheduler):
    """The scheduler's float32 tables in float64 (same values), so its loop does float64 arithmetic like ours."""
    for name in ("alphas_cumprod", "final_alpha_cumprod", "one", "sigmas"):
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor):
            setattr(scheduler, name, value.double())
    return scheduler


@torch.no_grad()
def diffusers_loop(unet, scheduler, noise, steps, generator=None, **cond):
    """diffusers' own loop: set_timesteps, then unet + step at each timestep, from `noise` (float64)."""
    scheduler.set_timesteps(steps)
    float64_tables(scheduler)
    x = noise.clone()
    for t in scheduler.timesteps:
        out = unet(x, t, return_dict=False, **cond)[0]
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0] if generator is not None \
            else scheduler.step(out, t, x, return_dict=False)[0]
    return x

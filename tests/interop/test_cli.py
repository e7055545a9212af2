"""A diffusers folder wherever a run is taken: unifuse sample / eval / distill / finetune --ckpt/--teacher/--base."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import unifuse as uf
from unifuse import interop
from unifuse.cli import main
from unifuse.data import to_uint8

from .tiny import SIZE, C, save, unet2d


def test_sample_command_reads_the_scheduler_settings(tmp_path):
    """`unifuse sample --ckpt FOLDER` samples what the API gives with the scheduler's own settings: its trailing
    spacing and its clip_sample (the threshold transform), from the per-sample seeded noise."""
    from diffusers import DDIMScheduler

    folder = save(tmp_path / "pipe", unet2d(), DDIMScheduler(clip_sample=True, timestep_spacing="trailing"))
    assert main(["sample", "--ckpt", str(folder), "--out", str(tmp_path / "s"), "--n", "3", "--nfe", "4",
                 "--sampler", "ddim", "--device", "cpu"]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        cli = f["images"].astype(int)
    gens = uf.samplers.generators(0, 0, 3)
    noise = uf.samplers.randn((3, C, SIZE, SIZE), generator=gens)
    api = uf.sample(interop.from_diffusers(folder), noise, "ddim", nfe=4, spacing="trailing", generator=gens)
    assert np.abs(cli - to_uint8(api, 0).astype(int)).max() <= 1  # the same images (to 8-bit rounding)
    assert api.abs().max() > 0.5 and len(np.unique(cli)) > 10


def test_eval_uses_the_data_named_by_to_diffusers(tmp_path):
    """to_diffusers(..., data={"name": "digits"}) writes unifuse.json; eval then measures against digits."""
    from diffusers import DDPMScheduler

    model = interop.from_diffusers(save(tmp_path / "a", unet2d(), DDPMScheduler(clip_sample=False)))
    folder = interop.to_diffusers(model, tmp_path / "b", data={"name": "digits"})
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", folder, "--n", "8", "--nfe", "2", "--sampler", "ddim", "--out", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == "digits" and report["n"] == 8 and report["nfe"] == 2


@pytest.mark.slow
def test_distill_and_finetune_take_a_diffusers_folder(tmp_path):
    """A student distilled from a diffusers teacher, and a fine-tuned copy, are diffusers U-Nets again (the sidecar
    rebuilds DiffusersNet), sampled by `unifuse sample` and exported by to_diffusers."""
    from diffusers import DDIMScheduler

    teacher = save(tmp_path / "t", unet2d(), DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))
    common = ["--steps", "2", "--device", "cpu", "--set", "data.name=digits", "--no-progress"]
    assert main(["distill", "progressive", "--teacher", str(teacher), "--out", str(tmp_path / "d"), *common]) == 0
    assert main(["finetune", "ddpo", "--base", str(teacher), "--reward", "brightness", "--out", str(tmp_path / "f"),
                 *common, "--set", "finetune.batch=4", "--set", "finetune.steps=4", "--set", "finetune.eval_n=8"]) == 0
    model, _ = uf.load(str(tmp_path / "f"))
    assert isinstance(model.net, interop.DiffusersNet)
    back = interop.from_diffusers(interop.to_diffusers(model, tmp_path / "e"))
    x = torch.randn(2, C, SIZE, SIZE)
    torch.testing.assert_close(back.denoise(x, 500.0), model.denoise(x, 500.0), rtol=1e-6, atol=1e-6)


def test_latent_pipeline_samples_decode_with_its_vae(tmp_path):
    """A pipeline with vae/: `unifuse sample` writes decoded images of the pixel shape (8x8x1 latents -> 16x16x3),
    the vae's decoding of the API's latent samples."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from .tiny import randomize

    folder = save(tmp_path / "ldm", unet2d(), DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))
    randomize(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=C, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, layers_per_block=1)).save_pretrained(folder / "vae")
    assert main(["sample", "--ckpt", str(folder), "--out", str(tmp_path / "s"), "--n", "2", "--nfe", "3",
                 "--sampler", "ddim", "--device", "cpu"]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        cli = f["images"].astype(int)
    gens = uf.samplers.generators(0, 0, 2)
    z = uf.sample(interop.from_diffusers(folder), uf.samplers.randn((2, C, SIZE, SIZE), generator=gens), "ddim",
                  nfe=3, spacing="trailing", generator=gens)
    with torch.no_grad():
        images = interop.codec(folder).decode(z)
    assert cli.shape == (2, 16, 16, 3)
    assert np.abs(cli - to_uint8(images, 0).astype(int)).max() <= 1

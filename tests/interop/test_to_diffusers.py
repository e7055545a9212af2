"""to_diffusers round trips, the refusals (each message names the value and the fix), and the latent codec."""
import json
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import unifuse as uf
from unifuse import interop
from unifuse.interop.scheduler import read_scheduler

from .tiny import SIZE, C, randomize, save, unet2d

F64 = torch.float64


def pair_at(model, times, seed=2):
    x = torch.randn(len(times), C, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.pair(x, torch.tensor(times, dtype=F64))


@pytest.mark.parametrize("kind", ["ddim-v", "ddpm-learned", "flow"])
def test_round_trip_reproduces_the_denoiser(tmp_path, kind):
    """from_diffusers(to_diffusers(model)) gives the same (x0_hat, eps_hat) to 1e-6 at fractional and end times, on
    the same table (abar equal) with the same kind."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    unet, sch, times = {
        "ddim-v": (unet2d(), DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           beta_schedule="scaled_linear", clip_sample=False), [999.0, 500.25, 3.5]),
        "ddpm-learned": (unet2d(out_channels=2 * C), DDPMScheduler(variance_type="learned_range", clip_sample=False),
                         [998.0, 10.75, 0.0]),
        "flow": (unet2d(), FlowMatchEulerDiscreteScheduler(shift=3.0), [1.0, 0.4321, 0.001]),
    }[kind]
    from diffusers import DDPMPipeline

    model = interop.from_diffusers(save(tmp_path / "a", unet, sch))
    back = interop.from_diffusers(interop.to_diffusers(model, tmp_path / "b"))
    pipe = DDPMPipeline.from_pretrained(tmp_path / "b", local_files_only=True)  # diffusers itself loads the export
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert type(pipe.scheduler) is type(sch) and public(pipe.scheduler.config) == public(sch.config)
    assert (back.prediction, back.learned_variance) == (model.prediction, model.learned_variance)
    t = torch.linspace(model.path.t_min, model.path.t_max, 101, dtype=F64)
    torch.testing.assert_close(back.path.alpha(t), model.path.alpha(t), rtol=1e-12, atol=1e-14)
    for a, b in zip(pair_at(model, times), pair_at(back, times)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    if kind == "ddpm-learned":
        x = torch.randn(1, C, SIZE, SIZE)
        torch.testing.assert_close(back.evaluate(x, 10.0).var_frac, model.evaluate(x, 10.0).var_frac)


@pytest.mark.parametrize("name,kind", [("ddpm-linear", "eps"), ("ddpm-cosine", "x0"), ("rf", "velocity"),
                                       ("edm", "edm")])
def test_scheduler_only_export_of_unifuse_paths(tmp_path, name, kind):
    """unet=False writes the scheduler of a unifuse model: a DDPM table comes back as the same table (trained_betas,
    which diffusers reads in float32: alpha to 1e-6) and kind; rectified flow as FlowMatchEuler, exactly; EDM as
    EDMEulerScheduler with its sigma range."""
    path = uf.paths.get(name)
    model = uf.DiffusionModel(lambda x, t: x, path, kind)
    folder = interop.to_diffusers(model, tmp_path / "s", unet=False)
    config = json.loads((tmp_path / "s" / "scheduler" / "scheduler_config.json").read_text())
    if name == "edm":
        assert config["_class_name"] == "EDMEulerScheduler"
        assert (config["sigma_min"], config["sigma_max"]) == (path.sigma_min, path.sigma_max)
        return
    spec = interop.scheduler_spec(folder)
    assert spec.prediction == kind
    t = torch.linspace(path.t_min, path.t_max, 57, dtype=F64)
    torch.testing.assert_close(spec.path.alpha(t), path.alpha(t), rtol=0, atol=1e-6 if name != "rf" else 1e-15)


def test_refusals_name_the_value_and_the_fix(tmp_path, monkeypatch):
    base = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0"}
    with pytest.raises(uf.UnifuseError, match="unsupported key.*frobnicate.*remove them"):
        read_scheduler(dict(base, frobnicate=3))
    with pytest.raises(uf.UnifuseError, match="use_dynamic_shifting=True"):
        read_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(uf.UnifuseError, match="variance_type='learned'.*learned_range"):
        read_scheduler(dict(base, _class_name="DDPMScheduler", variance_type="learned"))
    with pytest.raises(uf.UnifuseError, match="ScoreSdeVeScheduler.*supported: DDPMScheduler"):
        read_scheduler({"_class_name": "ScoreSdeVeScheduler"})
    with pytest.raises(uf.UnifuseError, match="prediction_type='flow'"):
        read_scheduler(dict(base, prediction_type="flow"))
    with pytest.raises(uf.UnifuseError, match="linspace.*not to its next timestep"):
        from diffusers import DDIMScheduler

        interop.diffusers_grid(read_scheduler(dict(DDIMScheduler(timestep_spacing="linspace").config, **base)), 7)
    native = uf.DiffusionModel(uf.nets.build_net("unet-digits"), uf.paths.get("ddpm-linear"), "eps")
    with pytest.raises(uf.UnifuseError, match="does not map onto a diffusers U-Net.*unet=False"):
        interop.to_diffusers(native, tmp_path / "n")
    assert not (tmp_path / "n").exists()  # nothing half-written
    with pytest.raises(uf.UnifuseError, match="no scheduler for path VE.*'eps'"):
        interop.to_diffusers(uf.DiffusionModel(lambda x, t: x, uf.paths.get("ve"), "eps"), tmp_path / "v", unet=False)
    with pytest.raises(uf.UnifuseError, match="not a diffusers folder"):
        interop.from_diffusers(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(uf.UnifuseError, match=r"pip install unifuse\[diffusers\]"):
        interop.from_diffusers(tmp_path)


def test_learned_variance_channels_must_match(tmp_path):
    from diffusers import DDPMScheduler

    folder = save(tmp_path / "bad", unet2d(out_channels=2 * C), DDPMScheduler())
    with pytest.raises(uf.UnifuseError, match="returns 2 channels for 1 input.*learned_range"):
        interop.from_diffusers(folder)


def test_vae_becomes_the_latent_codec(tmp_path):
    """vae/ (AutoencoderKL): decode(z) = vae.decode(z / scaling_factor + shift_factor), as diffusers' pipelines
    decode, and encode is its inverse normalisation of the posterior mean."""
    from diffusers import AutoencoderKL, DDIMScheduler

    torch.manual_seed(0)
    vae = randomize(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=8, layers_per_block=1, scaling_factor=0.37, shift_factor=0.1))
    folder = save(tmp_path / "ldm", unet2d(), DDIMScheduler())
    vae.save_pretrained(folder / "vae")
    codec = interop.codec(folder)
    z = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(z), vae.decode(z / 0.37 + 0.1).sample, rtol=1e-5, atol=1e-5)
        images = torch.rand(2, 3, 8, 8) * 2 - 1
        expected = (vae.encode(images).latent_dist.mean - 0.1) * 0.37
        torch.testing.assert_close(codec.encode(images), expected, rtol=1e-5, atol=1e-6)


def test_time_embeddings_the_wrapper_cannot_feed_are_refused():
    """A fourier-embedded (score-SDE) U-Net is refused; a learned (integer) embedding refuses fractional times."""
    from diffusers import UNet2DModel

    from .tiny import UNET

    UNET = dict(UNET, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(uf.UnifuseError, match="time_embedding_type='fourier'"):
        interop.DiffusersNet(UNet2DModel(in_channels=C, out_channels=C, time_embedding_type="fourier", **UNET))
    net = interop.DiffusersNet(UNet2DModel(in_channels=C, out_channels=C, time_embedding_type="learned",
                                           num_train_timesteps=1000, **UNET))
    x = torch.randn(2, C, SIZE, SIZE)
    assert net(x, torch.tensor(10.0)).shape == x.shape
    with pytest.raises(uf.UnifuseError, match="integer timesteps only.*10.5"):
        net(x, torch.tensor(10.5))

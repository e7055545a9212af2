"""Latent diffusion: the autoencoder run on a folder of images, the latent scale fitted on the whole set, a latent
model through the samplers and on another path, a checkpoint that carries its autoencoder (and refuses another),
and `unifuse train mnist-latent` end to end through the CLI."""
import json
import os

import numpy as np
import pytest
import torch

import unifuse.paths as P
from unifuse.config import SampleConfig, get_config
from unifuse.errors import UnifuseError
from unifuse.latent import LatentCodec, find_codec, fit_scale, remember
from unifuse.nets import build_net
from unifuse.testing.oracle import LearnableGaussian
from unifuse.training import load_model, read_meta, train
from unifuse.training.checkpoint import find_checkpoint, load_codec
from unifuse.training.sampling import generate

F64 = torch.float64


def write_shapes(folder, n: int = 48, side: int = 16) -> None:
    """n PNGs: a bright rectangle of random size and place on a dark background."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        im = np.full((side, side), 20, np.uint8)
        w, h = rng.integers(4, 10, size=2)
        x, y = rng.integers(0, side - w), rng.integers(0, side - h)
        im[y:y + h, x:x + w] = 230
        Image.fromarray(im).save(os.path.join(folder, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """An autoencoder trained 60 steps on 48 16x16 images (f=4: 4x4x4 latents)."""
    root = tmp_path_factory.mktemp("latent")
    write_shapes(root / "images")
    cfg = get_config("mnist-ae", [f"data.name=folder:{root / 'images'}", "data.size=16", "data.heldout=8",
                                  "data.batch=16", "model.net_options.channels=8", "train.steps=60", "optim.lr=3e-3",
                                  "optim.warmup_steps=5", "optim.ema_halflife=0", "train.device=cpu",
                                  "train.log_every=10", "sample.grid=8"])
    summary = train(cfg, str(root / "ae"), progress=False, log=lambda *a: None)
    return str(root / "ae"), cfg, summary


def test_autoencoder_run_reconstructs_its_folder_better_than_the_mean_image(ae_run):
    from unifuse.training.build import build_data

    out, cfg, summary = ae_run
    assert summary["step"] == 60
    for name in ("metrics.jsonl", "samples/final.png", "loss.png", "config.yaml"):
        assert os.path.exists(os.path.join(out, name)), name
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"l1", "kl", "loss"} <= set(records[0]) and records[-1]["event"] == "end"
    codec, fitted = load_codec(out)
    assert not fitted and codec.pad == 0
    x = build_data(cfg).images
    with torch.no_grad():
        recon = codec.decode(codec.encode(x))
    mean_image = x.mean(0, keepdim=True)
    err, baseline = float((recon - x).square().mean()), float((mean_image - x).square().mean())
    assert err < 0.5 * baseline, (err, baseline)


def test_fitted_scale_gives_unit_variance_latents_per_channel_over_the_whole_set(ae_run):
    from unifuse.training.build import build_data

    out, cfg, _ = ae_run
    x = build_data(cfg).images
    codec = fit_scale(load_codec(out)[0], x, chunk=7)  # chunks of 7: the statistics are of all 40 images
    z = codec.encode(x, chunk=5).double()
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4, dtype=F64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), correction=0), torch.ones(4, dtype=F64), atol=1e-5, rtol=0)
    one_batch = fit_scale(load_codec(out)[0], x[:8])  # LDM's first-batch estimate differs from the whole set's
    assert not torch.allclose(one_batch.scale, codec.scale, rtol=1e-3)
    raw = codec.raw_encode(x).double()
    torch.testing.assert_close(codec.shift.double(), raw.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)


def latent_setup(seed: int = 0):
    """(codec of an untrained f=4 autoencoder for 28x28 padded to 32, its data info, a Gaussian oracle in latents)."""
    torch.manual_seed(seed)
    ae = build_net("ae-mnist", channels=8)
    with torch.no_grad():
        torch.nn.init.normal_(ae.decoder[-1].weight, std=0.05)
    codec = LatentCodec(ae, shift=torch.tensor([0.1, -0.2, 0.0, 0.3]), scale=torch.tensor([1.0, 2.0, 0.5, 1.5]), pad=2)
    info = {"name": "mnist", "shape": [4, 7, 7], "num_classes": 0, "pad": 2,
            "latent": dict(codec.meta(), shape=[1, 32, 32])}
    mean, std = torch.full((4, 1, 1), 0.4, dtype=F64), torch.tensor([0.5, 1.0, 0.8, 1.2], dtype=F64)[:, None, None]
    return codec, info, LearnableGaussian(P.get("edm"), mean, std).model(), (mean, std)


@pytest.mark.parametrize("sampler, nfe", [("heun", 59), ("dpmpp_2m", 20), ("ddim", 100), ("euler_maruyama", 80)])
def test_a_latent_model_samples_through_the_samplers_and_on_another_path(sampler, nfe):
    codec, info, model, (mean, std) = latent_setup()
    cfg = SampleConfig(sampler=sampler, nfe=nfe)
    for m in (model, model.on(P.get("rf"))):  # the same model seen on rectified flow's path
        z, _ = generate(m, cfg, info, 400, conditioning="none", decode=False, dtype=F64)
        assert z.shape == (400, 4, 7, 7)
        torch.testing.assert_close(z.double().mean((0, 2, 3)), mean.flatten(), atol=0.04, rtol=0)
        torch.testing.assert_close(z.double().std((0, 2, 3)), std.flatten(), atol=0.04, rtol=0.03)
    x, _ = generate(model, cfg, info, 6, conditioning="none", codec=codec)
    z, _ = generate(model, cfg, info, 6, conditioning="none", decode=False)
    assert x.shape == (6, 1, 32, 32) and bool((x[..., :2, :] == -1).all())  # decoded, padded back with -1
    torch.testing.assert_close(x, codec.decode(z), rtol=1e-5, atol=1e-5)


def test_the_data_info_names_the_codec_by_digest():
    codec, info, model, _ = latent_setup(seed=1)
    with pytest.raises(UnifuseError, match="autoencoder is not loaded"):
        generate(model, SampleConfig(nfe=3), info, 2, conditioning="none")
    assert remember(codec) == info["latent"]["digest"] and find_codec(info) is codec
    assert generate(model, SampleConfig(nfe=3), info, 2, conditioning="none")[0].shape == (2, 1, 32, 32)
    assert find_codec({"shape": [1, 8, 8]}) is None
    with torch.no_grad():
        codec.scale[0] = 3.0  # another scale is another codec
    assert codec.digest() != info["latent"]["digest"]


def cli(argv, capsys):
    from unifuse.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TINY = ["--set", "data.latent_options.train.steps=3", "--set", "data.latent_options.model.net_options.channels=8",
        "--set", "data.latent_options.data.batch=16", "--set", "model.net_options.width=32", "--set",
        "model.net_options.depth=1", "--set", "data.batch=16", "--set", "sample.grid=4", "--set", "sample.nfe=2",
        "--set", "train.device=cpu", "--no-progress"]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """`unifuse train mnist-latent` (the autoencoder stage and the diffusion stage), 2 steps."""
    from unifuse.cli import main

    out = str(tmp_path_factory.mktemp("cli") / "run")
    assert main(["train", "mnist-latent", "--out", out, "--steps", "2"] + TINY) == 0
    return out


def test_train_mnist_latent_trains_the_autoencoder_then_the_model_on_its_latents(latent_run, tmp_path, capsys):
    folder = find_checkpoint(latent_run)
    meta = read_meta(folder)
    assert os.path.isfile(os.path.join(folder, "autoencoder.safetensors"))
    assert meta["config"]["data"]["latent"] == os.path.join(latent_run, "autoencoder")
    assert meta["data"]["shape"] == [4, 7, 7] and meta["data"]["latent"]["shape"] == [1, 32, 32]
    assert read_meta(find_checkpoint(os.path.join(latent_run, "autoencoder")))["step"] == 3
    code, _, err = cli(["sample", "--ckpt", latent_run, "--out", str(tmp_path / "s"), "--n", "4", "--nfe", "2"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (4, 28, 28, 1)  # decoded, padding removed
    code, out, err = cli(["eval", "--ckpt", latent_run, "--n", "8", "--nfe", "2", "--out", str(tmp_path / "e.json")],
                         capsys)
    assert code == 0, err
    report = json.loads(out)
    ae = report["autoencoder"]
    assert report["fd"] > 0 and ae["fd_heldout"] > 0 and ae["n"] == 8 and 0 <= ae["recognised"] <= 1
    assert ae["fd_ratio"] == pytest.approx(ae["fd_heldout"] / ae["fd_floor"])
    assert ae["psnr"] == pytest.approx(10 * np.log10(4 / ae["mse"]))


def test_a_checkpoint_carries_its_autoencoder_and_refuses_another(latent_run, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from unifuse.training.checkpoint import _sha256

    model, cfg = load_model(latent_run)
    info = read_meta(find_checkpoint(latent_run))["data"]
    shutil.rmtree(os.path.join(latent_run, "autoencoder"), ignore_errors=False)  # decoding needs only the checkpoint
    x, _ = generate(model, cfg.sample, info, 3, conditioning="none")
    assert x.shape == (3, 1, 32, 32)
    # another autoencoder's weights in a consistent folder (file hash updated): refused by the codec digest
    copy = str(tmp_path / "copy")
    shutil.copytree(find_checkpoint(latent_run), copy)
    other = LatentCodec(build_net("ae-mnist", channels=8), pad=2)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, os.path.join(copy, "autoencoder.safetensors"))
    meta = json.load(open(os.path.join(copy, "checkpoint.json")))
    meta["files"]["autoencoder"] = _sha256(os.path.join(copy, "autoencoder.safetensors"))
    json.dump(meta, open(os.path.join(copy, "checkpoint.json"), "w"))
    with pytest.raises(UnifuseError, match="mismatched autoencoder") as err:
        load_model(copy)
    assert len(str(err.value).splitlines()) == 1


def test_resuming_on_another_autoencoder_is_refused(latent_run, tmp_path):
    from dataclasses import replace

    from unifuse.config import from_dict

    ae_cfg = get_config("mnist-ae", ["model.net_options.channels=4", "train.steps=1", "data.batch=8",
                                     "train.device=cpu"])
    other = str(tmp_path / "other-ae")
    train(ae_cfg, other, progress=False, log=lambda *a: None)
    stored = from_dict(read_meta(find_checkpoint(latent_run))["config"])
    moved = replace(stored, data=replace(stored.data, latent=other), train=replace(stored.train, steps=3))
    with pytest.raises(UnifuseError, match="mismatched autoencoder"):
        train(moved, latent_run, resume=latent_run, progress=False, log=lambda *a: None)


def test_latent_presets_keep_unit_variance_settings_and_refuse_clipping():
    for name in ("mnist-latent", "mnist-latent-cond", "mnist-latent-text"):
        cfg = get_config(name)
        assert cfg.data.latent == "train:mnist-ae" and cfg.model.sigma_data == 1.0 and cfg.sample.clip_denoised == 0
    assert get_config("mnist-latent-cond").data.cond == "class" and get_config("mnist-latent-text").data.cond == "text"
    for family in ("ddpm", "trigflow", "rf"):  # another family keeps sigma_data 1 and no clipping to [-1, 1]
        cfg = get_config("mnist-latent", [f"model.family={family}"])
        assert cfg.model.sigma_data == 1.0 and cfg.sample.clip_denoised == 0
    assert get_config("mnist-latent", ["model.family=trigflow"]).model.path_options == {"sigma_d": 1.0}
    with pytest.raises(UnifuseError, match="set sample.clip_denoised=0"):
        get_config("mnist-ddpm", ["data.latent=runs/ae"])
    with pytest.raises(UnifuseError, match="go together"):
        get_config("mnist-ae", ["objective.name=edm"])
    with pytest.raises(UnifuseError, match="data.latent_options"):
        get_config("mnist-latent", ["data.latent=runs/ae", "data.latent_options.train.steps=3"])
    with pytest.raises(UnifuseError, match="trains on pixels"):
        get_config("mnist-ae", ["data.latent=runs/other"])


def test_a_latent_run_fine_tunes_on_rewards_of_its_decoded_images(latent_run, tmp_path):
    """A reward of a latent run takes latents and scores their decoded images (differentiably), so every
    fine-tuning method works on it unchanged; the fine-tuned checkpoint carries the autoencoder too."""
    from unifuse.finetune.loop import finetune, finetune_config
    from unifuse.finetune.rewards import get_reward
    from unifuse.latent import find_codec

    load_model(latent_run)  # loading a run registers its codec
    info = read_meta(find_checkpoint(latent_run))["data"]
    z = torch.randn(3, 4, 7, 7, requires_grad=True)
    reward, pixel = get_reward("brightness", info), get_reward("brightness", dict(info, shape=[1, 32, 32], latent=None))
    value = reward(z)
    torch.testing.assert_close(value, pixel(find_codec(info).decode(z)))
    assert torch.autograd.grad(value.sum(), z)[0].abs().sum() > 0
    fast = ["finetune.batch=4", "finetune.steps=2", "finetune.eval_n=8", "finetune.eval_every=0", "train.sample_every=0"]
    out = str(tmp_path / "ft")
    summary = finetune(finetune_config(latent_run, "draft", reward="brightness", overrides=fast, steps=2), out,
                       progress=False)
    assert summary["step"] == 2 and summary["reward"] is not None and summary["fd"] > 0
    assert os.path.isfile(os.path.join(find_checkpoint(out), "autoencoder.safetensors"))


# --- RGB folders: folder-latent-32 / -64 ----------------------------------------------------------------

def write_blobs(folder, n: int = 48, width: int = 40, height: int = 36) -> None:
    """n RGB PNGs (width x height, not square: the loader centre-crops and resizes): two soft Gaussian blobs of
    random colour, place and size on a dark background."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        im = np.full((height, width, 3), 25.0)
        for _ in range(2):
            cx, cy, r = rng.uniform(8, width - 8), rng.uniform(8, height - 8), rng.uniform(3, 8)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            im += blob * rng.uniform(60, 230, size=3)
        Image.fromarray(im.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))


FOLDER_TINY = ["--set", "data.latent_options.train.steps=4", "--set", "data.latent_options.model.net_options.channels=8",
               "--set", "data.latent_options.data.batch=16", "--set", "data.batch=16", "--set", "data.heldout=8",
               "--set", "model.net_options.width=32", "--set", "model.net_options.depth=1", "--set", "sample.grid=4",
               "--set", "sample.nfe=2", "--set", "train.device=cpu", "--no-progress"]


def test_folder_latent_32_trains_samples_and_evaluates_an_rgb_folder(tmp_path, monkeypatch, capsys):
    """`unifuse train folder-latent-32 --set data.name=folder:DIR`: the loader's 32x32 RGB crops, an 8x8x4 latent
    whose shift and scale are the per-channel mean and std of the raw latents of all 40 training images, decoded
    32x32x3 samples, and eval's folder metrics with the autoencoder's reconstruction PSNR = 10 log10(4 / mse)."""
    from unifuse.training.build import build_data
    from unifuse.training.checkpoint import load_codec

    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    write_blobs(tmp_path / "blobs")
    run = str(tmp_path / "run")
    code, _, err = cli(["train", "folder-latent-32", "--out", run, "--steps", "2", "--set",
                        f"data.name=folder:{tmp_path / 'blobs'}"] + FOLDER_TINY, capsys)
    assert code == 0, err
    meta = read_meta(find_checkpoint(run))
    assert meta["data"]["shape"] == [4, 8, 8] and meta["data"]["latent"]["shape"] == [3, 32, 32]
    ae_cfg = get_config(os.path.join(run, "autoencoder", "config.yaml"))
    assert (ae_cfg.name, ae_cfg.model.net, ae_cfg.data.size, ae_cfg.data.heldout) == ("folder-ae-32", "ae-rgb32", 32, 8)
    pixels = build_data(ae_cfg).images
    assert pixels.shape == (40, 3, 32, 32)
    carried, fitted = load_codec(run)  # the codec the checkpoint carries, against the autoencoder run's own weights
    raw = load_codec(os.path.join(run, "autoencoder"))[0].raw_encode(pixels).double()
    assert fitted and carried.digest() == meta["data"]["latent"]["digest"]
    torch.testing.assert_close(carried.shift.double(), raw.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(carried.scale.double(), raw.std((0, 2, 3), correction=0), atol=1e-5, rtol=1e-4)
    code, _, err = cli(["sample", "--ckpt", run, "--out", str(tmp_path / "s"), "--n", "4", "--nfe", "2"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (4, 32, 32, 3)
    code, out, err = cli(["eval", "--ckpt", run, "--n", "8", "--nfe", "2", "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    report = json.loads(out)
    ae = report["autoencoder"]
    assert report["fd"] >= 0 and "fd_floor" in report and "fd_floor" in ae
    assert ae["psnr"] == pytest.approx(10 * np.log10(4 / ae["mse"]))


@pytest.mark.parametrize("preset, extra", [("folder-latent-32", []), ("folder-latent-64", []), ("folder-ae-64", []),
                                           ("folder-latent-32", ["--set", "data.latent=runs/ae32"])])  # a reused AE
def test_a_folder_preset_without_a_folder_names_the_setting_in_one_message(preset, extra, tmp_path, capsys):
    code, _, err = cli(["train", preset, "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress", *extra],
                       capsys)
    assert code != 0 and "--set data.name=folder:DIR" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run" / "ckpt")


def test_folder_latent_64_stages_an_f4_autoencoder_at_64_pixels():
    """folder-latent-64 trains folder-ae-64 (ae-rgb64: 64x64x3 -> 16x16x4) on the run's folder, size and split."""
    from unifuse.training.autoencoder import stage_config

    cfg = get_config("folder-latent-64", ["data.name=folder:/data/faces", "data.heldout=20", "train.minutes=10"])
    assert (cfg.data.size, cfg.data.latent, cfg.model.sigma_data, cfg.sample.clip_denoised) == \
           (64, "train:folder-ae-64", 1.0, 0.0)
    stage = stage_config(cfg)
    assert (stage.model.net, stage.data.name, stage.data.size, stage.data.heldout) == \
           ("ae-rgb64", "folder:/data/faces", 64, 20)
    assert stage.train.minutes == pytest.approx(cfg.data.latent_share * 10) and cfg.data.latent_share == 0.3
    ae = build_net(stage.model.net, channels=4)
    assert tuple(ae.encode(torch.zeros(1, 3, 64, 64))[0].shape) == (1, 4, 16, 16)


def test_the_default_mnist_preset_is_latent_with_its_autoencoder_in_15_percent_of_the_minutes():
    """`mnist` is `mnist-latent` (DEFAULT_MNIST): mnist-ae trains first in data.latent_share = 0.15 of --minutes."""
    from unifuse.training.autoencoder import stage_config

    cfg = get_config("mnist", ["train.minutes=20"])
    assert cfg.data.latent == "train:mnist-ae" and cfg.data.latent_share == 0.15
    assert stage_config(cfg).train.minutes == pytest.approx(3.0)
    assert stage_config(get_config("mnist", ["train.minutes=20", "data.latent_share=0.5"])).train.minutes == 10
    with pytest.raises(UnifuseError, match="data.latent_share=0"):
        get_config("mnist", ["data.latent_share=0"])

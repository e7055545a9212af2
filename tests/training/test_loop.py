"""The training loop: a toy model learns, checkpoints round-trip, a resumed run equals an uninterrupted one,
and bad input (corrupt or missing checkpoints, unknown presets, bad overrides, a NaN loss) stops with one
clear message while the last good checkpoint stays intact."""
import hashlib
import json
import os

import pytest
import torch

from unifuse import config as C
from unifuse.errors import UnifuseError
from unifuse.training import TrainingDiverged, load_model, train
from unifuse.training.checkpoint import find_checkpoint, load_tensors, read_meta

# A tiny MLP on a toy set: a step costs about a millisecond.
TINY = ["model.net_options={width: 64, depth: 2, emb_dim: 32}", "data.batch=64", "train.log_every=1",
        "train.ckpt_every=1000", "optim.warmup_steps=2"]


def tiny(preset="toy-moons", *more):
    return C.get_config(preset, TINY + list(more))


def digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def test_toy_model_learns_the_distribution(tmp_path):
    from unifuse.data import sample_toy
    from unifuse.metrics import sliced_wasserstein
    from unifuse.training.build import build_model, build_net
    from unifuse.training.sampling import generate

    cfg = C.get_config("toy-8gaussians", ["train.steps=150", "train.log_every=50", "optim.lr=3e-3", "data.batch=256",
                                           "model.net_options={width: 128, depth: 3}"])
    info = {"shape": [2], "num_classes": 0, "pad": 0}
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg, build_net(cfg, info))
    ref = sample_toy("8gaussians", 2000, torch.Generator().manual_seed(5))
    before = sliced_wasserstein(generate(untrained.eval(), cfg.sample, info, 2000, conditioning="none", seed=1)[0], ref)
    summary = train(cfg, str(tmp_path / "run"), progress=False)
    model, _ = load_model(str(tmp_path / "run"))
    after = sliced_wasserstein(generate(model, cfg.sample, info, 2000, conditioning="none", seed=1)[0], ref)
    floor = sliced_wasserstein(sample_toy("8gaussians", 2000, torch.Generator().manual_seed(6)), ref)
    assert summary["step"] == 150
    assert after < 0.2 * before and after < 10 * floor, (before, after, floor)


def test_checkpoint_round_trip(tmp_path):
    run = str(tmp_path / "run")
    cfg = tiny("toy-moons", "train.steps=3")
    train(cfg, run, progress=False)
    folder = find_checkpoint(run)
    meta = read_meta(folder)
    assert meta["step"] == 3 and meta["path"] == "edm" and meta["prediction"] == "edm" and meta["library_version"]
    assert C.from_dict(meta["config"]) == cfg == C.load_config(os.path.join(run, "config.yaml"))
    for ema, key in ((True, "ema"), (False, "model")):
        model, loaded_cfg = load_model(run, ema=ema)
        stored = load_tensors(folder, key)
        state = model.net.state_dict()
        assert loaded_cfg == cfg and set(state) == set(stored)
        assert all(torch.equal(state[k], stored[k]) for k in state)
    ema, raw = load_tensors(folder, "ema"), load_tensors(folder, "model")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # two different sets of weights were stored
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3] and lines[-1]["event"] == "end"
    assert os.path.isfile(os.path.join(run, "loss.png"))


@pytest.mark.parametrize("preset,extra", [
    ("toy-moons", ["model.net_options.dropout=0.2"]),                               # dropout RNG, EDM loss
    ("toy-moons", ["model.family=iddpm", "model.path=ddpm-cosine", "model.prediction=eps",
                   "model.learned_variance=true", "objective.name=hybrid",
                   "objective.options={timesteps: importance, history: 1}"]),
    ("toy-moons", ["model.family=ct", "model.prediction=consistency", "objective.name=ct",
                   "objective.options={stage_every: 2}", "model.net_options.dropout=0.2"]),
    ("toy-moons", ["data.cond=class", "optim.accumulate=2", "optim.posthoc_ema=true", "optim.posthoc_every=2"]),
])
def test_resume_continues_exactly(tmp_path, preset, extra):
    """Stopping at step 3 and resuming to step 7 gives bit-identical weights, EMA and optimizer state."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(tiny(preset, "train.steps=7", *extra), straight, progress=False)
    train(tiny(preset, "train.steps=3", *extra), split, progress=False)
    summary = train(tiny(preset, "train.steps=7", *extra), split, resume=split, progress=False)
    assert summary["step"] == 7
    a, b = find_checkpoint(straight), find_checkpoint(split)
    for key in ("model", "ema", "optimizer"):
        ta, tb = load_tensors(a, key), load_tensors(b, key)
        assert set(ta) == set(tb)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), key
    ta, tb = load_tensors(a, "training"), load_tensors(b, "training")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [json.loads(x)["step"] for x in open(os.path.join(split, "metrics.jsonl")) if '"loss"' in x]
    assert steps == list(range(1, 8))


def test_corrupt_or_missing_checkpoint_is_one_clear_error(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(UnifuseError, match="no run or checkpoint"):
        load_model(run)
    os.makedirs(run)
    with pytest.raises(UnifuseError, match="no checkpoint found"):
        load_model(run)
    train(tiny("toy-moons", "train.steps=2"), run, progress=False)
    folder = find_checkpoint(run)
    path = os.path.join(folder, "ema.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    before = digest(folder)
    with pytest.raises(UnifuseError, match="corrupt"):
        load_model(run)
    with pytest.raises(UnifuseError, match="corrupt"):
        train(tiny("toy-moons", "train.steps=4"), run, resume=run, progress=False)
    open(path, "wb").write(b"\x00\x01")  # truncated as well
    with pytest.raises(UnifuseError, match="corrupt|cannot be read"):
        load_model(run)
    os.remove(path)
    with pytest.raises(UnifuseError, match="missing"):
        load_model(run)
    with pytest.raises(UnifuseError, match="already holds"):
        train(tiny("toy-moons", "train.steps=2"), run, progress=False)
    assert set(digest(folder)) == set(before) - {"ema.safetensors"}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    train(tiny("toy-moons", "train.steps=2"), run, progress=False)
    folder = find_checkpoint(run)
    before = digest(folder)
    bad = tiny("toy-moons", "train.steps=50", "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0")
    with pytest.raises(TrainingDiverged, match="NaN or infinite.*last good checkpoint"):
        train(bad, run, resume=run, progress=False)
    assert find_checkpoint(run) == folder and digest(folder) == before
    assert read_meta(folder)["step"] == 2


def test_unknown_preset_and_bad_overrides():
    with pytest.raises(UnifuseError, match="unknown preset 'digitz'"):
        C.get_config("digitz")
    with pytest.raises(UnifuseError, match="unknown config key 'optim.learning_rate'.*valid keys under optim"):
        C.get_config("digits", ["optim.learning_rate=1"])
    with pytest.raises(UnifuseError, match="needs an integer"):
        C.get_config("digits", ["train.steps=1.5"])
    with pytest.raises(UnifuseError, match="needs true or false"):
        C.get_config("digits", ["train.compile=maybe"])
    with pytest.raises(UnifuseError, match="key.sub=value"):
        C.get_config("digits", ["optim.lr"])
    with pytest.raises(UnifuseError, match="learned_variance"):
        C.get_config("digits", ["objective.name=hybrid"])
    with pytest.raises(UnifuseError, match="precision"):
        C.get_config("digits", ["train.precision=fp8"])
    cfg = C.get_config("digits", ["optim.lr=1e-3", "model.net_options.depth=3", "optim.betas=[0.9, 0.99]"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.net_options == dict(C.PRESETS["digits"].model.net_options, depth=3)  # a sub-key merges
    # a mapping replaces
    assert C.get_config("digits", ["model.net_options={depth: 3}"]).model.net_options == {"depth": 3}


def test_every_required_preset_exists_and_builds():
    from unifuse.training.build import build_model, build_net, build_objective

    names = set(C.PRESETS)
    for ds in ("digits", "mnist"):
        assert {ds, f"{ds}-cond", f"{ds}-text"} <= names
        assert {f"{ds}-{f}" for f in C.FAMILIES} <= names
    # the default MNIST models are latent (DEFAULT_MNIST); the pixel-space ones keep their own names
    assert all(C.PRESETS[f"mnist{s}"].data.latent and not C.PRESETS[f"mnist-pixel{s}"].data.latent
               and C.PRESETS[f"mnist{s}"].data.cond == C.PRESETS[f"mnist-pixel{s}"].data.cond for s in ("", "-cond", "-text"))
    assert {f"toy-{t}" for t in ("moons", "8gaussians", "checkerboard", "swissroll")} <= names
    info = {"digits": {"shape": [1, 8, 8], "num_classes": 10}, "mnist": {"shape": [1, 32, 32], "num_classes": 10},
            "latent": {"shape": [4, 7, 7], "num_classes": 10}}
    for name in [f"digits-{f}" for f in C.FAMILIES] + ["digits-cond", "mnist", "mnist-pixel", "mnist-ct"]:
        cfg = C.PRESETS[name]
        model = build_model(cfg, build_net(cfg, info["latent" if cfg.data.latent else cfg.data.name]))
        assert model.prediction == cfg.model.prediction and callable(build_objective(cfg))
    assert C.load_config.__doc__
    assert C.to_dict(C.PRESETS["digits"])["model"]["family"] == C.PRESETS["digits"].model.family


def test_yaml_config_with_a_base_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: digits-rf\noptim:\n  lr: 0.0005\ntrain:\n  steps: 10\n")
    cfg = C.get_config(str(path))
    assert cfg.model.family == "rf" and cfg.optim.lr == 5e-4 and cfg.train.steps == 10
    path.write_text("optim:\n  lr: [1]\n")
    with pytest.raises(UnifuseError, match="optim.lr"):
        C.get_config(str(path))
    path.write_text("optim: {lr: 1\n")
    with pytest.raises(UnifuseError, match="not valid YAML"):
        C.get_config(str(path))


def test_posthoc_ema_reconstructs_a_profile_it_never_tracked():
    import numpy as np

    from unifuse.training.ema import PowerEMA, posthoc_coefficients

    net = torch.nn.Linear(1, 1, bias=False)
    tracked, target = PowerEMA(net, (0.05, 0.10)), PowerEMA(net, (0.07, 0.15))
    gammas, steps, values = [], [], []
    for step in range(1, 1001):
        with torch.no_grad():
            net.weight.fill_(float(np.sin(step / 150.0) + step / 500.0))
        tracked.update(net, step), target.update(net, step)
        if step % 50 == 0:
            for g, avg in zip(tracked.gammas, tracked.nets):
                gammas.append(g), steps.append(step), values.append(float(avg.weight))
    for g, avg in zip(target.gammas, target.nets):
        estimate = float(np.dot(posthoc_coefficients(gammas, steps, g, 1000), values))
        assert abs(estimate - float(avg.weight)) < 2e-3 * abs(float(avg.weight) - float(net.weight.detach()))


def test_learning_rate_schedule():
    from unifuse.training import learning_rate

    cfg = C.get_config("digits", ["optim.lr=1e-3", "optim.warmup_steps=10", "optim.decay_after=100"])
    assert learning_rate(cfg, 0) == pytest.approx(1e-4) and learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 50) == pytest.approx(1e-3) and learning_rate(cfg, 400) == pytest.approx(5e-4)

    # Cool-down: linear to 0 over the last 40% of the budget, by steps by default or by the spent time fraction.
    cool = C.get_config("digits", ["optim.lr=1e-3", "optim.warmup_steps=0", "optim.decay_after=0", "optim.cooldown=0.4",
                                     "train.steps=1000"])
    assert learning_rate(cool, 500) == pytest.approx(1e-3) and learning_rate(cool, 600) == pytest.approx(1e-3)
    assert learning_rate(cool, 800) == pytest.approx(0.5e-3) and learning_rate(cool, 1000) == 0.0
    assert learning_rate(cool, 10, progress=0.9) == pytest.approx(0.25e-3)
    with pytest.raises(UnifuseError, match="optim.cooldown must be a fraction"):
        C.get_config("digits", ["optim.cooldown=1.5"])


def test_cooldown_follows_the_time_budget(tmp_path):
    """With a time budget the loop passes the spent fraction of it: the last logged rates fall towards 0."""
    import json

    from unifuse.training import train

    cfg = C.get_config("toy-moons", ["train.steps=100000", "train.minutes=0.03", "train.clock=process",
                                     "optim.cooldown=0.5", "optim.warmup_steps=0", "train.log_every=1",
                                     "train.ckpt_every=100000"])
    train(cfg, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "lr" in r and "loss" in r]
    assert lrs[0] == pytest.approx(cfg.optim.lr) and lrs[-1] < 0.1 * cfg.optim.lr
    assert all(b <= a + 1e-12 for a, b in zip(lrs[len(lrs) // 2:], lrs[len(lrs) // 2 + 1:]))


def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGINT to `unifuse train` ends the current step, writes a checkpoint, exits 130; resuming from it
    reaches the same weights as a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = str(tmp_path / "run")
    flags = [x for o in TINY + ["train.threads=1"] for x in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "unifuse.cli", "train", "toy-moons", "--out", run,
                             "--steps", "100000", "--no-progress", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"))
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = read_meta(find_checkpoint(run))["step"]
    assert step >= 5 and "--resume" in err
    threads = torch.get_num_threads()  # the same thread count everywhere, so float sums agree bit for bit
    try:
        train(tiny("toy-moons", f"train.steps={step + 3}", "train.threads=1"), run, resume=run, progress=False)
        straight = str(tmp_path / "straight")
        train(tiny("toy-moons", f"train.steps={step + 3}", "train.threads=1"), straight, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = load_tensors(find_checkpoint(run), "model"), load_tensors(find_checkpoint(straight), "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("clock", ["wall", "process"])
def test_time_budget_stops_the_run_with_a_checkpoint(tmp_path, clock):
    summary = train(tiny("toy-moons", "train.steps=1000000", "train.minutes=0.002", f"train.clock={clock}"),
                    str(tmp_path / "run"), progress=False)
    assert summary["stopped_by"] == "time" and 0 < summary["step"] < 1000000
    assert read_meta(find_checkpoint(str(tmp_path / "run")))["step"] == summary["step"]


@pytest.mark.parametrize("family", ["meanflow", "shortcut", "sct"])
def test_few_step_families_train_and_sample_in_one_step(tmp_path, family):
    """The few-step families run in the ordinary loop (two-time networks, objectives with parameters of their own)
    and sample with their own sampler at 1 NFE."""
    from unifuse.training.sampling import generate

    cfg = tiny("toy-moons", f"model.family={family}", "train.steps=3")
    assert cfg.sample.nfe in (1, 2) and (family == "sct" or cfg.model.net_options["two_times"])
    train(cfg, str(tmp_path / family), progress=False)
    model, loaded = load_model(str(tmp_path / family))
    x, _ = generate(model, loaded.sample, {"shape": [2]}, 16, conditioning="none", nfe=1)
    assert x.shape == (16, 2) and bool(torch.isfinite(x).all())

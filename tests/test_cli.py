"""The `unifuse` command line: exit codes, one-line errors, and the train -> sample -> eval round trip."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unifuse.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIGITS = ["--set", "model.net_options={width: 32, depth: 1, emb_dim: 16}", "--set", "data.batch=16",
               "--set", "train.log_every=1"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in err


def test_presets_lists_every_required_name(capsys):
    code, out, _ = run(["presets"], capsys)
    names = {line.split()[0] for line in out.splitlines()}
    assert code == 0
    for ds in ("digits", "mnist"):
        assert {ds, f"{ds}-cond", f"{ds}-text"} <= names
        assert {f"{ds}-{f}" for f in ("ddpm", "iddpm", "vpsde", "vesde", "edm", "rf", "trigflow", "ct")} <= names
    assert {"toy-moons", "toy-8gaussians", "toy-checkerboard", "toy-swissroll"} <= names


@pytest.mark.parametrize("command", ["bench"])
def test_later_commands_say_not_yet_available(command, capsys):
    code, _, err = run([command, "anything"], capsys)
    assert code == 2 and one_error_line(err) and "not yet available" in err


@pytest.mark.parametrize("argv,needle", [
    (["train", "digitz", "--out", "RUN"], "unknown preset 'digitz'"),
    (["train", "digits", "--out", "RUN", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "digits", "--out", "RUN", "--set", "optim.lr=fast"], "needs a number"),
    (["train", "digits", "--out", "RUN", "--set", "nonsense"], "key.sub=value"),
    (["train", "digits"], "--out"),
    (["train", "digits-classifier", "--out", "RUN", "--set", "optim.lr=1"], "takes --out, --steps, --minutes and "
                                                                            "--seed only"),
    (["sample", "--ckpt", "NOPE", "--out", "OUT"], "no run or checkpoint"),
    (["eval", "--ckpt", "NOPE"], "no run or checkpoint"),
])
def test_bad_input_is_one_line_and_nonzero(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code != 0 and one_error_line(err) and needle in err, err
    assert not os.path.exists(tmp_path / "RUN")  # nothing half-written


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "digits", "--out", "x", "--bogus"])
    assert info.value.code == 2 and one_error_line(capsys.readouterr().err)


def test_console_errors_have_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "unifuse.cli", "sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and one_error_line(proc.stderr) and "no checkpoint found" in proc.stderr


def test_train_sample_eval_resume_round_trip(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    code, out, err = run(["train", "digits", "--out", run_dir, "--steps", "2", "--no-progress"] + TINY_DIGITS, capsys)
    assert code == 0, err
    for name in ("ckpt", "metrics.jsonl", "samples", "config.yaml", "loss.png"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    # resume to step 3 (the preset name may be omitted)
    code, out, err = run(["train", "--resume", run_dir, "--steps", "3", "--no-progress"], capsys)
    assert code == 0 and "step 3" in out, err
    code, _, err = run(["train", "digits-rf", "--resume", run_dir], capsys)
    assert code == 1 and one_error_line(err) and "is a run of 'digits'" in err
    # sample: npz of uint8 images at the data's own resolution, and a grid
    out_dir = str(tmp_path / "samples")
    code, _, err = run(["sample", "--ckpt", run_dir, "--out", out_dir, "--n", "6", "--nfe", "2", "--sampler", "euler"],
                       capsys)
    assert code == 0, err
    images = np.load(os.path.join(out_dir, "samples.npz"))["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert os.path.isfile(os.path.join(out_dir, "grid.png"))
    code, _, err = run(["sample", "--ckpt", run_dir, "--out", out_dir, "--class", "3"], capsys)
    assert code == 1 and one_error_line(err) and "class-conditional" in err
    # eval: JSON metrics on stdout and in RUN/eval.json
    code, out, err = run(["eval", "--ckpt", run_dir, "--n", "16", "--nfe", "2", "--sampler", "euler"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["n"] == 16 and report["fd"] > 0 and "fd_heldout" in report
    assert json.load(open(os.path.join(run_dir, "eval.json")))["step"] == 3


def test_demo_writes_grid_metrics_and_loss_curve(tmp_path, capsys):
    """`make demo` end to end with a tiny time budget: every promised file appears and the report names them."""
    from unifuse.training.demo import run_demo

    out = str(tmp_path / "demo")
    report = run_demo(out, minutes=0.01, n_eval=300)
    printed = capsys.readouterr().out
    for name in ("grid.png", "metrics.json", "loss.png", "metrics.jsonl", "samples.npz", "config.yaml"):
        assert os.path.isfile(os.path.join(out, name)), name
        assert name in printed or name == "config.yaml" or name == "samples.npz"
    stored = json.load(open(os.path.join(out, "metrics.json")))
    assert stored["fd_heldout"] == report["fd_heldout"] > 0 and stored["fd_floor"] > 0 and stored["steps"] >= 1


# --- class names, classifier guidance and autoguidance from the command line ---------------------------------
def _tiny_train(argv):
    code = main(argv[:2] + ["--no-progress"] + TINY_DIGITS + argv[2:])  # the caller's --set win
    assert code == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step unconditional digits run with a checkpoint at every step, and a 1-step digits classifier."""
    root = tmp_path_factory.mktemp("runs")
    digits, clf = str(root / "digits"), str(root / "clf")
    _tiny_train(["train", "digits", "--out", digits, "--steps", "3", "--set", "train.ckpt_every=1",  # steps 1 and 3
                 "--set", "train.keep=3", "--set", "optim.warmup_steps=0", "--set", "optim.lr=0.01"])  # differ visibly
    assert main(["train", "digits-classifier", "--out", clf, "--steps", "1", "--no-progress"]) == 0
    return {"digits": digits, "weak": os.path.join(digits, "ckpt", "step-00000001"), "clf": clf}


def _samples(out):
    data = np.load(os.path.join(out, "samples.npz"))
    return data["images"], data.get("labels")


def _reference(run, n, seed, wrap, ema=True, **kw):
    """What `unifuse sample --n n --nfe 2 --sampler euler` must produce for the model `wrap(model)`."""
    from unifuse.data import to_uint8
    from unifuse.training import load_model
    from unifuse.training.checkpoint import find_checkpoint, read_meta
    from unifuse.training.sampling import generate

    model, cfg = load_model(run, ema=ema)
    info = read_meta(find_checkpoint(run))["data"]
    x, _ = generate(wrap(model), cfg.sample, info, n, conditioning=cfg.data.cond, seed=seed, sampler="euler", nfe=2,
                    **kw)
    return to_uint8(x)


SAMPLE = ["--n", "4", "--nfe", "2", "--sampler", "euler", "--seed", "1"]


def test_sample_classifier_guidance(runs, tmp_path, capsys):
    from unifuse.guidance import classifier_guidance
    from unifuse.nets.classifier import load_noisy_classifier

    out = str(tmp_path / "s")
    base = ["sample", "--ckpt", runs["digits"], "--out", out] + SAMPLE
    assert main(base + ["--classifier", runs["clf"], "--class", "3", "--classifier-scale", "4"]) == 0
    images, labels = _samples(out)
    assert labels.tolist() == [3, 3, 3, 3]
    clf = load_noisy_classifier(runs["clf"])
    ref = _reference(runs["digits"], 4, 1, lambda m: classifier_guidance(m, clf, 4.0), class_label=3)
    np.testing.assert_array_equal(images, ref)
    assert main(base) == 0
    plain, _ = _samples(out)
    assert (plain != images).any()                       # the classifier changed the samples
    assert main(base + ["--classifier", runs["clf"], "--classifier-scale", "0"]) == 0
    zero, balanced = _samples(out)
    np.testing.assert_array_equal(zero, plain)           # scale 0 is the unguided model
    assert balanced.tolist() == [0, 1, 2, 3]             # no --class: classes in turn
    capsys.readouterr()
    # a classifier for other data, or for another class count: one line each
    other = tmp_path / "clf32"
    other.mkdir()
    record = json.load(open(os.path.join(runs["clf"], "classifier.json")))
    for name in ("classifier.safetensors",):
        os.symlink(os.path.join(runs["clf"], name), other / name)
    for change, needle in (({"shape": [1, 32, 32]}, "shape [1, 32, 32], but the model makes [1, 8, 8]"),
                           ({"config": dict(record["config"], num_classes=5)}, "knows 5 classes, but the model's data "
                                                                               "has 10")):
        (other / "classifier.json").write_text(json.dumps(dict(record, **change)))
        code, _, err = run(base + ["--classifier", str(other)], capsys)
        assert code == 1 and one_error_line(err) and needle in err and "unifuse train digits-classifier" in err, err
    for extra, needle in ((["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
                          (["--classifier", runs["digits"]], "holds no noise-conditional classifier"),
                          (["--classifier", runs["clf"], "--guidance", "2"],
                           "set the classifier's strength with --classifier-scale")):
        code, _, err = run(base + extra, capsys)
        assert code == 1 and one_error_line(err) and needle in err, err
    swiss = str(tmp_path / "swiss")
    _tiny_train(["train", "toy-swissroll", "--out", swiss, "--steps", "1"])
    code, _, err = run(["sample", "--ckpt", swiss, "--out", out, "--classifier", runs["clf"]] + SAMPLE, capsys)
    assert code == 1 and one_error_line(err) and "has no class labels" in err, err


def test_sample_autoguidance(runs, tmp_path, capsys):
    from unifuse.guidance import autoguidance
    from unifuse.training import load_model

    out = str(tmp_path / "s")
    base = ["sample", "--ckpt", runs["digits"], "--out", out, "--raw"] + SAMPLE  # raw weights: 3 steps moved them
    assert main(base + ["--autoguide", runs["weak"], "--guidance", "3", "--guidance-interval", "0.001,50"]) == 0
    images, _ = _samples(out)
    weak, _ = load_model(runs["weak"], ema=False)
    ref = _reference(runs["digits"], 4, 1, lambda m: autoguidance(m, weak, 3.0, interval=(0.001, 50.0)), ema=False)
    np.testing.assert_array_equal(images, ref)
    assert main(base) == 0
    plain, _ = _samples(out)
    assert (plain != images).any()
    assert main(base + ["--autoguide", runs["weak"], "--guidance", "1"]) == 0
    np.testing.assert_array_equal(_samples(out)[0], plain)   # scale 1 is the model itself
    capsys.readouterr()
    rf = str(tmp_path / "rf")
    _tiny_train(["train", "digits-rf", "--out", rf, "--steps", "1"])
    for extra, needle in ((["--autoguide", runs["weak"]], "--autoguide needs --guidance"),
                          (["--autoguide", runs["digits"], "--guidance", "2"], "is the sampled checkpoint itself"),
                          (["--autoguide", rf, "--guidance", "2"], "is on path 'rf' but the sampled run on 'edm'"),
                          (["--autoguide", str(tmp_path / "nope"), "--guidance", "2"], "no run or checkpoint")):
        code, _, err = run(base + extra, capsys)
        assert code == 1 and one_error_line(err) and needle in err, err


def test_class_subfolders_sample_by_name(tmp_path, capsys, monkeypatch):
    """A folder of class sub-folders trains class-conditionally; the checkpoint keeps the names for --class NAME."""
    from PIL import Image

    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for cls in ("circles", "squares"):
        (tmp_path / "shapes" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "shapes" / cls / f"{i}.png")
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "s")
    _tiny_train(["train", "digits-cond", "--out", run_dir, "--steps", "2", "--set", f"data.name={tmp_path / 'shapes'}",
                 "--set", "data.batch=8"])
    base = ["sample", "--ckpt", run_dir, "--out", out] + SAMPLE
    assert main(base + ["--class", "squares"]) == 0
    by_name, labels = _samples(out)
    assert labels.tolist() == [1, 1, 1, 1] and by_name.shape == (4, 32, 32, 1)
    assert main(base + ["--class", "1"]) == 0
    np.testing.assert_array_equal(_samples(out)[0], by_name)
    assert main(base + ["--class", "circles"]) == 0
    assert _samples(out)[1].tolist() == [0, 0, 0, 0]
    capsys.readouterr()
    code, _, err = run(base + ["--class", "dogs"], capsys)
    assert code == 1 and one_error_line(err) and "give a name (circles, squares) or an index 0..1" in err, err
    code, _, err = run(["train", "digits-text", "--out", str(tmp_path / "t"), "--steps", "1", "--no-progress",
                        "--set", f"data.name={tmp_path / 'shapes'}"], capsys)
    assert code == 1 and one_error_line(err) and "needs captions" in err and ".txt beside each image" in err, err


# --- issue 12: outputs checked first, every flag takes effect or is refused, sample folders that explain themselves
def test_sample_folder_has_metadata_pngs_and_a_gif(runs, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sample", "--ckpt", runs["digits"], "--out", out, "--png", "--gif", "--device", "cpu", "--dtype",
                 "float64", "--batch", "3"] + SAMPLE) == 0
    meta = json.load(open(os.path.join(out, "samples.json")))
    for key, value in (("sampler", "euler"), ("nfe", 2), ("seed", 1), ("batch", 3), ("device", "cpu"),
                       ("dtype", "float64"), ("spacing", "karras"), ("step", 3), ("n", 4), ("guidance", None)):
        assert meta[key] == value, key
    assert meta["checkpoint"].endswith("step-00000003") and meta["library_version"]
    assert sorted(os.listdir(os.path.join(out, "png"))) == [f"{i:06d}.png" for i in range(4)]
    from PIL import Image

    with Image.open(os.path.join(out, "trajectory.gif")) as gif:
        assert gif.n_frames == 3  # the start and two steps
    float32 = str(tmp_path / "f32")
    assert main(["sample", "--ckpt", runs["digits"], "--out", float32, "--batch", "4"] + SAMPLE) == 0
    assert np.abs(_samples(out)[0].astype(int) - _samples(float32)[0].astype(int)).max() <= 1  # same samples


@pytest.mark.parametrize("extra,needle", [
    (["--batch", "0"], "--batch must be >= 1 (samples per sampler call, e.g. --batch 500), got 0"),
    (["--batch", "-3"], "--batch must be >= 1"),
    (["--nfe", "0"], "--nfe must be >= 1"),
    (["--clip-denoised", "-1"], "--clip-denoised must be >= 0"),
    (["--threshold-percentile", "0.99"], "add --clip-denoised 1"),
    (["--clip-denoised", "1", "--threshold-percentile", "1.5"], "--threshold-percentile must be in [0, 1)"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
])
def test_sample_flags_are_refused_in_one_line(runs, tmp_path, capsys, extra, needle):
    out = tmp_path / "s"
    try:
        code, _, err = run(["sample", "--ckpt", runs["digits"], "--out", str(out), "--n", "4"] + extra, capsys)
    except SystemExit as exit_:  # argparse
        code, err = exit_.code, capsys.readouterr().err
    assert code != 0 and one_error_line(err) and needle in err, err
    assert not out.exists() or not os.listdir(out)


def test_outputs_are_refused_before_any_work(runs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(["sample", "--ckpt", runs["digits"], "--out", str(afile)], capsys)
    assert code == 1 and one_error_line(err) and "is a file, not a folder" in err
    code, _, err = run(["eval", "--ckpt", runs["digits"], "--out", str(tmp_path)], capsys)
    assert code == 1 and one_error_line(err) and "is a folder; give a file name" in err
    code, _, err = run(["eval", "--ckpt", runs["digits"], "--out", "/proc/nope/eval.json"], capsys)
    assert code == 1 and one_error_line(err) and "cannot be written" in err
    if not __import__("torch").cuda.is_available():
        code, _, err = run(["sample", "--ckpt", runs["digits"], "--out", str(tmp_path / "g"), "--device", "cuda"], capsys)
        assert code == 1 and one_error_line(err) and "no CUDA GPU" in err and "--device cpu" in err


def test_eval_refuses_zero_and_warns_on_few_samples(runs, tmp_path, capsys):
    for extra, needle in ((["--n", "0"], "--n must be >= 1"), (["--nfe", "0"], "--nfe must be >= 1")):
        code, _, err = run(["eval", "--ckpt", runs["digits"]] + extra, capsys)
        assert code == 1 and one_error_line(err) and needle in err, err
    code, out, err = run(["eval", "--ckpt", runs["digits"], "--n", "8", "--nfe", "2", "--sampler", "euler", "--out",
                          str(tmp_path / "e.json"), "--device", "cpu"], capsys)
    assert code == 0 and "warning: --n 8 is too few samples" in err
    assert json.loads(out)["n"] == 8 and json.load(open(tmp_path / "e.json"))["device"] == "cpu"


def test_train_refuses_an_out_inside_its_image_folder(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), i * 40).save(tmp_path / "imgs" / f"{i}.png")
    code, _, err = run(["train", "digits", "--out", str(tmp_path / "imgs" / "run"), "--set",
                        f"data.name={tmp_path / 'imgs'}", "--steps", "1"], capsys)
    assert code == 1 and one_error_line(err) and "inside the training image folder" in err, err
    assert sorted(os.listdir(tmp_path / "imgs")) == [f"{i}.png" for i in range(4)]


def test_set_model_family_trains_that_family_and_resume_keeps_the_network(tmp_path, capsys):
    run_dir = str(tmp_path / "rf")
    code, _, err = run(["train", "digits", "--out", run_dir, "--steps", "1", "--no-progress", "--set",
                        "model.family=rf", "--set", "train.precision=fp32"] + TINY_DIGITS, capsys)
    assert code == 0, err
    meta = json.load(open(os.path.join(run_dir, "ckpt", "step-00000001", "checkpoint.json")))
    assert (meta["path"], meta["prediction"], meta["config"]["objective"]["name"]) == ("rf", "velocity", "flow")
    assert meta["precision"] == "fp32"
    code, _, err = run(["train", "--resume", run_dir, "--steps", "2", "--set", "model.net_options.width=64"], capsys)
    assert code == 1 and one_error_line(err) and "trained with model.net_options.width=32" in err, err


def test_samplers_and_help_list_choices_and_an_example(capsys):
    from unifuse.samplers import SAMPLERS

    code, out, _ = run(["samplers"], capsys)
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and set(rows) == set(SAMPLERS)
    assert rows["heun"].split()[1] == "2" and "karras" in rows["heun"] and "variant" in rows["dpmpp_2m"]
    for command in ("train", "sample", "eval", "presets", "samplers", "demo", "distill", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "example:\n  unifuse " + command in text, command
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "dpmpp_2m" in text and "karras" in text and "float64" in text and "--png" in text and "--gif" in text

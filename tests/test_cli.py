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


@pytest.mark.parametrize("command", ["distill", "finetune", "bench"])
def test_later_commands_say_not_yet_available(command, capsys):
    code, _, err = run([command, "anything"], capsys)
    assert code == 2 and one_error_line(err) and "not yet available" in err


@pytest.mark.parametrize("argv,needle", [
    (["train", "digitz", "--out", "RUN"], "unknown preset 'digitz'"),
    (["train", "digits", "--out", "RUN", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "digits", "--out", "RUN", "--set", "optim.lr=fast"], "needs a number"),
    (["train", "digits", "--out", "RUN", "--set", "nonsense"], "key.sub=value"),
    (["train", "digits"], "--out"),
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
    proc = subprocess.run([sys.executable, "-m", "unifuse.cli", "sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
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
    code, _, err = run(["sample", "--ckpt", run_dir, "--out", out_dir, "--n", "6", "--nfe", "2", "--sampler", "euler"], capsys)
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

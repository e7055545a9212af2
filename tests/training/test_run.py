"""The run object any training loop uses: a loop of its own (a student regressing a teacher, as distillation
will) checkpoints and resumes bit for bit through it; `unifuse train` killed with SIGKILL resumes from its
last checkpoint to the weights of a run never stopped; the metrics file is cut back to the resumed step."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from unifuse import config as C
from unifuse.training import Run, train
from unifuse.training.build import Batches, build_data
from unifuse.training.checkpoint import find_checkpoint, load_tensors, read_meta
from unifuse.training.run import read_metrics, truncate_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.net_options={width: 64, depth: 2, emb_dim: 32}", "data.batch=64", "train.log_every=1",
        "optim.warmup_steps=2", "train.threads=1"]
QUIET = {"progress": False, "log": lambda *a: None}


def student_loop(cfg, out, resume=None) -> dict:
    """The smallest loop on a Run: its own networks, optimizer, random stream and checkpoint file names."""
    run = Run(cfg, out, resume=resume, **QUIET)
    data = build_data(cfg)
    torch.manual_seed(0)
    teacher = torch.nn.Linear(2, 2)
    student = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    batches = Batches(data, cfg.data.batch)
    noise = torch.Generator().manual_seed(1)
    step, images = run.start(nets={"student": student}, optimizers={"student_optimizer": opt}, states={},
                             generators={"noise": noise}, batches=batches, meta={"method": "toy distillation"})
    with run.loop():
        while step < cfg.train.steps:
            x, _ = batches.next()
            x = x + 0.1 * torch.randn(x.shape, generator=noise)
            loss = ((student(x) - teacher(x).detach()) ** 2).mean()  # dropout draws from the global stream
            loss.backward()
            loss = run.agree(step, float(loss.detach()), bool(torch.isfinite(loss)), 1e-2)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, images = step + 1, images + x.shape[0]
            if run.end_step(step, images, loss):
                break
    return run.finish(step, images)


def test_a_loop_of_its_own_resumes_exactly_through_the_run(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    a = student_loop(C.get_config("toy-moons", TINY + ["train.steps=6"]), straight)
    student_loop(C.get_config("toy-moons", TINY + ["train.steps=3"]), split)
    b = student_loop(C.get_config("toy-moons", TINY + ["train.steps=6"]), split, resume=split)
    assert a["step"] == b["step"] == 6 and a["weights_sha256"] == b["weights_sha256"]
    folder = find_checkpoint(split)
    assert sorted(os.listdir(folder)) == ["checkpoint.json", "student.safetensors", "student_optimizer.safetensors",
                                          "training.safetensors"]
    meta = read_meta(folder)
    assert meta["method"] == "toy distillation" and meta["images"] == 6 * 64 and "student_optimizer" in meta
    for key in ("student", "student_optimizer"):
        ta, tb = load_tensors(find_checkpoint(straight), key), load_tensors(folder, key)
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), key
    assert [r["step"] for r in read_metrics(os.path.join(split, "metrics.jsonl")) if "loss" in r] == list(range(1, 7))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """kill -9 at any moment (even while a checkpoint is written) loses only the steps after the last
    checkpoint; resuming repeats them exactly and drops their old metrics lines."""
    run = str(tmp_path / "run")
    flags = [x for o in [*TINY, "train.ckpt_every=4"] for x in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "unifuse.cli", "train", "toy-moons", "--out", run, "--steps",
                             "100000", "--no-progress", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"))
    latest, deadline = os.path.join(run, "ckpt", "latest.json"), time.time() + 120
    while time.time() < deadline and not (os.path.exists(latest) and json.load(open(latest))["step"] >= 8):
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    step = read_meta(find_checkpoint(run))["step"]
    assert step >= 8 and step % 4 == 0
    threads = torch.get_num_threads()  # the same thread count everywhere, so float sums agree bit for bit
    try:
        train(C.get_config("toy-moons", [*TINY, "train.ckpt_every=4", f"train.steps={step + 3}"]), run, resume=run,
              **QUIET)
        straight = str(tmp_path / "straight")
        train(C.get_config("toy-moons", [*TINY, "train.ckpt_every=4", f"train.steps={step + 3}"]), straight, **QUIET)
    finally:
        torch.set_num_threads(threads)
    for key in ("model", "ema", "optimizer"):
        a, b = load_tensors(find_checkpoint(run), key), load_tensors(find_checkpoint(straight), key)
        assert all(torch.equal(a[k], b[k]) for k in a), key
    steps = [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, step + 4))


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 2, "event": "end"}, {"step": 3, "loss": 0.1}]
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # a torn last line
    truncate_metrics(path, 2)
    assert read_metrics(path) == lines[:2]
    with open(path) as fh:
        assert fh.read() == "".join(json.dumps(r) + "\n" for r in lines[:2])

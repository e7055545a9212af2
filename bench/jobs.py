"""What the post-training benchmarks share: the `unifuse` command line, a base run trained once, and a queue of runs
executed `jobs` at a time, each on one thread with OMP_WAIT_POLICY=PASSIVE (two at once are fair on two cores)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1")
CPU = ["--set", "train.clock=process", "--set", "train.threads=1", "--no-progress"]


def unifuse(*args) -> list:
    return [sys.executable, "-m", "unifuse.cli", *args]


def train_base(data: str, out: str, minutes: float, log) -> None:
    """`unifuse train DATA --minutes M` on the process clock, once (an existing run is kept)."""
    if os.path.isdir(os.path.join(out, "ckpt")):
        return
    log(f"training {data} for {minutes} CPU-minutes -> {out}")
    subprocess.run(unifuse("train", data, "--out", out, "--minutes", str(minutes), *CPU), check=True, env=ENV, cwd=ROOT)


def run_jobs(queue: list, jobs: int, log) -> dict:
    """queue: (name, command, run folder); a run whose folder holds a checkpoint is skipped. Runs `jobs` at once,
    each logging to FOLDER.log; returns {name: None or the tail of its log on failure}."""
    pending, running, errors = list(queue), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd, out = pending.pop(0)
            if os.path.isdir(os.path.join(out, "ckpt")):
                continue
            log(f"started {name}")
            fh = open(out + ".log", "w")
            running.append((name, out, subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT), fh))
        for item in list(running):
            name, out, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                running.remove(item)
                errors[name] = None if proc.returncode == 0 else open(out + ".log").read()[-400:]
                log(f"{name}: {'done' if proc.returncode == 0 else 'FAILED (see ' + out + '.log)'}")
        time.sleep(2)
    return errors

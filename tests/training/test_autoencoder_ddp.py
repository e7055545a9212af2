"""Latent diffusion under torchrun (two CPU processes, gloo): a latent run trains its autoencoder and then the
diffusion model in ONE process group (a second init_process_group in a torchrun process hangs on the first group's
stale rendezvous keys). The deterministic autoencoder's data-parallel steps are the single-process steps on the same
global batch: each rank takes half of it, DDP averages the two half-batch gradients, and the mean of two half-batch
means is the full-batch mean (equal halves), so the logged losses and the final weights agree to float rounding."""
import json
import os
import subprocess
import sys

import torch

from ..test_latent import write_blobs

SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from unifuse.config import get_config
from unifuse.training import train
cfg = get_config("folder-latent-32", sys.argv[2:])
s = train(cfg, sys.argv[1], progress=False)
keys = ("rank", "world", "step", "weights_sha256", "ranks_in_sync")
os.write(1, ("RESULT " + json.dumps({k: s[k] for k in keys}) + "\\n").encode())  # one write: ranks print at once
os._exit(0)  # the run has left its group; skip finalisation, where gloo threads can abort a rank (pytorch#179291)
"""
AE_STEPS = 4


def overrides(folder) -> list:
    """folder-latent-32 on `folder` with the plain (deterministic) autoencoder, tiny and logged every step."""
    stage = {"train": {"steps": AE_STEPS, "log_every": 1}, "data": {"batch": 16}, "sample": {"grid": 4},
             "model": {"net_options": {"channels": 8}}}
    return [f"data.name=folder:{folder}", "data.latent=train:mnist-ae-plain", f"data.latent_options={json.dumps(stage)}",
            "data.heldout=8", "data.batch=16", "train.steps=3", "train.log_every=1", "train.device=cpu",
            "model.net_options.width=32", "model.net_options.depth=1", "sample.grid=4"]


def losses(run: str) -> list:
    return [r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r]


def test_a_latent_run_under_torchrun_matches_one_process_on_the_global_batch(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from unifuse.config import get_config
    from unifuse.training import find_checkpoint, read_meta, train

    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    write_blobs(tmp_path / "blobs")
    script = tmp_path / "ddp_latent.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=os.pathsep.join(paths))
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), run,
           *overrides(tmp_path / "blobs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "different weights" not in proc.stdout + proc.stderr  # Run.finish compares the ranks' weights
    # the diffusion stage: both ranks, same weights
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["world"] == 2 and r["step"] == 3 for r in rows)
    assert rows[0]["weights_sha256"] == rows[1]["weights_sha256"] and all(r["ranks_in_sync"] for r in rows)
    assert read_meta(find_checkpoint(run))["world"] == 2
    # the autoencoder stage against one process on the same global batches
    ae_run = os.path.join(run, "autoencoder")
    meta = read_meta(find_checkpoint(ae_run))
    assert (meta["world"], meta["step"], meta["images"]) == (2, AE_STEPS, AE_STEPS * 16)
    single = str(tmp_path / "single")
    train(get_config(os.path.join(ae_run, "config.yaml")), single, progress=False, log=lambda *a: None)
    ddp_losses, one_losses = losses(ae_run), losses(single)
    assert len(ddp_losses) == AE_STEPS and len(set(ddp_losses)) > 1
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)
    ddp_weights = load_file(os.path.join(find_checkpoint(ae_run), "model.safetensors"))
    one_weights = load_file(os.path.join(find_checkpoint(single), "model.safetensors"))
    assert ddp_weights.keys() == one_weights.keys()
    moved = max(float((ddp_weights[k] - one_weights[k]).abs().max()) for k in ddp_weights)
    assert moved < 1e-5, moved

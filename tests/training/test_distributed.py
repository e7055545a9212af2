"""Data-parallel training under torchrun (two CPU processes, gloo): every rank ends with the same weights."""
import os
import subprocess
import sys

SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from unifuse.config import get_config
from unifuse.training import train
cfg = get_config("toy-moons", ["train.steps=4", "data.batch=64", "train.log_every=1", "train.ckpt_every=1000",
                               "model.net_options={width: 32, depth: 2, emb_dim: 16, dropout: 0.1}", "data.cond=class",
                               "train.device=cpu"])
s = train(cfg, sys.argv[1], progress=False)
keys = ("rank", "world", "step", "weights_sha256", "ranks_in_sync")
os.write(1, ("RESULT " + json.dumps({k: s[k] for k in keys}) + "\\n").encode())  # one write: ranks print at once
os._exit(0)  # the run has left its group; skip finalisation, where gloo threads can abort a rank (pytorch#179291)
"""


def test_two_processes_keep_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 and r["step"] == 4 for r in results)
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    assert all(r["ranks_in_sync"] for r in results)
    assert os.path.isfile(tmp_path / "run" / "ckpt" / "latest.json")
    meta = json.load(open(next((tmp_path / "run" / "ckpt").glob("step-*/checkpoint.json"))))
    assert meta["world"] == 2 and meta["images"] == 4 * 64

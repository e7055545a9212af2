"""Fine-tuning under torchrun (two CPU processes, gloo): each rank rolls out its own samples, gradients are averaged
(policy-gradient methods backpropagate once per timestep, reward backpropagation through the whole chain), and every
rank ends with the same weights."""
import json
import os
import subprocess
import sys

from unifuse import config as C
from unifuse.training import train

SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from unifuse.finetune.loop import finetune, finetune_config
fast = ["finetune.batch=16", "finetune.steps=4", "finetune.eval_n=16", "finetune.eval_every=0", "train.sample_every=0",
        "train.device=cpu", "train.log_every=1"]
method, options = sys.argv[3], sys.argv[4:]
cfg = finetune_config(sys.argv[1], method, reward="brightness", overrides=fast + options, steps=2)
s = finetune(cfg, sys.argv[2] + "-" + method, progress=False)
keys = ("rank", "world", "step", "weights_sha256", "ranks_in_sync")
os.write(1, ("RESULT " + json.dumps(dict({k: s[k] for k in keys}, method=method)) + "\\n").encode())  # one write
os._exit(0)  # the run has left its group; skip finalisation, where gloo threads can abort a rank (pytorch#179291)
"""


def test_two_processes_fine_tune_to_identical_weights(tmp_path):
    base = str(tmp_path / "base")
    train(C.get_config("toy-moons", ["model.net_options={width: 32, depth: 2, emb_dim: 16}", "data.batch=64",
                                     "train.steps=5", "train.ckpt_every=1000"]), base, progress=False)
    script = tmp_path / "ddp_finetune.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=os.pathsep.join(paths))
    for method, options in (("ddpo", []), ("draft", ["finetune.options={k: null, kl: 0.1}"])):  # one process group each
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), base,
               str(tmp_path / "ft"), method, *options]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["world"] == 2 and r["step"] == 2 for r in rows)
        assert rows[0]["weights_sha256"] == rows[1]["weights_sha256"] and all(r["ranks_in_sync"] for r in rows)

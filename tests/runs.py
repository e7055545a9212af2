"""Small trained runs the loop tests share: the tiny toy-moons config and a digest of a run's latest checkpoint."""
import hashlib
import os

from unifuse.training.checkpoint import find_checkpoint

TINY = ["model.net_options={width: 64, depth: 2, emb_dim: 32}", "data.batch=64", "train.log_every=1",
        "train.ckpt_every=1000", "optim.warmup_steps=2"]


def digest(run) -> dict:
    """SHA-256 of every safetensors file of the run's latest checkpoint (equal digests: bit-identical weights)."""
    folder = find_checkpoint(run)
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}

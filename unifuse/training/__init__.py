"""Training: the straight-line loop, the run folder it writes, checkpoints, EMA and data-parallel helpers.

    from unifuse.config import get_config
    from unifuse.training import train, load_model
    train(get_config("toy-moons", ["train.steps=500"]), "runs/moons")
    model, cfg = load_model("runs/moons")          # EMA weights, ready for uf.sample

`train` also runs autoencoders (model.family "ae") and latent runs (data.latent; `autoencoder.py`, docs/latent.md).
"""
from .autoencoder import train_autoencoder
from .checkpoint import find_checkpoint, load_codec, load_model, read_meta
from .ema import EMA, PowerEMA, posthoc_ema
from .loop import learning_rate, train
from .plots import plot_loss_curve
from .run import Run, TrainingDiverged

__all__ = ["EMA", "PowerEMA", "Run", "TrainingDiverged", "find_checkpoint", "learning_rate", "load_codec",
           "load_model", "plot_loss_curve", "posthoc_ema", "read_meta", "train", "train_autoencoder"]

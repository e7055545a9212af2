"""Training: the straight-line loop, checkpoints, EMA and data-parallel helpers.

    from unifuse.config import get_config
    from unifuse.training import train, load_model
    train(get_config("toy-moons", ["train.steps=500"]), "runs/moons")
    model, cfg = load_model("runs/moons")          # EMA weights, ready for uf.sample
"""
from .checkpoint import find_checkpoint, load_model, read_meta
from .ema import EMA, PowerEMA, posthoc_ema
from .loop import TrainingDiverged, learning_rate, train
from .plots import plot_loss_curve

__all__ = ["train", "load_model", "find_checkpoint", "read_meta", "EMA", "PowerEMA", "posthoc_ema",
           "TrainingDiverged", "learning_rate", "plot_loss_curve"]

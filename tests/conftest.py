import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """A tiny toy-moons run (20 steps), trained once per session: the teacher or base of the post-training loop
    tests (they write their runs elsewhere and never change it)."""
    from unifuse import config as C
    from unifuse.training import train

    from .runs import TINY

    run = str(tmp_path_factory.mktemp("toy") / "run")
    train(C.get_config("toy-moons", TINY + ["train.steps=20"]), run, progress=False)
    return run

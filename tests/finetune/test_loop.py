"""The fine-tuning loop and command: a fine-tuned run from any base run, its config, checkpoints holding a plain
network that `unifuse sample` reads, an exact resume, evaluations over time, and one clear message for each kind of
bad input (a base that is not a run, an unknown method or reward, a NaN loss that stops with the last checkpoint)."""
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from unifuse import config as C
from unifuse import finetune as F
from unifuse.errors import UnifuseError
from unifuse.finetune.loop import finetune, finetune_config
from unifuse.finetune.trajectory import rollout
from unifuse.training import load_model
from unifuse.training.checkpoint import find_checkpoint, read_meta
from unifuse.training.run import TrainingDiverged, read_metrics

from ..runs import digest

FAST = ["finetune.batch=16", "finetune.steps=4", "finetune.eval_n=32", "finetune.eval_every=2", "train.sample_every=0"]


@dataclass
class Push:
    """A test method: DRaFT-1 in a few lines (the reward's gradient through the last rollout step); nan_at makes the
    loss NaN at that step."""

    name: str = "push"
    nan_at: int = -1
    differentiable = True

    def setup(self, ctx) -> None:
        pass

    def step(self, ctx, generator, step) -> dict:
        noise, gens = ctx.draw(ctx.batch)
        r = rollout(ctx.policy, noise, ctx.grid(), generator=gens, grad_last=1)
        reward = ctx.reward(r.x0, {})
        loss = -reward.mean() * (math.nan if step == self.nan_at else 1.0)
        ctx.update(loss)
        return {"loss": float(loss.detach()), "reward": float(reward.mean())}


@pytest.fixture
def push(monkeypatch):
    monkeypatch.setitem(F.METHODS, "push", ("loop", "Push"))
    monkeypatch.setattr("unifuse.finetune.loop.Push", Push, raising=False)
    return Push


@pytest.fixture
def base(toy_run):
    return toy_run


def test_a_finetuned_run_is_a_plain_run_with_evaluations(base, push, tmp_path):
    cfg = finetune_config(base, "push", reward="brightness", overrides=FAST, steps=4)
    assert cfg.finetune.method == "push" and cfg.finetune.base == base and cfg.sample == C.from_dict(
        read_meta(find_checkpoint(base))["config"]).sample  # the base's sampler settings
    out = str(tmp_path / "ft")
    summary = finetune(cfg, out, progress=False)
    assert summary["step"] == 4 and summary["reward"] is not None
    evals = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert evals[-1]["kl"] > 0 and all("swd" in r and r["cpu_s"] >= 0 for r in evals)
    assert evals[-1]["reward"] > evals[0]["reward"]  # brightness: the points move up and right
    _, loaded = load_model(out)  # the plain network, like any run
    assert loaded.finetune.reward == "brightness" and os.path.isfile(os.path.join(out, "reward.png"))
    r = subprocess.run([sys.executable, "-m", "unifuse.cli", "sample", "--ckpt", out, "--out", str(tmp_path / "s"),
                        "--n", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_resume_continues_exactly(base, push, tmp_path):
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    finetune(finetune_config(base, "push", reward="brightness", overrides=FAST, steps=4), straight, progress=False)
    finetune(finetune_config(base, "push", reward="brightness", overrides=FAST, steps=2), resumed, progress=False)
    finetune(finetune_config(base, "push", reward="brightness", overrides=FAST, steps=4), resumed, resume=resumed,
             progress=False)
    assert digest(straight) == digest(resumed)


def test_lora_trains_adapters_and_exports_merged_weights(base, push, tmp_path):
    pytest.importorskip("peft")
    out = str(tmp_path / "lora")
    finetune(finetune_config(base, "push", reward="brightness", overrides=FAST + ["finetune.lora_rank=4"], steps=3),
             out, progress=False)
    folder = find_checkpoint(out)
    base_model, _ = load_model(base)
    model, _ = load_model(out)  # loads into the plain architecture: the adapters are merged
    x, t = torch.randn(8, 2), torch.full((8,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(model.denoise(x, t * model.path.t_max), base_model.denoise(x, t * model.path.t_max))
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as fh:  # what a resume restores: the adapters
        assert any("lora" in k for k in fh.keys())  # noqa: SIM118
    with safe_open(os.path.join(folder, "ema.safetensors"), "pt") as fh:  # what sampling loads: plain weights
        assert not any("lora" in k for k in fh.keys())  # noqa: SIM118


def test_a_nan_loss_stops_with_the_last_checkpoint_intact(base, push, tmp_path):
    out = str(tmp_path / "nan")
    cfg = finetune_config(base, "push", reward="brightness", overrides=FAST + ["train.ckpt_every=2",
                                                                               "finetune.options={nan_at: 3}"], steps=6)
    with pytest.raises(TrainingDiverged, match="step 3"):
        finetune(cfg, out, progress=False)
    assert read_meta(find_checkpoint(out))["step"] == 2
    load_model(out)


def test_bad_input_is_one_clear_message(base, push, tmp_path, monkeypatch):
    with pytest.raises(UnifuseError, match="is not a trained run"):
        finetune_config(str(tmp_path / "nothing"), "push", reward="brightness")
    with pytest.raises(UnifuseError, match="fine-tuning method"):
        finetune_config(base, "no-such-method", reward="brightness")
    with pytest.raises(UnifuseError, match="reward"):
        finetune_config(base, "push", reward="no-such-reward")
    with pytest.raises(UnifuseError, match="finetune.steps must be >= 2"):
        finetune_config(base, "push", reward="brightness", overrides=["finetune.steps=1"])
    cli = [sys.executable, "-m", "unifuse.cli", "finetune", "ddpo", "--base", str(tmp_path / "nothing"), "--reward",
           "brightness", "--out", str(tmp_path / "x"), "--steps", "1"]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr

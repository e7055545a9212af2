"""The distillation loop and command: a student run from any teacher run, its config and checkpoints, an exact
resume, per-NFE weights and the student's NFE check, and one clear message for each kind of bad input."""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from unifuse import distill as D
from unifuse.distill.base import Context, frozen_copy
from unifuse.distill.loop import distill, distill_config, supported_nfe
from unifuse.errors import UnifuseError
from unifuse.training import load_model
from unifuse.training.checkpoint import find_checkpoint, read_meta

from ..runs import digest


@dataclass
class Regress:
    """A test method: the student's x0 regressed on the teacher's at random times, on the path `student_path`;
    with `rounds` it keeps per-NFE snapshots the way progressive distillation does."""

    name: str = "regress"
    student_path: str | None = "trigflow"
    student_prediction: str | None = None
    sampler: str = "consistency"
    spacing: str = ""
    nfe: tuple | None = None
    rounds: bool = False

    def setup(self, ctx: Context) -> None:
        if self.rounds:
            self.nfe = (2, 1)
            for k in self.nfe:
                ctx.add_net(f"nfe_{k}", frozen_copy(ctx.student_net))

    def snapshots(self, ctx) -> dict:
        return {k: ctx.nets[f"nfe_{k}"] for k in (self.nfe or ()) if f"nfe_{k}" in ctx.nets}

    def loss(self, ctx, x, cond, *, generator, step):
        p = ctx.student.path
        t = p.t_eps + (p.t_max - p.t_eps) * 0.98 * torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=generator)
        x_t = p.interpolate(x, noise, t).float()
        with torch.no_grad():
            target = ctx.teacher.denoise(x_t, t, **cond)
        return (ctx.student.denoise(x_t, t, **cond) - target).pow(2).flatten(1).mean(1)


@pytest.fixture
def regress(monkeypatch):
    monkeypatch.setitem(D.METHODS, "regress", ("loop", "Regress"))
    monkeypatch.setattr("unifuse.distill.loop.Regress", Regress, raising=False)
    return Regress


@pytest.fixture
def teacher(toy_run):
    return toy_run


def test_student_config_carries_the_method_and_loads_on_its_path(teacher, regress, tmp_path):
    cfg = distill_config(teacher, "regress", ["train.log_every=1"], steps=4)
    assert cfg.distill.method == "regress" and cfg.distill.student_path == "trigflow"
    assert cfg.sample.sampler == "consistency" and cfg.model.prediction == "edm"
    summary = distill(cfg, str(tmp_path / "s"), progress=False)
    assert summary["step"] == 4 and os.path.isfile(tmp_path / "s" / "samples" / "final.png")
    model, loaded = load_model(str(tmp_path / "s"))
    assert type(model.path).__name__ == "TrigFlow" and loaded.distill.method == "regress"
    assert read_meta(find_checkpoint(str(tmp_path / "s")))["student"]["method"] == "regress"


def test_resume_continues_exactly(teacher, regress, tmp_path):
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    distill(distill_config(teacher, "regress", steps=6), straight, progress=False)
    distill(distill_config(teacher, "regress", steps=3), resumed, progress=False)
    distill(distill_config(teacher, "regress", steps=6), resumed, resume=resumed, progress=False)
    assert digest(straight) == digest(resumed)


def test_per_nfe_weights_and_the_nfe_check(teacher, regress, tmp_path):
    cfg = distill_config(teacher, "regress", ["distill.options={rounds: true, nfe: [2, 1]}"], steps=2)
    assert supported_nfe(cfg) == (2, 1)
    distill(cfg, str(tmp_path / "s"), progress=False)
    assert {"nfe_1.safetensors", "nfe_2.safetensors"} <= set(digest(str(tmp_path / "s")))
    load_model(str(tmp_path / "s"), nfe=2)
    with pytest.raises(UnifuseError, match="samples with --nfe in 2, 1, not 4"):
        load_model(str(tmp_path / "s"), nfe=4)


def test_bad_input_is_one_clear_message(teacher, regress, tmp_path):
    with pytest.raises(UnifuseError, match="is not a trained run"):
        distill_config(str(tmp_path / "nothing"), "regress")
    with pytest.raises(UnifuseError, match="distillation method"):
        distill_config(teacher, "no-such-method")
    student = str(tmp_path / "s")
    distill(distill_config(teacher, "regress", steps=1), student, progress=False)
    with pytest.raises(UnifuseError, match="itself a distilled student"):
        distill_config(student, "regress")
    cli = [sys.executable, "-m", "unifuse.cli", "distill", "regress", "--teacher", str(tmp_path / "nothing"),
           "--out", str(tmp_path / "x"), "--steps", "1"]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_rebind_computes_what_the_student_computes_on_another_path():
    """A copy of a re-expressed student's network (a round's teacher, a target, a fake score) bound by `rebind`
    is the same function: the time input and input scaling of the source path are kept (an EDM network on TrigFlow)."""
    import copy

    import unifuse as uf
    from unifuse.distill.base import rebind
    from unifuse.nets import build_net

    torch.manual_seed(0)
    net = build_net("mlp-toy", dim=2, width=32, depth=2)
    edm = uf.paths.get("edm")
    student = uf.DiffusionModel(net, edm, "edm", time_input=edm.c_noise, scale_input=True).on(
        uf.paths.get("trigflow", sigma_d=0.5))
    twin = rebind(student, copy.deepcopy(net))
    x, t = torch.randn(16, 2), torch.rand(16, dtype=torch.float64) * 1.5 + 0.01
    with torch.no_grad():
        assert torch.equal(twin.denoise(x, t), student.denoise(x, t))

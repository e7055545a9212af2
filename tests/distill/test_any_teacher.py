"""Distillation targets do not depend on the teacher's family: the same exact Gaussian mixture as a DDPM eps-teacher
(ddpm-linear), a VP-cosine eps-teacher and a rectified-flow velocity teacher, each re-expressed on the student's path
with `.on(path)`, gives the same progressive target, the same CD targets (Heun and Euler) and the same TrigFlow
velocity (what sCD reads) as the oracle written natively on that path, for the same draws of (x, noise, t)."""
import pytest
import torch

import unifuse as uf
from unifuse.distill import Context
from unifuse.distill.consistency import ConsistencyDistillation
from unifuse.distill.progressive import ProgressiveDistillation
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture([0.4, 0.6], [[0.8, -0.4], [-0.6, 0.5]], [[0.3, 0.2], [0.25, 0.4]])
STUDENT_PATH = "ddpm-linear"  # its noise range [0.01, 157] in sigma_edm lies inside every teacher's
TEACHERS = {"ddpm-eps": ("ddpm-linear", "eps"), "vp-cosine-eps": ("vp-cosine", "eps"), "rf-velocity": ("rf", "velocity")}


def teachers(path):
    """name -> the oracle in that family re-expressed on `path`; "native" is the oracle written on `path`."""
    out = {name: GM.model(uf.paths.get(p), kind).on(path) for name, (p, kind) in TEACHERS.items()}
    out["native"] = GM.model(path, "x0")
    return out


def data(n=128, seed=0):
    return GM.sample(n, torch.Generator().manual_seed(seed))[0]


def assert_all_equal(results: dict, atol=1e-10):  # measured: <= 6e-14
    ref = results.pop("native")
    for name, value in results.items():
        torch.testing.assert_close(value, ref, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_progressive_target_is_the_same_for_every_teacher(spacing):
    path = uf.paths.get(STUDENT_PATH)
    student = GM.model(path, "v")
    method = ProgressiveDistillation(start_steps=8, spacing=spacing)
    x = data()
    for steps in (8, 2, 1):
        g = lambda: torch.Generator().manual_seed(steps)  # the same draws for every teacher
        assert_all_equal({name: method.target(teacher, student, x, steps, {}, g())[2]
                          for name, teacher in teachers(path).items()})


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_cd_targets_are_the_same_for_every_teacher(solver):
    path = uf.paths.get(STUDENT_PATH)
    student = GM.model(path, "x0")
    method = ConsistencyDistillation(steps=18, solver=solver, sigma_min=0.02, sigma_max=80.0)
    x = data()
    results = {}
    for name, teacher in teachers(path).items():
        ctx = Context(teacher=teacher, student=student, student_net=student.net, ema=None, info={"shape": [2]},
                      device=torch.device("cpu"), run_dir="/tmp")
        results[name] = method.pair(ctx, x, {}, torch.Generator().manual_seed(7)).x_hat
    assert_all_equal(results)


def test_trigflow_velocity_is_the_same_for_every_teacher():
    """sCD's teacher tangent dx_t/dt on TrigFlow (sigma_d = 0.5), at noise levels inside every teacher's range."""
    path = uf.paths.get("trigflow")
    g = torch.Generator().manual_seed(3)
    x = data()
    t = 0.05 + 1.35 * torch.rand(x.shape[0], generator=g, dtype=F64)
    x_t = path.interpolate(x, torch.randn(x.shape, generator=g, dtype=F64), t)
    assert_all_equal({name: m.predict(x_t, t, "velocity") for name, m in teachers(path).items()})

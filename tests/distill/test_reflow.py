"""Reflow and InstaFlow (card 14) against the exact Gaussian teacher: the pairs are the teacher's ODE endpoints,
they are written once and stay coupled, and the 2-RF field fitted on them is the card's straight field."""
import hashlib
import json
import math
import os

import pytest
import torch

import unifuse as uf
from unifuse.distill import Context, get
from unifuse.distill.reflow import (
    InstaFlow,
    Reflow,
    coupled_target,
    load_or_make_pairs,
    make_pairs,
    one_step,
    pair_batch,
    pair_noise,
    rand_u_shaped,
    start_noise,
    teacher_start,
)
from unifuse.errors import UnifuseError
from unifuse.metrics.toy import sliced_wasserstein
from unifuse.model import DiffusionModel
from unifuse.nets.mlp import MLP
from unifuse.testing import GaussianMixture

F64 = torch.float64
M = torch.tensor([[1.0, -0.5]], dtype=F64)
S = torch.tensor([[0.5, 1.5]], dtype=F64)
RF = uf.paths.get("rf")


def gaussian():
    return GaussianMixture([1.0], M, S)


def teacher_on_rf(name: str):
    gm = gaussian()
    return gm.model(RF, "velocity") if name == "rf" else gm.model(uf.paths.get(name), "x0").on(RF)


def context(teacher, student, net, tmp_path, seed=0):
    return Context(teacher=teacher, student=student, student_net=net, ema=None,
                   info={"shape": [2], "is_image": False}, device=torch.device("cpu"), run_dir=str(tmp_path), seed=seed)


def u2(x, t):
    """Card 14: the 2-RF velocity on the exact coupling x0 = m + s z."""
    t = t.reshape(-1, 1)
    e = (x - (1 - t) * M) / ((1 - t) * S + t)
    return (1 - S) * e - M


class FieldNet(torch.nn.Module):
    """An exact velocity network u(x, t) (prediction "velocity" on RF)."""

    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, x, t):
        return self.field(x.to(F64), t.to(F64))


def test_teacher_start_on_rf():
    """EDM's sigma_max 80 is RF time 80/81 with prior scale 80/81; an RF teacher starts at t = 1 with scale 1."""
    t, prior = teacher_start(teacher_on_rf("edm"))
    assert abs(t - 80 / 81) < 1e-12 and abs(prior - 80 / 81) < 1e-12
    assert teacher_start(teacher_on_rf("rf")) == (1.0, 1.0)


@pytest.mark.parametrize("name", ["rf", "edm", "vp-cosine", "ddpm-linear"])
def test_pairs_are_teacher_ode_endpoints(name):
    """data_j = exact PF-ODE map of the teacher's start (t*, t* z_j) to the data end, to the solver's error."""
    teacher = teacher_on_rf(name)
    t_star, prior = teacher_start(teacher)
    noise, data = make_pairs(teacher, [2], 256, seed=3, solver="unipc", nfe=64, dtype=F64)
    exact = gaussian().pf_ode_map(prior * noise, 1 - t_star, t_star, 1.0, 0.0)
    assert float((data - exact).abs().max()) < 2e-3           # the default solver: 1e-4 .. 9e-4 measured
    if name in ("rf", "edm"):
        _, fine = make_pairs(teacher, [2], 256, seed=3, solver="adaptive", nfe=2000, dtype=F64)
        assert float((fine - exact).abs().max()) < 2e-5
    if name == "rf":  # card 14: the 1-RF ODE coupling of N(m, s^2) is x0 = m + s z exactly
        assert float((fine - (M + S * noise)).abs().max()) < 2e-5


def test_pair_line_meets_the_students_start():
    """With an EDM teacher the student (its network on RF) starts at t_s = 80/81 from t_s z: the pair's line
    passes exactly there, its velocity carries (t_s, t_s z) to x0 in one Euler step, and training times stay <= t_s."""
    student = teacher_on_rf("edm")
    t_s = 80 / 81
    z, x0 = torch.randn(64, 2, dtype=F64), torch.randn(64, 2, dtype=F64)
    noise = start_noise(student, z, x0)
    assert torch.allclose(noise, z - x0 / 80, atol=1e-14, rtol=0)
    x_s, u = coupled_target(RF, noise, x0, torch.full((64,), t_s, dtype=F64))
    assert float((x_s - t_s * z).abs().max()) < 1e-14
    assert float((x_s - t_s * u - x0).abs().max()) < 1e-14
    assert torch.equal(start_noise(teacher_on_rf("rf"), z, x0), z)
    for time in ("uniform", "u_shaped"):
        t = Reflow(time=time).sample_time(10_000, student, torch.Generator().manual_seed(0))
        assert float(t.max()) <= t_s and float(t.min()) >= float(student.t_eps) and float(t.max()) > 0.95 * t_s


def test_pair_noise_depends_only_on_seed():
    teacher = teacher_on_rf("edm")
    a = make_pairs(teacher, [2], 50, seed=7, nfe=8, batch=7, dtype=F64)
    b = make_pairs(teacher, [2], 50, seed=7, nfe=8, batch=512, dtype=F64)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-12, rtol=0)
    assert torch.equal(a[0][10:20], pair_noise(7, 10, 10, [2], F64))
    assert not torch.equal(a[0], make_pairs(teacher, [2], 50, seed=8, nfe=8, dtype=F64)[0])


def _digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_pairs_written_once_and_reused(tmp_path):
    net = MLP(dim=2, width=16, depth=1, emb_dim=16)
    teacher = teacher_on_rf("edm")
    ctx = context(teacher, DiffusionModel(net, RF, "velocity"), net, tmp_path)
    first = Reflow(pairs=40, solver_nfe=32)
    first.setup(ctx)
    file = os.path.join(tmp_path, "pairs.safetensors")
    stamp, digest = os.stat(file).st_mtime_ns, _digest(file)
    with open(os.path.join(tmp_path, "pairs.json")) as fh:
        sidecar = json.load(fh)
    second = Reflow(pairs=40, solver_nfe=32)
    second.setup(ctx)
    assert os.stat(file).st_mtime_ns == stamp and _digest(file) == digest
    assert torch.equal(first.store["noise"], second.store["noise"]) and torch.equal(first.store["data"], second.store["data"])
    # coupled and in (noise, data) order: the noise is pair j's own draw, the data its teacher ODE endpoint
    assert torch.equal(first.store["noise"], pair_noise(0, 0, 40, [2]))
    t_star, prior = teacher_start(teacher)
    exact = gaussian().pf_ode_map(prior * first.store["noise"].to(F64), 1 - t_star, t_star, 1.0, 0.0)
    assert float((first.store["data"] - exact).abs().max()) < 5e-3   # 32 NFE
    assert sidecar["solver"] == "unipc" and sidecar["nfe"] == 32 and sidecar["count"] == 40
    assert sidecar["order"] == ["noise", "data"]
    with pytest.raises(UnifuseError, match="nfe"):
        Reflow(pairs=40, solver_nfe=64).setup(ctx)
    other = context(teacher_on_rf("rf"), ctx.student, net, tmp_path)
    with pytest.raises(UnifuseError, match="teacher"):
        load_or_make_pairs(other, count=40, seed=0, solver="unipc", nfe=32)
    assert _digest(file) == digest


def test_pair_batch_keeps_pairs_coupled():
    noise = torch.randn(100, 2, dtype=F64)
    pairs = {"noise": noise, "data": 2 * noise + 1}
    z, x = pair_batch(pairs, 500, torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(x, 2 * z + 1)


def test_2rf_field_on_exact_pairs():
    """Card 14: on x0 = m + s z the reflow target z - x0 at x_t is u2(x_t, t); its paths are straight and one Euler
    step from t = 1 gives m + s z, while one Euler step of the 1-RF teacher gives m for every input."""
    z = torch.randn(300, 2, dtype=F64)
    t = torch.rand(300, dtype=F64)
    x_t, target = coupled_target(RF, z, M + S * z, t)
    assert float((target - u2(x_t, t)).abs().max()) < 1e-12
    for tt in (0.1, 0.5, 0.9):  # the field is constant along each straight path
        x_tt = (1 - tt) * (M + S * z) + tt * z
        assert float((u2(x_tt, torch.full((300,), tt, dtype=F64)) - target).abs().max()) < 1e-12
    student = DiffusionModel(FieldNet(u2), RF, "velocity")
    assert float((one_step(student, z) - (M + S * z)).abs().max()) < 1e-12
    assert float((one_step(teacher_on_rf("rf"), z) - M).abs().max()) < 1e-12


def test_2rf_field_on_solved_pairs():
    """The reflow target on the stored pairs (adaptive solve) equals u2 to the solver's error."""
    teacher = teacher_on_rf("rf")
    noise, data = make_pairs(teacher, [2], 256, seed=0, solver="adaptive", nfe=2000, dtype=F64)
    t = torch.rand(256, dtype=F64)
    x_t, target = coupled_target(RF, noise, data, t)
    assert float((target - u2(x_t, t)).abs().max()) < 1e-4


def test_losses_vanish_at_the_2rf_optimum(tmp_path):
    """Reflow's loss is 0 for a student whose velocity is u2, and so is InstaFlow's one-step loss."""
    net = FieldNet(u2)
    ctx = context(teacher_on_rf("rf"), DiffusionModel(net, RF, "velocity"), net, tmp_path)
    z = pair_noise(0, 0, 128, [2], F64)
    gen = torch.Generator().manual_seed(0)
    for method in (Reflow(), InstaFlow()):
        method.store = {"noise": z, "data": M + S * z}
        for progress in (0.0, 0.9):
            ctx.progress = progress
            loss = method.loss(ctx, torch.zeros(64, 2, dtype=F64), {}, generator=gen, step=0)
            assert loss.shape == (64,) and float(loss.max()) < 1e-20


def test_u_shaped_density():
    """rfpp's law: P(t < c) = (sinh(a (c - 1/2)) + sinh(a/2)) / (2 sinh(a/2))."""
    t = rand_u_shaped(200_000, 4.0, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    for c in (0.1, 0.3, 0.5):
        want = (math.sinh(4 * (c - 0.5)) + math.sinh(2)) / (2 * math.sinh(2))
        assert abs(float((t < c).double().mean()) - want) < 5e-3


def test_registry_and_options():
    r, i = get("reflow"), get("instaflow", reflow_fraction=0.3)
    assert (r.student_path, r.student_prediction, r.sampler, r.nfe) == ("rf", None, "euler", None)
    assert isinstance(i, InstaFlow) and i.reflow_fraction == 0.3 and i.nfe == (1,)
    with pytest.raises(UnifuseError):
        get("reflow", time="logit")


def _train(method, ctx, steps, lr=3e-3, batch=256):
    opt = torch.optim.Adam(ctx.student_net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(batch, 2)
    for k in range(steps):
        ctx.progress = k / steps
        loss = method.loss(ctx, x, {}, generator=gen, step=k)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return loss


def _euler_samples(model, z, k):
    return uf.sample(model, z, sampler="euler", nfe=k, spacing="uniform")


def test_reflow_end_to_end(tmp_path):
    """A tiny MLP 2-RF trained on the teacher's pairs samples far better in one Euler step than the 1-RF teacher."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=64, depth=2, emb_dim=32)
    teacher = teacher_on_rf("rf")
    ctx = context(teacher, DiffusionModel(net, RF, "velocity"), net, tmp_path)
    method = Reflow(pairs=2048, solver_nfe=32)
    method.setup(ctx)
    loss = _train(method, ctx, 300)
    assert torch.isfinite(loss).all()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    target = gaussian().sample(2000, generator=torch.Generator().manual_seed(6))[0].float()
    with torch.no_grad():
        sw_student = sliced_wasserstein(_euler_samples(ctx.student, z, 1), target)
        sw_teacher = sliced_wasserstein(_euler_samples(teacher, z.double(), 1), target)
    print(f"reflow SW at 1 Euler step: 2-RF student {sw_student:.4f}, 1-RF teacher {sw_teacher:.4f}")
    assert sw_student < 0.25 * sw_teacher


def test_instaflow_end_to_end(tmp_path):
    """Both phases backpropagate into the student; the distilled one-step student is close to the data."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=64, depth=2, emb_dim=32)
    ctx = context(teacher_on_rf("rf"), DiffusionModel(net, RF, "velocity"), net, tmp_path)
    method = InstaFlow(pairs=2048, solver_nfe=32)
    method.setup(ctx)
    ctx.progress = 0.8
    loss = method.loss(ctx, torch.zeros(8, 2), {}, generator=torch.Generator().manual_seed(0), step=0)
    loss.mean().backward()
    assert ctx.scalars["phase"] == 1 and all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.zero_grad()
    _train(method, ctx, 400)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    target = gaussian().sample(2000, generator=torch.Generator().manual_seed(6))[0].float()
    with torch.no_grad():
        sws = {k: sliced_wasserstein(_euler_samples(ctx.student, z, k), target) for k in (1, 2, 4)}
        sw_teacher = sliced_wasserstein(_euler_samples(ctx.teacher, z.double(), 1), target)
    print("instaflow SW at 1/2/4 Euler steps:", {k: round(v, 4) for k, v in sws.items()}, "teacher@1", round(sw_teacher, 4))
    assert sws[1] < 0.25 * sw_teacher

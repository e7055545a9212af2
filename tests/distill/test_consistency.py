"""Consistency distillation and fine-tuning (cards 16-17) against the exact oracle: the CD target is one teacher
Euler/Heun step, the CT target is an Euler step with the single-sample denoiser, the exact consistency function's
per-step discrepancy under the exact Heun teacher is third order, the boundary condition holds, and tiny MLPs
distilled from the oracle move toward the data."""
import itertools
import math

import pytest
import torch

import unifuse as uf
from unifuse.distill import Context, get
from unifuse.distill.consistency import ConsistencyDistillation, ConsistencyFineTuning, sigma_range
from unifuse.errors import UnifuseError
from unifuse.nets.mlp import MLP
from unifuse.objectives import ConsistencyTrainingLoss
from unifuse.parameterization import coefficients
from unifuse.parameterization.precond import consistency_scalings
from unifuse.samplers import step_euler, step_heun
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture([0.4, 0.6], [[0.8, -0.4], [-0.6, 0.5]], [[0.3, 0.2], [0.25, 0.4]])
ONE = GaussianMixture.gaussian([0.5, -0.3], [0.4, 0.6])
SOLVER = {"heun": step_heun, "euler": step_euler}


def context(teacher, student, net=None):
    net = net if net is not None else torch.nn.Linear(1, 1)
    return Context(teacher=teacher, student=student, student_net=net, ema=None, info={"shape": [2], "is_image": False},
                   device=torch.device("cpu"), run_dir="/tmp")


def data(n=64, seed=0):
    return GM.sample(n, torch.Generator().manual_seed(seed))[0]


def exact_consistency(gm, path, sigma_min):
    """f*(x_t, t): the exact PF-ODE map of one Gaussian to sigma_edm = sigma_min (GAUSSIAN_ORACLE 4)."""

    def net(x, t):
        a, s = path.alpha(t), path.sigma(t)
        return gm.pf_ode_map(x, a, s, torch.ones_like(a), torch.full_like(s, sigma_min))

    return uf.DiffusionModel(net, path, "x0")


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("path_name,kind", [("edm", "edm"), ("vp-cosine", "v"), ("rf", "velocity")])
def test_cd_target_is_one_teacher_step(solver, path_name, kind):
    path = uf.paths.get(path_name)
    teacher = GM.model(path, kind)
    method = ConsistencyDistillation(steps=12, solver=solver)
    ctx = context(teacher, teacher)
    x = data()
    p = method.pair(ctx, x, {}, torch.Generator().manual_seed(4))
    # the draws: n ~ U{0..N-2}, then standard normal noise, from the one generator
    g = torch.Generator().manual_seed(4)
    n = torch.randint(0, 11, (64,), generator=g)
    noise = torch.randn(x.shape, generator=g, dtype=F64)
    sig, ts = method.grid(ctx)
    assert torch.equal(p.t_next, ts[n + 1]) and torch.equal(p.t_now, ts[n]) and torch.equal(p.gap, sig[n + 1] - sig[n])
    torch.testing.assert_close(path.sigma_edm(p.t_next), sig[n + 1], rtol=1e-12, atol=0)
    torch.testing.assert_close(p.x_next, path.interpolate(x, noise, ts[n + 1]), rtol=0, atol=0)
    torch.testing.assert_close(p.x_hat, SOLVER[solver](teacher, p.x_next, p.t_next, p.t_now), rtol=0, atol=0)
    lo, hi = sigma_range(ctx, None, None)
    assert float(sig[0]) == lo and abs(float(sig[-1]) - hi) < 1e-12 and hi == 80.0


@pytest.mark.parametrize("path_name", ["edm", "rf"])
def test_ct_target_is_an_euler_step_with_the_single_sample_denoiser(path_name):
    """x_n = x + t_n z is one Euler step from x_{n+1} = x + t_{n+1} z with the denoiser returning x (card 16)."""
    path = uf.paths.get(path_name)
    x = data(256)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    single = uf.DiffusionModel(lambda x_in, t: x, path, "x0")
    sig = uf.paths.grids.karras_sigmas(18, 0.002, 80.0 if path_name == "edm" else 50.0)
    i = torch.randint(0, 17, (256,), generator=torch.Generator().manual_seed(2))
    t_next, t_now = path.t_from_sigma_edm(sig[i + 1]), path.t_from_sigma_edm(sig[i])
    x_next = path.interpolate(x, z, t_next)
    torch.testing.assert_close(step_euler(single, x_next, t_next, t_now), path.interpolate(x, z, t_now),
                               rtol=0, atol=1e-12)


def test_heun_discrepancy_of_the_exact_consistency_function_is_third_order():
    """|f*(x_{n+1}, t_{n+1}) - f*(Heun(x_{n+1}), t_n)| with the exact teacher falls as h^3 (Euler: h^2)."""
    path = uf.paths.get("edm")
    teacher, f = ONE.model(path, "edm"), exact_consistency(ONE, path, 0.002)
    x = ONE.sample(512, torch.Generator().manual_seed(0))[0]
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = 2.0
    x_next = path.interpolate(x, z, s)
    orders = {}
    for name, step in SOLVER.items():
        err = []
        for h in (0.2, 0.1, 0.05, 0.025, 0.0125):
            x_hat = step(teacher, x_next, s, s - h)
            err.append(float((f.denoise(x_next, s) - f.denoise(x_hat, s - h)).abs().mean()))
        orders[name] = [math.log2(a / b) for a, b in itertools.pairwise(err)]
    assert all(abs(o - 3) < 0.1 for o in orders["heun"][2:]), orders
    assert all(abs(o - 2) < 0.1 for o in orders["euler"][2:]), orders


def test_cd_loss_of_the_exact_consistency_function_vanishes_as_the_grid_refines():
    """The CD loss (l2, lambda = 1) of f* with the exact Heun teacher is its mean squared per-step discrepancy:
    O(h^6), so doubling N divides it by roughly 2^6 (the sum over the grid is O(h^5) -> 0)."""
    path = uf.paths.get("edm")
    ctx = context(ONE.model(path, "edm"), exact_consistency(ONE, path, 0.002))
    x = ONE.sample(2048, torch.Generator().manual_seed(0))[0]
    losses = []
    for steps in (20, 40, 80):
        method = ConsistencyDistillation(steps=steps, metric="l2", weighting="uniform")
        losses.append(float(method.loss(ctx, x, {}, generator=torch.Generator().manual_seed(1)).mean()))
    assert losses[0] < 1e-4 and losses[1] < losses[0] / 20 and losses[2] < losses[1] / 20, losses


def test_boundary_condition_of_the_consistency_student():
    method = ConsistencyDistillation()
    assert method.student_kind("edm") == "consistency" and method.student_kind("v") is None
    assert ConsistencyFineTuning().student_kind("edm") == "consistency"
    assert get("progressive").student_kind("edm") is None
    path = uf.paths.get("edm")
    net = MLP(dim=2, width=16, depth=1).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    student = uf.DiffusionModel(net, path, "consistency")
    eps = student.boundary
    assert eps == 0.002
    k_skip, k_out = consistency_scalings(coefficients(path, torch.tensor([eps], dtype=F64), torch.zeros(1, 2, dtype=F64)),
                                         0.5, eps)
    assert float(k_skip) == 1.0 and float(k_out) == 0.0
    sig, ts = method.grid(context(GM.model(path, "edm"), student, net))
    x = data(8)
    assert float(sig[0]) == eps
    torch.testing.assert_close(student.denoise(x, ts[:1].expand(8)), x, rtol=0, atol=1e-15)  # f(x, sigma_1) = x
    assert float((student.denoise(x, ts[1:2].expand(8)) - x).detach().abs().max()) > 1e-6


def test_target_network_options_and_dropout():
    """target_ema > 0: theta^- <- mu theta^- + (1 - mu) theta before each loss; a dropout student sees the same
    masks online and in the target (a net returning its dropout mask gives exactly zero loss)."""
    path = uf.paths.get("edm")
    net = MLP(dim=2, width=16, depth=1).double()
    ctx = context(GM.model(path, "edm"), uf.DiffusionModel(net, path, "consistency"), net)
    method = ConsistencyDistillation(target_ema=0.75)
    method.setup(ctx)
    start = [p.clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    method.loss(ctx, data(), {}, generator=torch.Generator().manual_seed(0))
    for p0, p_t in zip(start, ctx.nets["cd_target"].parameters()):
        torch.testing.assert_close(p_t, p0 + 0.25, rtol=0, atol=1e-14)

    class Mask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(torch.ones_like(x))

    mask = Mask().train()
    student = uf.DiffusionModel(mask, path, "x0")
    loss = ConsistencyDistillation(metric="l2").loss(context(GM.model(path, "edm"), student, mask), data(), {},
                                                       generator=torch.Generator().manual_seed(0))
    assert float(loss.abs().max()) == 0.0
    with pytest.raises(UnifuseError):
        ConsistencyDistillation(solver="rk4")


def test_cft_is_the_ect_objective_with_stages_over_the_budget():
    path = uf.paths.get("edm")
    net = MLP(dim=2, width=16, depth=1).double()
    student = uf.DiffusionModel(net, path, "consistency")
    ctx = context(GM.model(path, "edm"), student, net)
    ctx.total_steps = 1000
    method = ConsistencyFineTuning(stages=4)
    method.setup(ctx)
    assert [method.stage(p) for p in (0.0, 0.24, 0.25, 0.7, 1.0)] == [0, 0, 1, 2, 3]
    x = data(128)
    for progress, stage in ((0.1, 0), (0.6, 2)):
        ctx.progress = progress
        got = method.loss(ctx, x, {}, generator=torch.Generator().manual_seed(3))
        ref = ConsistencyTrainingLoss(schedule="ect", stage_every=1)(student, x, generator=torch.Generator().manual_seed(3),
                                                                      step=stage)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert ctx.scalars["stage"] == stage


def w2(gm, y):
    return float(((y.mean(0) - gm.means[0]) ** 2 + (y.std(0) - gm.stds[0]) ** 2).sum().sqrt())


def train(method, ctx, steps, batch=128, lr=1e-3):
    gm = ONE_TRAIN
    opt = torch.optim.Adam(ctx.student_net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        ctx.progress = k / steps
        loss = method.loss(ctx, gm.sample(batch, g)[0].float(), {}, generator=g, step=k)
        assert loss.shape == (batch,) and bool(torch.isfinite(loss).all())
        opt.zero_grad()
        loss.mean().backward()
        if k == 0:
            assert sum(float(p.grad.abs().sum()) for p in ctx.student_net.parameters()) > 0
        opt.step()


ONE_TRAIN = GaussianMixture.gaussian([1.0, -0.5], [0.5, 0.3])


@pytest.mark.parametrize("name,nfe,steps,limit", [("cd", 2, 150, 0.25), ("cft", 1, 200, 0.6)])
def test_end_to_end_tiny_mlp_moves_toward_the_data(name, nfe, steps, limit):
    """From the exact EDM teacher, a tiny MLP student (boundary scalings) sampled with "consistency" at `nfe`
    approaches the Gaussian data (W2 of moment-matched Gaussians; at initialisation it returns 0)."""
    torch.manual_seed(0)
    path = uf.paths.get("edm")
    net = MLP(dim=2, width=64, depth=2)
    ctx = context(ONE_TRAIN.model(path, "edm"), uf.DiffusionModel(net, path, "consistency"), net)
    ctx.total_steps = steps
    method = get(name)
    method.setup(ctx)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    sample = lambda: uf.sample(ctx.student, noise, method.sampler, nfe=nfe)
    before = w2(ONE_TRAIN, sample())
    train(method, ctx, steps)
    after = w2(ONE_TRAIN, sample())
    print(f"{name}: W2 before {before:.4f} after {after:.4f}")
    assert after < limit * before, (before, after)

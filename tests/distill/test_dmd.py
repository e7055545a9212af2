"""DMD / DMD2 (cards 19-20) against exact Gaussian scores: the surrogate's gradient, the distribution-matching
gradient of a linear generator (post-training.md section 3, check 5), the generator's grid, and a 2-D run."""
import numpy as np
import pytest
import torch

import unifuse as uf
from unifuse.distill import Context, get, surrogate
from unifuse.distill.base import rebind
from unifuse.distill.dmd import DMD, dm_gradient, fake_weight, generate, generator_grid
from unifuse.errors import UnifuseError
from unifuse.metrics.toy import sliced_wasserstein
from unifuse.model import DiffusionModel
from unifuse.nets.mlp import MLP
from unifuse.testing import GaussianMixture

F64 = torch.float64


def test_surrogate_gradient_is_exactly_g():
    """Card 19: 0.5 ||x - sg(x - g)||^2 (summed per sample) has gradient g."""
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    g = torch.randn(5, 3, 4, dtype=F64)
    loss = surrogate(x, g)
    assert loss.shape == (5,)
    loss.sum().backward()
    assert float((x.grad - g).abs().max()) < 1e-14


def _quadrature(n=12):
    """Gauss-Hermite nodes and weights for E over two independent N(0, 1) (exact for polynomials of degree < 2n)."""
    u, w = np.polynomial.hermite_e.hermegauss(n)
    u, w = torch.tensor(u, dtype=F64), torch.tensor(w / w.sum(), dtype=F64)
    z, e = torch.meshgrid(u, u, indexing="ij")
    return z.reshape(-1, 1), e.reshape(-1, 1), (w[:, None] * w[None, :]).reshape(-1)


def _expected_param_grads(path, t, a, b, m, s, normalize=False):
    """d/d(a, b) of E[surrogate(G(z), g)] for G(z) = a z + b with exact scores of the data and of G's law."""
    a = torch.tensor(a, dtype=F64, requires_grad=True)
    b = torch.tensor(b, dtype=F64, requires_grad=True)
    z, e, w = _quadrature()
    real = GaussianMixture([1.0], [[m]], [[s]]).model(path, "x0")
    fake = GaussianMixture([1.0], [[float(b.detach())]], [[abs(float(a.detach()))]]).model(path, "x0")
    x = a * z + b
    g = dm_gradient(real, fake, x, torch.full((z.shape[0],), t, dtype=F64), e, normalize=normalize)
    (w * surrogate(x, g)).sum().backward()
    return float(a.grad), float(b.grad), g


@pytest.mark.parametrize("name", ["vp-cosine", "edm", "rf"])
@pytest.mark.parametrize("t_frac", [0.2, 0.5, 0.8])
def test_dm_gradient_of_a_linear_generator(name, t_frac):
    """Check 5: E[g] = sigma^2 (b - m) / V_r and E[g z] = a sigma^2 (1/V_r - 1/V_f), V = alpha^2 var + sigma^2,
    i.e. the derived alpha^2 (b - m)/V_r and alpha^2 a (1/V_r - 1/V_f) times one factor sigma^2 / alpha^2."""
    path = uf.paths.get(name)
    t = float(path.t_eps + t_frac * (min(path.t_max, 10.0) - path.t_eps))
    al, sg = float(path.alpha(torch.tensor(t, dtype=F64))), float(path.sigma(torch.tensor(t, dtype=F64)))
    m, s, a, b = 0.7, 0.6, 1.3, -0.4
    ga, gb, _ = _expected_param_grads(path, t, a, b, m, s)
    v_r, v_f = al**2 * s**2 + sg**2, al**2 * a**2 + sg**2
    derived_b, derived_a = al**2 * (b - m) / v_r, al**2 * a * (1 / v_r - 1 / v_f)
    factor = sg**2 / al**2
    assert abs(gb - factor * derived_b) < 1e-10 * max(1.0, abs(gb))
    assert abs(ga - factor * derived_a) < 1e-10 * max(1.0, abs(ga))
    assert gb * (b - m) > 0 and ga > 0  # descent moves b toward m and shrinks a toward s (a > s here)


@pytest.mark.parametrize("normalize", [False, True])
def test_dm_gradient_vanishes_at_the_data(normalize):
    """At (a, b) = (s, m) the fake and real denoisers agree: g = 0 per sample and the parameter gradient is 0."""
    path = uf.paths.get("vp-cosine")
    for t in (0.1, 0.5, 0.9):
        ga, gb, g = _expected_param_grads(path, t, 0.6, 0.7, 0.7, 0.6, normalize)
        assert float(g.abs().max()) < 1e-10 and abs(ga) < 1e-10 and abs(gb) < 1e-10


def test_expected_gradient_points_toward_the_data_mean():
    """Card 20: for a Gaussian generator and Gaussian data, -E[g] points from the generator mean to the data mean
    (each coordinate, with DMD's per-sample normalisation, Monte Carlo over t, z, eps)."""
    path = uf.paths.get("edm")
    m, s = torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[0.5, 1.5]], dtype=F64)
    b, a = torch.tensor([[-0.5, 0.5]], dtype=F64), torch.tensor([[1.0, 0.3]], dtype=F64)
    real, fake = GaussianMixture([1.0], m, s).model(path, "x0"), GaussianMixture([1.0], b, a).model(path, "x0")
    gen = torch.Generator().manual_seed(0)
    method = DMD()
    n = 20000
    x = b + a * torch.randn(n, 2, generator=gen, dtype=F64)
    t = method.sample_time(n, real, 0.02, 0.98, gen)
    g = dm_gradient(real, fake, x, t, torch.randn(n, 2, generator=gen, dtype=F64))
    step = -g.mean(0)
    assert bool((torch.sign(step) == torch.sign((m - b)[0])).all())


def test_dm_times_cover_the_teachers_log_snr_range():
    path = uf.paths.get("edm")
    teacher = GaussianMixture([1.0], [[0.0]], [[1.0]]).model(path, "x0")
    t = DMD().sample_time(5000, teacher, 0.02, 0.98, torch.Generator().manual_seed(0))
    lam = path.log_snr(t)
    lo, hi = -7.0, 7.0  # EDM's range -8.8 .. 12.4 cut to the clip
    assert float(lam.min()) >= lo + 0.02 * (hi - lo) - 1e-9 and float(lam.max()) <= lo + 0.98 * (hi - lo) + 1e-9
    native = DMD(time="native").sample_time(5000, teacher, 0.02, 0.98, torch.Generator().manual_seed(0))
    assert float(native.min()) >= 0.002 + 0.02 * (80 - 0.002) - 1e-9


def test_fake_weight_is_edm_lambda():
    path = uf.paths.get("vp-cosine")
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    sig = path.sigma(t) / path.alpha(t)
    assert torch.allclose(fake_weight(path, t, 0.5), (sig**2 + 0.25) / (sig * 0.5) ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_generator_is_the_consistency_sampler(steps):
    """G(z) at its last step, with the same noise stream, is uf.sample(model, z, "consistency", nfe=K)."""
    model = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], 0.3).model(uf.paths.get("edm"), "x0")
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ts, prior = generator_grid(model, steps)
    assert ts.numel() == steps and abs(prior - 80.0) < 1e-9
    ours = generate(model, z, ts, prior, generator=torch.Generator().manual_seed(2))
    ref = uf.sample(model, z, "consistency", nfe=steps, generator=torch.Generator().manual_seed(2))
    assert float((ours - ref).abs().max()) < 1e-12
    first = generate(model, z, ts, prior, torch.zeros(64, dtype=torch.long))
    assert float((first - model.denoise(z * prior, float(ts[0]))).abs().max()) < 1e-12


def test_fake_is_bound_like_the_student():
    """The fake denoiser built from the student's own network evaluates exactly as the student, re-expressed or not."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1, emb_dim=16).double()
    torch.nn.init.normal_(net.out.weight)
    edm = uf.paths.get("edm")
    x, t = torch.randn(8, 2, dtype=F64), torch.rand(8, dtype=F64) * 0.9 + 0.05
    for student in (DiffusionModel(net, edm, "edm", time_input=edm.c_noise), DiffusionModel(net, edm, "edm").on(
            uf.paths.get("rf"))):
        fake = rebind(student, net)
        assert type(fake) is type(student) and fake.path is student.path
        assert torch.equal(fake.denoise(x, t), student.denoise(x, t))


def test_registry_and_options():
    m = get("dmd", steps=2)
    assert m.nfe == (2,) and m.sampler == "consistency" and m.student_path is None and m.regression == 0.0
    with pytest.raises(UnifuseError):
        get("dmd", t_lo=0.9, t_hi=0.1)
    with pytest.raises(UnifuseError):
        get("dmd", time="uniform")


def _setup(tmp_path, **options):
    torch.manual_seed(0)
    path = uf.paths.get("vp-cosine")
    data = GaussianMixture([1.0], [[1.0, -0.5]], [[0.5, 1.2]])
    net = MLP(dim=2, width=64, depth=2, emb_dim=32)
    student = DiffusionModel(net, path, "x0")
    ctx = Context(teacher=data.model(path, "x0"), student=student, student_net=net, ema=None,
                  info={"shape": [2], "is_image": False}, device=torch.device("cpu"), run_dir=str(tmp_path))
    method = DMD(**options)
    method.setup(ctx)
    return data, ctx, method


def _distance(ctx, data, steps=1):
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    target = data.sample(2000, generator=torch.Generator().manual_seed(6))[0].float()
    with torch.no_grad():
        return sliced_wasserstein(uf.sample(ctx.student, z, "consistency", nfe=steps), target)


def test_loss_backpropagates_into_the_student_only(tmp_path):
    _, ctx, method = _setup(tmp_path, regression=0.25, pairs=64, solver_nfe=16)
    assert "fake" in ctx.nets and "fake_optimizer" in ctx.optimizers and method.store["noise"].shape == (64, 2)
    loss = method.loss(ctx, torch.zeros(32, 2), {}, generator=torch.Generator().manual_seed(0), step=0)
    assert loss.shape == (32,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ctx.student_net.parameters())
    state = ctx.optimizers["fake_optimizer"].state  # the TTUR steps were taken by the fake's own optimizer
    assert state and all(int(v["step"]) == method.fake_updates for v in state.values())
    assert np.isfinite(ctx.scalars["fake_loss"])


def _train(ctx, method, steps, lr=1e-3, batch=128):
    opt = torch.optim.Adam(ctx.student_net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for k in range(steps):
        ctx.progress = k / steps
        loss = method.loss(ctx, torch.zeros(batch, 2), {}, generator=gen, step=k)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()


def test_dmd_end_to_end(tmp_path):
    """A tiny MLP one-step generator with an MLP fake score moves from its collapsed start to the data."""
    data, ctx, method = _setup(tmp_path, fake_updates=2, fake_lr=1e-3)
    start = _distance(ctx, data)
    _train(ctx, method, 120)
    end = _distance(ctx, data)
    print(f"DMD one-step SW: start {start:.4f}, after 120 steps {end:.4f}")
    assert end < 0.6 * start


@pytest.mark.slow
def test_dmd_two_step_end_to_end(tmp_path):
    data, ctx, method = _setup(tmp_path, steps=2, fake_updates=2, fake_lr=1e-3)
    start = _distance(ctx, data, 2)
    _train(ctx, method, 150)
    end = _distance(ctx, data, 2)
    print(f"DMD two-step SW: start {start:.4f}, after 150 steps {end:.4f}")
    assert end < 0.5 * start

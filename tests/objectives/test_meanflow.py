"""MeanFlow (objectives/meanflow.py) against the exact single-Gaussian oracle in float64: the exact average
velocity u = (z_t - Phi_{t->r}(z_t)) / (t - r) satisfies the MeanFlow identity and is the loss's target; with
r = t the loss and its gradient are flow matching's; the tangent is taken in native time whatever the network's
time units; short training beats flow matching at one step."""
import math

import pytest
import torch
from torch import nn

import unifuse as uf
from unifuse.nets import MLP
from unifuse.objectives.losses import FlowMatchingLoss
from unifuse.objectives.meanflow import MeanFlowLoss, average_velocity, end_time
from unifuse.tangent import jvp
from unifuse.testing import GaussianMixture

F64 = torch.float64
RF = uf.paths.get("rf")
GM = GaussianMixture.gaussian([0.8, -0.4], [0.3, 0.6])


class ExactAverageNet(nn.Module):
    """net(x, t_in, r=None) = the exact average velocity of GM's PF-ODE on `path` over [r, t] (the instantaneous
    velocity at r = t), with network times t_in = scale * t (scale 1000 = the rf path's c_noise)."""

    two_times = True

    def __init__(self, gm=GM, path=RF, scale: float = 1.0):
        super().__init__()
        self.gm, self.path, self.scale = gm, path, scale
        self.seen = []

    def forward(self, x, t_in, r=None):
        t = t_in.to(F64) / self.scale
        r = t if r is None else torch.as_tensor(r).to(F64) / self.scale
        self.seen.append(r.detach().clone())
        a, s, da, ds = self.path.coefficients(t)
        a_r, s_r = self.path.alpha(r), self.path.sigma(r)
        col = lambda c: c.reshape((-1,) + (1,) * (x.ndim - 1))
        x0 = self.gm.x0_hat(x, a, s)
        v = col(da) * x0 + col(ds) * (x - col(a) * x0) / col(s)
        gap = t - r
        safe = torch.where(gap > 0, gap, torch.ones_like(gap))
        u = (x - self.gm.pf_ode_map(x, a, s, a_r, s_r)) / col(safe)
        return torch.where(col(gap > 0), u, v)


def exact_model(scale: float = 1.0):
    time_input = (lambda t: scale * t) if scale != 1.0 else None
    return uf.DiffusionModel(ExactAverageNet(scale=scale), RF, "velocity", time_input=time_input)


def draws(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64)
    r = t * torch.rand(n, generator=g, dtype=F64)
    z = RF.interpolate(GM.sample(n, generator=g)[0].to(F64), torch.randn(n, 2, generator=g, dtype=F64), t)
    return z, r, t


def exact_velocity(z, t):
    return GM.model(RF, "velocity").predict(z, t, "velocity")


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_exact_average_velocity_satisfies_the_meanflow_identity(scale):
    """u = v - (t - r) du/dt for the exact u (closed-form Phi), du/dt the JVP along (v, 0, 1), to 1e-8;
    the network's time units (scale * t) do not change it: the tangent is taken in native time."""
    model = exact_model(scale)
    z, r, t = draws()
    u = average_velocity(model, z, r, t, {})
    v = exact_velocity(z, t)
    _, dudt = jvp(lambda zz, tt: average_velocity(model, zz, r, tt, {}), (z, t), (v, torch.ones_like(t)),
                  method="autodiff")
    gap = (t - r)[:, None]
    assert float((u - (v - gap * dudt)).abs().max()) < 1e-8
    # the loss's own target with the exact velocity is the exact u (autodiff and finite differences)
    assert float((MeanFlowLoss(jvp="autodiff").target(model, z, v, r, t, {}) - u).abs().max()) < 1e-8
    assert float((MeanFlowLoss(jvp="fd").target(model, z, v, r, t, {}) - u).abs().max()) < 1e-6
    # and u really is the chord of the exact flow
    phi = GM.pf_ode_map(z, RF.alpha(t), RF.sigma(t), RF.alpha(r), RF.sigma(r))
    torch.testing.assert_close(z - gap * u, phi, rtol=0, atol=1e-12)


def test_the_loss_of_the_exact_model_is_the_conditional_velocity_noise():
    """With the exact u the per-sample loss (p = 0) is ||u - u_tgt||^2 with u_tgt built from v = e - x: zero where
    r = t only if e - x = v, so compare against the formula with the exact JVP instead."""
    model = exact_model()
    g = torch.Generator().manual_seed(3)
    x, e = GM.sample(32, generator=g)[0].to(F64), torch.randn(32, 2, generator=g, dtype=F64)
    t = 0.1 + 0.8 * torch.rand(32, generator=g, dtype=F64)
    r = t * torch.rand(32, generator=g, dtype=F64)
    z, v = RF.interpolate(x, e, t), e - x
    u = average_velocity(model, z, r, t, {})
    _, dudt = jvp(lambda zz, tt: average_velocity(model, zz, r, tt, {}), (z, t), (v, torch.ones_like(t)))
    want = ((u - (v - (t - r)[:, None] * dudt)) ** 2).mean(1)
    got = MeanFlowLoss(p=0.0).losses(model, x, e, t, r)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def two_time_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    net = MLP(dim=2, width=32, depth=2, emb_dim=32, two_times=True, **kw).double()
    with torch.no_grad():  # leave the zero initialisation so every part of the function is exercised
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_r_equals_t_is_flow_matching_loss_and_gradient():
    """r = t for every sample: MeanFlow (p = 0) equals FlowMatchingLoss's velocity MSE on the same draws, and so
    does its gradient (training-config model: time_input = c_noise, scale_input = True)."""
    net = two_time_mlp()
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise, scale_input=True)
    g = torch.Generator().manual_seed(1)
    x, e = GM.sample(16, generator=g)[0].to(F64), torch.randn(16, 2, generator=g, dtype=F64)
    t = torch.rand(16, generator=g, dtype=F64)
    mf = MeanFlowLoss(p=0.0).losses(model, x, e, t, t)
    fm = FlowMatchingLoss().errors(model, x, e, t, {})[1]
    torch.testing.assert_close(mf, fm, rtol=1e-12, atol=1e-14)
    g_mf = torch.autograd.grad(mf.mean(), list(net.parameters()))
    g_fm = torch.autograd.grad(fm.mean(), list(net.parameters()))
    for a, b in zip(g_mf, g_fm):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_tangent_is_d_dt_along_the_flow_in_native_time():
    """The target's JVP equals a central difference of u(z + h v, r, t + h) in float64, Richardson-extrapolated
    (error O(h^4): the net sees 1000 t, so its high time frequencies make plain differences inaccurate), with
    the network fed 1000 t and a scaled input."""
    net = two_time_mlp(seed=2)
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise, scale_input=True)
    z, r, t = draws(16, seed=4)
    v = torch.randn_like(z)
    u = average_velocity(model, z, r, t, {})
    tgt = MeanFlowLoss(jvp="autodiff").target(model, z, v, r, t, {})
    diff = lambda h: (average_velocity(model, z + h * v, r, t + h, {}) -
                      average_velocity(model, z - h * v, r, t - h, {})) / (2 * h)
    with torch.no_grad():
        fd = (4 * diff(5e-6) - diff(1e-5)) / 3
    torch.testing.assert_close(tgt, v - (t - r)[:, None] * fd, rtol=0, atol=1e-8)
    assert float((tgt - v).abs().max()) > 1e-3 and float((u - tgt).abs().max()) > 1e-3  # not a trivial case


def test_rows_with_r_equal_t_skip_the_tangent_and_match_the_full_computation():
    """A batch mixing r = t and r < t (the tangent then runs on the r < t rows only, with their class labels):
    each per-sample loss equals that sample's loss computed alone."""
    net = two_time_mlp(seed=3, num_classes=3)
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise)
    g = torch.Generator().manual_seed(6)
    x, e = GM.sample(10, generator=g)[0].to(F64), torch.randn(10, 2, generator=g, dtype=F64)
    t = 0.1 + 0.8 * torch.rand(10, generator=g, dtype=F64)
    r = torch.where(torch.arange(10) % 3 == 0, t, 0.3 * t)
    labels = torch.randint(0, 3, (10,), generator=g)
    loss = MeanFlowLoss().losses(model, x, e, t, r, {"class_labels": labels})
    alone = torch.cat([MeanFlowLoss().losses(model, x[i:i + 1], e[i:i + 1], t[i:i + 1], r[i:i + 1],
                                             {"class_labels": labels[i:i + 1]}) for i in range(10)])
    torch.testing.assert_close(loss, alone, rtol=1e-10, atol=1e-14)


def test_adaptive_weight_and_gradient():
    """loss = err / (err + c)^p with the weight detached: the gradient is that of err times the weight."""
    net = two_time_mlp(seed=5)
    model = uf.DiffusionModel(net, RF, "velocity")
    g = torch.Generator().manual_seed(2)
    x, e = GM.sample(8, generator=g)[0].to(F64), torch.randn(8, 2, generator=g, dtype=F64)
    t = 0.2 + 0.7 * torch.rand(8, generator=g, dtype=F64)
    r = 0.5 * t
    plain = MeanFlowLoss(p=0.0).losses(model, x, e, t, r)
    w = (plain.detach() + 1e-3) ** -0.75
    weighted = MeanFlowLoss().losses(model, x, e, t, r)
    torch.testing.assert_close(weighted, w * plain, rtol=1e-12, atol=0)
    ga = torch.autograd.grad(weighted.sum(), list(net.parameters()))
    gb = torch.autograd.grad((w * plain).sum(), list(net.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_time_draws():
    """t >= r, both in [0, 1], r = t for about r_equals_t of the batch; the same generator gives the same draws."""
    loss = MeanFlowLoss()
    t, r = loss.sample_times(4000, RF, torch.Generator().manual_seed(0))
    assert bool((t >= r).all()) and float(r.min()) >= 0 and float(t.max()) <= 1
    assert abs(float((t == r).double().mean()) - 0.75) < 0.03
    t2, r2 = loss.sample_times(4000, RF, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(r, r2)


def test_refusals_name_the_value_and_the_fix():
    net = two_time_mlp()
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(uf.UnifuseError, match="prediction 'x0'.*set model.prediction=velocity"):
        MeanFlowLoss()(uf.DiffusionModel(net, RF, "x0"), x)
    with pytest.raises(uf.UnifuseError, match="path.*edm.*model.path=rf"):
        MeanFlowLoss()(uf.DiffusionModel(net, uf.paths.get("edm"), "velocity"), x)
    one = MLP(dim=2, width=16, depth=1, emb_dim=16).double()
    with pytest.raises(uf.UnifuseError, match="two_times=True"):
        MeanFlowLoss()(uf.DiffusionModel(one, RF, "velocity"), x)
    with pytest.raises(uf.UnifuseError, match="two_times=True"):
        end_time(uf.DiffusionModel(one, RF, "velocity"), 0.5)
    assert end_time(uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise), torch.tensor([0.25]))["r"] == 250.0


# --- end to end ------------------------------------------------------------------------------------------------
DATA = GaussianMixture.gaussian([1.0, -0.5], [0.2, 0.5])


def gaussian_w2(x, gm):
    """W2^2 between the Gaussian fitted to samples x and the data Gaussian."""
    m, c = x.mean(0), torch.cov(x.T)
    m0, c0 = gm.means[0], torch.diag(gm.stds[0] ** 2)
    root0 = torch.diag(gm.stds[0])
    ev = torch.linalg.eigvalsh(root0 @ c @ root0).clamp(min=0)
    return float(((m - m0) ** 2).sum() + torch.trace(c + c0) - 2 * ev.sqrt().sum())


def train(loss, two_times=True, steps=200, time_input=None, seed=0):
    """A 48-wide MLP velocity model on rf trained `steps` Adam steps (lr 3e-3, batch 256) on DATA, the network fed
    time_input(t) (None: native t)."""
    torch.manual_seed(seed)
    net = MLP(dim=2, width=48, depth=2, emb_dim=32, two_times=two_times)
    model = uf.DiffusionModel(net, RF, "velocity", time_input=time_input)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = DATA.sample(256, generator=g)[0].float()
        opt.zero_grad()
        loss(model, x, generator=g, step=step).mean().backward()
        opt.step()
    return model


def one_step_w2(model, sampler):
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return gaussian_w2(uf.sample(model, noise, sampler, nfe=1).double(), DATA)


def short_float32_run(objective, steps: int) -> None:
    """A few float32 steps of `objective` on a training-config model: finite losses, the zero-initialised end-time
    layer trained, the one-step distance to the data reduced."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1, emb_dim=16, two_times=True)
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise, scale_input=True)
    g = torch.Generator().manual_seed(0)
    before = one_step_w2(model, "average")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        loss = objective(model, DATA.sample(64, generator=g)[0].float(), generator=g, step=step)
        assert loss.shape == (64,) and bool(torch.isfinite(loss).all())
        loss.mean().backward()
        opt.step()
    assert float(net.embed.gap[-1].weight.abs().sum()) > 0
    assert one_step_w2(model, "average") < before


def test_a_short_run_is_finite_and_trains_the_network():
    short_float32_run(MeanFlowLoss(), 20)


def test_meanflow_one_step_beats_flow_matching():
    """200 steps of a 48-wide MLP: MeanFlow (r_equals_t = 0.5, the small-data setting) one-step samples are
    closer (Gaussian W2^2) to the data than one Euler step of a flow-matching model of the same size trained as
    long (which tends to the posterior mean at t = 1, W2^2 = 0.29). The network is fed native t: measured (seeds
    0, 1, 2) 0.008, 0.031, 0.037 against 0.147. Fed 1000 t (the training configs' c_noise), the tangent of the
    high-frequency time features swamps the target at this budget: 0.14 and 0.21 (seeds 0, 1), 0.16 at 100 t."""
    mf = one_step_w2(train(MeanFlowLoss(r_equals_t=0.5)), "average")
    fm = one_step_w2(train(FlowMatchingLoss(), two_times=False), "euler")
    assert math.isfinite(mf) and mf < 0.3 * fm, (mf, fm)

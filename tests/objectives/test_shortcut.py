"""Shortcut models (objectives/shortcut.py) against the exact single-Gaussian oracle in float64: the
self-consistency target of the exact average velocity is the exact u_{2d} and equals two half jumps of the
"average" sampler; the flow-matching part is flow matching; the jump draws stay in [0, 1]; short training beats
flow matching at one step."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.objectives.losses import FlowMatchingLoss
from unifuse.objectives.meanflow import average_velocity
from unifuse.objectives.shortcut import ShortcutLoss, shortcut_target
from unifuse.samplers.average import sample_average

from .test_meanflow import GM, RF, exact_model, one_step_w2, short_float32_run, train, two_time_mlp

F64 = torch.float64


def states(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = GM.sample(n, generator=g)[0].to(F64), torch.randn(n, 2, generator=g, dtype=F64)
    d = 0.5 ** torch.randint(1, 6, (n,), generator=g).to(F64)
    t = 2 * d + (1 - 2 * d) * torch.rand(n, generator=g, dtype=F64)
    return x, e, t, d


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_target_of_the_exact_model_is_the_exact_double_jump(scale):
    """(u_d(x_t, t) + u_d(x_t - d u_d, t - d)) / 2 = u(x_t, t - 2d, t) = (x_t - Phi_{t->t-2d}(x_t)) / 2d."""
    model = exact_model(scale)
    x, e, t, d = states()
    x_t = RF.interpolate(x, e, t)
    target = shortcut_target(model, x_t, t, d)
    u2d = average_velocity(model, x_t, t - 2 * d, t, {})
    phi = GM.pf_ode_map(x_t, RF.alpha(t), RF.sigma(t), RF.alpha(t - 2 * d), RF.sigma(t - 2 * d))
    torch.testing.assert_close(target, u2d, rtol=0, atol=1e-10)
    torch.testing.assert_close(target, (x_t - phi) / (2 * d)[:, None], rtol=0, atol=1e-10)


@pytest.mark.parametrize("t,d", [(0.75, 0.125), (0.5, 0.25), (1.0, 0.5), (0.3125, 0.03125)])
def test_target_equals_two_half_steps_of_the_average_sampler(t, d):
    """The target is (x_t - x_{t-2d}) / 2d with x_{t-2d} from two "average" jumps of size d."""
    model = exact_model()
    x, e, _, _ = states(16, seed=1)
    tt = torch.full((16,), t, dtype=F64)
    x_t = RF.interpolate(x, e, tt)
    two = sample_average(model, x_t, torch.tensor([t, t - d, t - 2 * d], dtype=F64))
    target = shortcut_target(model, x_t, tt, torch.full((16,), d, dtype=F64))
    torch.testing.assert_close(target, (x_t - two) / (2 * d), rtol=0, atol=1e-10)


def test_losses_split_flow_matching_and_self_consistency():
    """Flow-matching samples: flow matching's velocity MSE on the same draws; self-consistency samples of the
    exact model: zero loss (the exact u is self-consistent)."""
    net = two_time_mlp()
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise, scale_input=True)
    x, e, t, d = states(12, seed=2)
    t_fm = torch.rand(8, dtype=F64, generator=torch.Generator().manual_seed(3))
    loss = ShortcutLoss().losses(model, x, e, t_fm, t[8:], d[8:])
    fm = FlowMatchingLoss().errors(model, x[:8], e[:8], t_fm, {})[1]
    torch.testing.assert_close(loss[:8], fm, rtol=1e-12, atol=1e-14)
    assert loss.shape == (12,) and bool((loss[8:] > 0).all())
    exact = ShortcutLoss().losses(exact_model(), x, e, t_fm, t[8:], d[8:])
    assert float(exact[8:].abs().max()) < 1e-20
    # gradients reach the network through the online prediction only
    grads = torch.autograd.grad(loss.mean(), list(net.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_target_model_is_used_for_the_targets():
    """target_model= (an EMA) supplies the self-consistency targets: with the exact model as target the loss is
    ||u_theta(x_t, t - 2d, t) - u_exact||^2."""
    net = two_time_mlp(seed=1)
    model = uf.DiffusionModel(net, RF, "velocity")
    x, e, t, d = states(6, seed=4)
    loss = ShortcutLoss(target="ema").losses(model, x, e, t[:0], t, d, target_model=exact_model())
    x_t = RF.interpolate(x, e, t)
    want = ((average_velocity(model, x_t, t - 2 * d, t, {}) - average_velocity(exact_model(), x_t, t - 2 * d, t, {}))
            ** 2).mean(1)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    with pytest.raises(uf.UnifuseError, match="target_model"):
        ShortcutLoss(target="ema")(model, x)


def test_jump_draws():
    t, d = ShortcutLoss(steps=16).sample_jumps(5000, torch.Generator().manual_seed(0))
    assert bool((t - 2 * d >= 0).all()) and bool((t <= 1).all())
    assert set(d.tolist()) == {0.5, 0.25, 0.125, 0.0625}
    k = t / (2 * d)
    assert torch.equal(k, k.round())  # t on the grid of the jump
    with pytest.raises(uf.UnifuseError, match="power of two"):
        ShortcutLoss(steps=12)


def test_call_is_finite_and_reproducible():
    model = uf.DiffusionModel(two_time_mlp(), RF, "velocity")
    x = GM.sample(16, generator=torch.Generator().manual_seed(5))[0].to(F64)
    a = ShortcutLoss()(model, x, generator=torch.Generator().manual_seed(1))
    b = ShortcutLoss()(model, x, generator=torch.Generator().manual_seed(1))
    assert a.shape == (16,) and bool(torch.isfinite(a).all()) and torch.equal(a, b)


def test_a_short_run_is_finite_and_trains_the_network():
    short_float32_run(ShortcutLoss(), 30)


def test_shortcut_one_step_beats_flow_matching():
    """200 steps of a 48-wide MLP fed 1000 t (see test_meanflow.train): one-step "average" samples closer
    (Gaussian W2^2) to the data than one Euler step of flow matching trained as long. Measured (seeds 0, 1, 2):
    0.018, 0.004, 0.023 against 0.147; fed native t the step sizes d = t - r are hard to tell apart
    (0.11, 0.15, 0.14)."""
    sc = one_step_w2(train(ShortcutLoss(), time_input=RF.c_noise), "average")
    fm = one_step_w2(train(FlowMatchingLoss(), two_times=False), "euler")
    assert math.isfinite(sc) and sc < 0.5 * fm, (sc, fm)

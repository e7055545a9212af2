"""Reward backpropagation (DRaFT-K, DRaFT-LV, ReFL, AlignProp): truncated gradients are exact derivatives of the
truncated computation (finite differences, float64), detaching model outputs equals truncating the chain, full
backpropagation with the KL reaches the tilted Gaussian optimum under a memoryless schedule, and each method raises
the reward."""
from __future__ import annotations

import copy

import pytest
import torch

import unifuse.paths as P
from unifuse.errors import UnifuseError
from unifuse.finetune import get
from unifuse.finetune.backprop import AlignProp, DRaFT, ReFL
from unifuse.finetune.base import Context
from unifuse.finetune.trajectory import rollout, rollout_grid
from unifuse.model import DiffusionModel
from unifuse.samplers import generators, randn
from unifuse.testing.oracle import LearnableGaussian, tilted_gaussian

F64 = torch.float64
MEAN, STD = [0.5, -0.5], [1.0, 0.6]
CENTER, RHO = [2.0, -2.0], 1.0


class Quadratic:
    """r(x) = -sum_d (x_d - c_d)^2 / (2 rho^2) (+ wiggle * sum_d sin(2 x_d), to make the chain rule non-trivial)."""

    differentiable = True

    def __init__(self, center=CENTER, rho=RHO, wiggle=0.0):
        self.center, self.rho, self.wiggle = torch.tensor(center, dtype=F64), rho, wiggle

    def __call__(self, x, cond=None):
        r = -((x - self.center) ** 2).sum(1) / (2 * self.rho**2)
        return r + self.wiggle * torch.sin(2 * x).sum(1)


class FastContext(Context):
    """One torch.Generator for all samples' noise (per-sample streams cost one RNG call per sample and step)."""

    def draw(self, n):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.images)
        self.images += n
        return torch.randn((n, *self.info["shape"]), generator=gen, dtype=F64), gen


def make_context(*, steps=20, batch=64, lr=0.05, eta=1.0, spacing="", reward=None, fast=True, kl=False):
    base = LearnableGaussian(P.get("ddpm-linear"), MEAN, STD)
    ref = copy.deepcopy(base).requires_grad_(False)
    cls = FastContext if fast else Context
    return cls(policy=base.model(), policy_net=base, reference=ref.model(), reward=reward or Quadratic(),
               info={"shape": [2], "num_classes": 0}, device=torch.device("cpu"),
               optimizer=torch.optim.Adam(base.parameters(), lr), batch=batch, steps=steps, eta=eta, spacing=spacing,
               grad_clip=0.0)


# --- (1) truncated gradients: finite differences of the truncated computation ---------------------------------------
STEPS, B, SEED = 8, 5, 3


def _theta(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _set(net, theta):
    with torch.no_grad():
        i = 0
        for p in net.parameters():
            p.copy_(theta[i: i + p.numel()].reshape(p.shape))
            i += p.numel()


def _loss_from(model, reward, x, times, gens):
    """-mean r(x0) of the chain along `times` started at the state x (gens: the per-sample streams' next draws)."""
    sigma = float(model.path.sigma(times[:1])[0])
    return -reward(rollout(model, x / sigma, times, generator=gens, grad_last=None).x0).mean()


def _truncated_fd(net, reward, k, h=1e-6):
    """Central differences of the loss whose first STEPS - k steps' model outputs are held at theta0: the state
    x_{n-k} is computed once, then only the last k steps are recomputed at theta0 +- h e_j."""
    model, times = net.model(), rollout_grid(net.model(), STEPS, "ddim")
    gens = generators(SEED, 0, B)
    noise = randn((B, 2), generator=gens).to(F64)
    with torch.no_grad():
        x_mid = rollout(model, noise, times[: STEPS - k + 1], generator=gens).x0
    states = [g.get_state() for g in gens]
    theta0, grad = _theta(net), []
    for j in range(theta0.numel()):
        vals = []
        for sign in (1, -1):
            _set(net, theta0 + sign * h * torch.eye(theta0.numel(), dtype=F64)[j])
            for g, s in zip(gens, states):
                g.set_state(s)
            with torch.no_grad():
                vals.append(_loss_from(model, reward, x_mid, times[STEPS - k:], gens))
        grad.append((vals[0] - vals[1]) / (2 * h))
    _set(net, theta0)
    return torch.stack(grad)


def _autograd(net, reward, grad_last):
    model, times = net.model(), rollout_grid(net.model(), STEPS, "ddim")
    gens = generators(SEED, 0, B)
    noise = randn((B, 2), generator=gens).to(F64)
    net.zero_grad()
    (-reward(rollout(model, noise, times, generator=gens, grad_last=grad_last).x0).mean()).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("k", [1, 3, STEPS])
def test_truncated_gradient_is_the_derivative_of_the_truncated_chain(k):
    net, reward = LearnableGaussian(P.get("ddpm-linear"), MEAN, STD), Quadratic(wiggle=0.3)
    got, want = _autograd(net, reward, k), _truncated_fd(net, reward, k)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)
    if k < STEPS:  # truncation changes the gradient: the test can tell the two apart
        assert not torch.allclose(got, _autograd(net, reward, None), rtol=1e-3)


def test_full_backprop_matches_finite_differences_of_the_whole_chain():
    net, reward = LearnableGaussian(P.get("ddpm-linear"), MEAN, STD), Quadratic(wiggle=0.3)
    got, want = _autograd(net, reward, None), _truncated_fd(net, reward, STEPS)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)


def test_detaching_model_outputs_equals_truncating_the_chain():
    """AlignProp's noise_pred.detach() for steps i < n - k (the state keeps its graph) = rollout(grad_last=k)."""
    net, reward, k = LearnableGaussian(P.get("ddpm-linear"), MEAN, STD), Quadratic(wiggle=0.3), 3
    path = net.path
    frozen = DiffusionModel(lambda x, t, **c: net(x, t).detach(), path, "x0")
    times = rollout_grid(net.model(), STEPS, "ddim")
    gens = generators(SEED, 0, B)
    x = randn((B, 2), generator=gens).to(F64) * float(path.sigma(times[:1])[0])
    x = x.requires_grad_()  # a graph through the states that the detached outputs cut off from theta
    for i in range(STEPS):
        model = frozen if i < STEPS - k else net.model()
        x = rollout(model, x / float(path.sigma(times[i: i + 1])[0]), times[i: i + 2], generator=gens,
                    grad_last=None).x0
    net.zero_grad()
    (-reward(x).mean()).backward()
    detached = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert torch.allclose(detached, _autograd(net, reward, k), rtol=1e-10, atol=1e-12)


# --- the KL term: its pathwise gradient needs the reference step's graph through the state ---------------------------
def _path_kl(net, ref):
    times = rollout_grid(net.model(), 12, "ddim")
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(64, 2, generator=gen, dtype=F64)
    r = rollout(net.model(), noise, times, generator=gen, reference=ref.model(), grad_last=None)
    return r.kl.sum(0).mean()


def test_kl_gradient_matches_finite_differences():
    """d/dtheta E[sum_i KL_i] by the pathwise (reparameterized) gradient = central differences, common noise."""
    net = LearnableGaussian(P.get("ddpm-linear"), MEAN, STD)
    ref = copy.deepcopy(net).requires_grad_(False)
    _set(net, _theta(net) + torch.tensor([0.1, -0.1, -0.1, 0.05], dtype=F64))
    net.zero_grad()
    _path_kl(net, ref).backward()
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    theta0, h, want = _theta(net), 1e-6, []
    for j in range(theta0.numel()):
        e = h * torch.eye(theta0.numel(), dtype=F64)[j]
        with torch.no_grad():
            _set(net, theta0 + e)
            plus = _path_kl(net, ref)
            _set(net, theta0 - e)
            want.append((plus - _path_kl(net, ref)) / (2 * h))
    _set(net, theta0)
    assert torch.allclose(got, torch.stack(want), rtol=1e-6, atol=1e-10), (got, want)


# --- (2) the KL-regularised optimum: the tilted Gaussian, under a memoryless schedule --------------------------------
def _finetune(steps, iters, *, eta=1.0, kl=1.0, batch=256, lr=0.05):
    """Full backpropagation with the KL (AlignProp, truncate=False) on the Gaussian base; returns the learned
    (mean, std) parameters, the (mean, std) of 4000 fresh samples, and the tilted target."""
    ctx = make_context(steps=steps, batch=batch, lr=lr, eta=eta)
    method = AlignProp(kl=kl, truncate=False, checkpoint=False)
    method.setup(ctx)
    gen = torch.Generator().manual_seed(0)
    for i in range(iters):
        method.step(ctx, gen, i)
    noise, g = ctx.draw(4000)
    with torch.no_grad():
        x = rollout(ctx.policy, noise, ctx.grid(), generator=g, eta=eta).x0
    net = ctx.policy_net
    learned = (net.mean.detach(), net.log_std.detach().exp())
    return learned, (x.mean(0), x.std(0)), tilted_gaussian(MEAN, STD, CENTER, RHO, kl)


def _rel(got, want):
    return float(((got - want).abs() / want.abs()).max())


@pytest.mark.slow
def test_full_backprop_with_kl_reaches_the_tilted_gaussian():
    """200 DDPM steps, eta = 1 (memoryless: the chain starts at alphabar_T ~ 4e-5): parameters and samples within 5%
    of p_base exp(r / kl) / Z (measured: ~2%); eta = 0.3 (not memoryless) lands measurably further away."""
    (m, s), (xm, xs), (tm, ts) = _finetune(200, 80)
    errors = [_rel(m, tm), _rel(s, ts), _rel(xm, tm), _rel(xs, ts)]
    assert max(errors) < 0.05, errors
    (m3, s3), _, _ = _finetune(200, 80, eta=0.3)
    assert max(_rel(m3, tm), _rel(s3, ts)) > max(errors[:2]), (m3, s3, m, s)


def test_full_backprop_with_kl_moves_to_the_tilted_gaussian_fast():
    """The fast version: 50 steps (the discrete path KL overestimates the continuous one, so the tilt falls short,
    measured ~8%; 30 steps: ~16%): within 12% of the tilted optimum and far from the base."""
    (m, s), _, (tm, ts) = _finetune(50, 40, batch=128)
    assert max(_rel(m, tm), _rel(s, ts)) < 0.12, (m, s, tm, ts)
    base = torch.tensor(MEAN, dtype=F64)
    assert _rel(m, tm) < 0.5 * _rel(base, tm)


# --- (3) every method raises the reward; (4) ReFL's one graded evaluation; (5) refusal --------------------------------
@pytest.mark.parametrize("name,options", [("draft", {"k": 1}), ("draft", {"k": 3, "kl": 0.1}),
                                          ("draft-lv", {"n_extra": 2}), ("refl", {}),
                                          ("refl", {"margin": 2.0}), ("alignprop", {"kl": 0.1})])
def test_every_method_increases_the_reward(name, options):
    ctx = make_context(steps=10, batch=128, lr=0.05)
    method = get(name, **options)
    method.setup(ctx)
    gen = torch.Generator().manual_seed(1)
    before = ctx.reward(ctx.generate(2000, model=ctx.policy)).mean()
    outs = [method.step(ctx, gen, i) for i in range(15)]
    after = ctx.reward(ctx.generate(2000, model=ctx.policy)).mean()
    assert after > before + 0.5, (before, after)
    assert {"loss", "reward", "k"} <= set(outs[-1]) and all(map(torch.isfinite, map(torch.tensor, outs[-1].values())))


def test_refl_gradient_flows_through_one_evaluation():
    """ReFL's parameter gradient = the gradient of -r(E_theta[x0 | x_mid]) with x_mid held fixed."""
    ctx = make_context(steps=12, batch=16)
    method = ReFL(late=4)
    gen = torch.Generator().manual_seed(2)
    x0_hat, _, ts, mid, x_mid = method.graded(ctx, gen)
    assert 8 <= mid <= 11 and not x_mid.requires_grad
    ctx.policy_net.zero_grad()
    (-ctx.reward(x0_hat).mean()).backward()
    got = torch.cat([p.grad.reshape(-1) for p in ctx.policy_net.parameters()])
    net = ctx.policy_net   # closed form: x0_hat = m + a s^2 / (a^2 s^2 + sigma^2) (x_mid - a m), per dimension
    a, sig = (v.reshape(()) for v in net.path.coefficients(torch.tensor([float(ts[mid])], dtype=F64))[:2])
    m, log_s = net.mean.detach().requires_grad_(), net.log_std.detach().requires_grad_()
    var = torch.exp(2 * log_s)
    want_x0 = m + a * var / (a * a * var + sig * sig) * (x_mid - a * m)
    torch.autograd.backward(-ctx.reward(want_x0).mean())
    assert torch.allclose(x0_hat.detach(), want_x0.detach(), rtol=1e-12)
    assert torch.allclose(got, torch.cat([m.grad, log_s.grad]), rtol=1e-10)


def test_a_non_differentiable_reward_is_refused():
    class Classifier(Quadratic):
        differentiable = False
        name = "aesthetic-classifier"

    for name in ("draft", "draft-lv", "refl", "alignprop"):
        ctx = make_context(reward=Classifier())
        with pytest.raises(UnifuseError, match="aesthetic-classifier.*ddpo"):
            get(name).setup(ctx)
    with pytest.raises(UnifuseError, match="draft.k"):
        DRaFT(k=0).setup(make_context())


def test_checkpointing_leaves_the_gradient_unchanged():
    """AlignProp's activation checkpointing recomputes each step in the backward pass: identical gradients."""
    grads = []
    for checkpoint in (False, True):
        ctx = make_context(steps=8, batch=8, lr=0.0)
        noise, gens = ctx.draw(8)
        r = rollout(ctx.policy, noise, ctx.grid(), generator=gens, reference=ctx.reference, grad_last=None,
                    checkpoint=checkpoint)
        (-ctx.reward(r.x0).mean() + 0.5 * r.kl.sum(0).mean()).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in ctx.policy_net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_alignprop_truncation_law():
    """grad_last = steps - K, K ~ round(N(0.84 steps, 0.1 steps)) clipped into [1, steps - 1]: for 50 steps the
    mean and std of grad_last match the exact clipped, rounded normal law (mass at K = 49: P(z > 1.5)); no truncation
    (truncate=False): None."""
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([AlignProp().truncation(50, gen) for _ in range(4000)], dtype=F64)
    k = torch.arange(1, 50, dtype=F64)
    cdf = lambda v: 0.5 * (1 + torch.erf((v - 42) / (5 * 2**0.5)))
    p = cdf(k + 0.5) - cdf(k - 0.5)
    p[0], p[-1] = cdf(torch.tensor(1.5, dtype=F64)), 1 - cdf(torch.tensor(48.5, dtype=F64))
    mean = float((p * (50 - k)).sum())
    std = float((p * (50 - k - mean) ** 2).sum().sqrt())
    assert int(draws.min()) >= 1 and int(draws.max()) <= 49
    assert abs(float(draws.mean()) - mean) < 4 * std / 4000**0.5 and abs(float(draws.std()) - std) < 0.15
    assert AlignProp(truncate=False).truncation(50, gen) is None
    assert AlignProp(std_k=0.0).truncation(10, gen) == 10 - round(8.4)

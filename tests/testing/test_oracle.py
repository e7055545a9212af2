"""The Gaussian-mixture oracle checks itself: autograd, Tweedie, ODE solutions, Monte Carlo."""
import pytest
import torch
from scipy.integrate import solve_ivp

import unifuse as uf
from unifuse.testing import GaussianMixture

from ..parameterization.test_convert import mixture

F64 = torch.float64


@pytest.mark.parametrize("alpha, sigma", [(1.0, 0.05), (0.8, 0.6), (0.1, 1.0), (1.0, 7.0)])
def test_score_is_the_gradient_of_the_log_density(alpha, sigma):
    gm = mixture()
    x = (torch.randn(32, 3, dtype=F64) * 1.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), alpha, sigma), grad, rtol=1e-9, atol=1e-10)


def test_tweedie_and_eps():
    gm = mixture()
    x = torch.randn(16, 3, dtype=F64)
    a, s = 0.7, 0.5
    torch.testing.assert_close(gm.x0_hat(x, a, s), (x + s * s * gm.score(x, a, s)) / a)
    torch.testing.assert_close(gm.eps_hat(x, a, s), (x - a * gm.x0_hat(x, a, s)) / s)


def test_log_prob_is_normalised_and_data_density_at_zero_noise():
    gm = GaussianMixture([0.4, 0.6], [[-1.0], [2.0]], [[0.3], [0.8]])
    grid = torch.linspace(-8, 10, 20001, dtype=F64)[:, None]
    for a, s in ((1.0, 0.0), (0.6, 0.8), (0.0, 1.0)):
        mass = torch.trapezoid(gm.log_prob(grid, a, s).exp(), grid.flatten())
        assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_denoiser_is_the_posterior_mean_by_monte_carlo():
    gm = mixture()
    g = torch.Generator().manual_seed(0)
    x0, _ = gm.sample(200000, g)
    a, s = 0.6, 0.8
    xt = a * x0 + s * torch.randn(x0.shape, dtype=F64, generator=g)
    resid = x0 - gm.x0_hat(xt, a, s)
    # orthogonality: E[(x0 - E[x0|x_t]) h(x_t)] = 0 for any h
    for h in (xt, torch.tanh(xt), torch.ones_like(xt)):
        assert float((resid * h).mean(0).abs().max()) < 1e-2
    # eps-MSE at the optimum equals (a^2/s^2) E tr Cov[x0|x_t] / D (GAUSSIAN_ORACLE 7)
    eps_mse = ((xt - a * x0) / s - gm.eps_hat(xt, a, s)).pow(2).mean()
    floor = (a * a / (s * s)) * gm.posterior_cov_trace(xt, a, s).mean() / 3
    assert float(eps_mse) == pytest.approx(float(floor), rel=2e-2)


@pytest.mark.parametrize("name", ["vp-linear", "rf", "edm", "trigflow"])
def test_pf_ode_map_solves_the_ode(name):
    """The closed-form single-Gaussian flow equals a tight RK45 solve of dx/dt = alpha' x0 + sigma' eps."""
    path = uf.paths.get(name)
    gm = GaussianMixture.gaussian([0.3, -1.0], [0.5, 1.5])
    model = gm.model(path, "x0")
    t0, t1 = 0.8 * path.t_max, max(path.t_eps, 0.05 * path.t_max)
    x = torch.randn(4, 2, dtype=F64) * path.sigma(torch.tensor(t0, dtype=F64))

    def rhs(t, y):
        y = torch.from_numpy(y).reshape(4, 2)
        return model.predict(y, torch.tensor(t, dtype=F64), "velocity").flatten().numpy()

    sol = solve_ivp(rhs, (t0, t1), x.flatten().numpy(), method="RK45", rtol=1e-10, atol=1e-10)
    exact = gm.pf_ode_map(x, path.alpha(torch.tensor(t0, dtype=F64)), path.sigma(torch.tensor(t0, dtype=F64)),
                          path.alpha(torch.tensor(t1, dtype=F64)), path.sigma(torch.tensor(t1, dtype=F64)))
    torch.testing.assert_close(torch.from_numpy(sol.y[:, -1]).reshape(4, 2), exact, rtol=1e-7, atol=1e-7)


def test_exact_divergence_matches_autograd_trace():
    gm = mixture()
    path = uf.paths.get("rf")
    model = gm.model(path, "velocity")
    t = torch.tensor(0.4, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)
    trace = torch.zeros(5, dtype=F64)
    for i in range(3):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model.predict(xi, t, "velocity")[:, i].sum(), xi)
        trace += g[:, i]
    torch.testing.assert_close(gm.velocity_divergence(x, path, t), trace, rtol=1e-8, atol=1e-8)


def test_class_conditional_oracle_and_exact_classifier():
    gm = mixture()
    path = uf.paths.get("vp-linear")
    model = gm.model(path, "eps", conditional=True)
    x, t = torch.randn(6, 3, dtype=F64), torch.tensor(0.3, dtype=F64)
    a, s = path.alpha(t), path.sigma(t)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cond = model.predict(x, t, "score", class_labels=y)
    uncond = model.predict(x, t, "score", class_labels=torch.full((6,), -1))
    torch.testing.assert_close(uncond, gm.score(x, a, s))
    # grad_x log p(y | x_t) = score_y - score
    xr = x.clone().requires_grad_(True)
    logp = torch.log(gm.responsibilities(xr, a, s)).gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(logp, xr)
    torch.testing.assert_close(cond - uncond, grad, rtol=1e-8, atol=1e-8)


def test_bad_mixture_is_refused():
    with pytest.raises(uf.UnifuseError, match="sum to 1"):
        GaussianMixture([0.5, 0.6], [[0.0], [1.0]], 1.0)
    with pytest.raises(uf.UnifuseError, match="single Gaussian"):
        mixture().pf_ode_map(torch.zeros(1, 3, dtype=F64), 0.5, 0.5, 1.0, 0.0)

"""`step_flow_sde`: the reverse SDE with the PF-ODE's marginals at noise level eta (Flow-GRPO, generalised to any
path). Checked against the exact single-Gaussian marginals and the forward process's joint (memorylessness at
eta = 1), against one Euler step at eta = 0, and against flow_grpo's own rf formula."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.errors import UnifuseError
from unifuse.samplers.steps import step_ddim, step_euler, step_flow_sde
from unifuse.testing import GaussianMixture

F64 = torch.float64
MU, SD = torch.tensor([0.3, -0.8], dtype=F64), torch.tensor([0.5, 1.5], dtype=F64)
GM = GaussianMixture([1.0], MU[None], SD[None])


def _exact(path, t: float):
    """Mean and std of the marginal x_t = alpha x + sigma noise of x ~ N(MU, SD^2)."""
    a, s = float(path.alpha(torch.tensor(t, dtype=F64))), float(path.sigma(torch.tensor(t, dtype=F64)))
    return a * MU, (a * a * SD**2 + s * s).sqrt(), a, s


@pytest.mark.parametrize("name", ["rf", "trigflow"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_marginals_are_the_pf_odes_and_eta_one_is_memoryless(name, eta):
    """400 uniform steps from the noise end with the exact velocity, 20,000 float64 samples: the marginals at
    t_max * {3/4, 1/2, 1/4, 0} match N(alpha mu, alpha^2 sd^2 + sigma^2) within 5 Monte-Carlo standard errors
    (measured: at most 2.5; the Euler-Maruyama bias is largest near zero SNR, where g_mem -> infinity, and the SDE
    forgets it), and at eta = 1 (memoryless) the correlation of x at t_max/2 with the final x is the forward
    process's alpha sd / sqrt(alpha^2 sd^2 + sigma^2) (the ODE would give 1; eta = 0.5 lies between)."""
    path, n, steps = uf.paths.get(name), 20_000, 400
    model = GM.model(path, "velocity")
    ts = torch.linspace(path.t_max, 0.0, steps + 1, dtype=F64).tolist()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=gen, dtype=F64) * float(path.sigma(torch.tensor(ts[0], dtype=F64)))
    kept = {}
    for i in range(steps):
        x = step_flow_sde(model, x, ts[i], ts[i + 1], eta=eta).sample(torch.randn(n, 2, generator=gen, dtype=F64))
        if (i + 1) % (steps // 4) == 0:
            mean, std, _, _ = _exact(path, ts[i + 1])
            se = std / math.sqrt(n)
            assert ((x.mean(0) - mean).abs() < 5 * se).all(), (i + 1, x.mean(0), mean)
            assert ((x.std(0) - std).abs() < 5 * se / math.sqrt(2)).all(), (i + 1, x.std(0), std)
            kept[i + 1] = x
    _, std, a, _ = _exact(path, ts[steps // 2])
    xm, x0 = kept[steps // 2], kept[steps]
    corr = ((xm - xm.mean(0)) * (x0 - x0.mean(0))).mean(0) / (xm.std(0) * x0.std(0))
    forward = a * SD / std
    if eta == 1.0:
        assert ((corr - forward).abs() < 0.03).all(), (corr, forward)  # se of a correlation ~ (1 - r^2) / sqrt(n)
    else:
        gap = 1 - forward  # strictly between: measured 0.66-0.75 of the gap
        assert (corr > forward + 0.3 * gap).all() and (corr < 1 - 0.1 * gap).all(), (corr, forward)


@pytest.mark.parametrize("name", ["rf", "trigflow", "ddpm-linear", "edm"])
def test_eta_zero_is_one_euler_step(name):
    """eta = 0: no noise (std 0) and the mean is `step_euler`'s state, from the noise end and in between."""
    path = uf.paths.get(name)
    model = GM.model(path, "velocity" if name in ("rf", "trigflow") else "x0")
    grid = uf.paths.time_grid(path, 6, "uniform")
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * float(path.sigma(grid[:1])[0])
    for s, t in zip(grid[:-2].tolist(), grid[1:-1].tolist()):
        step = step_flow_sde(model, x, s, t, eta=0.0)
        assert step.std == 0.0
        torch.testing.assert_close(step.mean, step_euler(model, x, s, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 0.7 / math.sqrt(2), 1.0, 1.6])
def test_rf_step_is_flow_grpos(eta):
    """On rf (sigma = t) with a = eta sqrt(2), flow_grpo's sde_step_with_logprob: std_dev = a sqrt(sigma / (1 - sigma)),
    mean = x (1 + std_dev^2 dt / (2 sigma)) + v (1 + std_dev^2 (1 - sigma) / (2 sigma)) dt, std = std_dev sqrt(-dt)."""
    path = uf.paths.get("rf")
    model = GM.model(path, "x0")  # any prediction kind: the step works on (x0_hat, eps_hat)
    x = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    a = eta * math.sqrt(2.0)
    for sigma, sigma_next in [(0.97, 0.9), (0.6, 0.45), (0.2, 0.05)]:
        v = model.predict(x, torch.full((7,), sigma, dtype=F64), "velocity")
        dt = sigma_next - sigma
        std_dev = a * math.sqrt(sigma / (1 - sigma))
        mean = x * (1 + std_dev**2 / (2 * sigma) * dt) + v * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt
        step = step_flow_sde(model, x, sigma, sigma_next, eta=eta)
        torch.testing.assert_close(step.mean, mean, rtol=0, atol=1e-12)
        assert abs(step.std - std_dev * math.sqrt(-dt)) < 1e-12


@pytest.mark.parametrize("name", ["rf", "trigflow"])
def test_zero_snr_step_and_data_end(name):
    """From alpha_s = 0 the step is DDIM's with eta clamped to 1 (exact marginals; g_mem is infinite there); the
    step to the data end is x0_hat with std 0.0; per-sample times equal stepping each sample alone."""
    path = uf.paths.get(name)
    model = GM.model(path, "velocity")
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    t_max, t_mid = path.t_max, 0.6 * path.t_max
    for eta in (0.5, 1.0, 2.0):
        step, ddim = step_flow_sde(model, x, t_max, t_mid, eta=eta), step_ddim(model, x, t_max, t_mid, eta=min(eta, 1))
        torch.testing.assert_close(step.mean, ddim.mean, rtol=1e-13, atol=1e-13)
        assert abs(step.std - ddim.std) < 1e-13
    end = step_flow_sde(model, x, 0.1 * t_max, 0.0, eta=1.0)
    assert end.std == 0.0
    torch.testing.assert_close(end.mean, model.evaluate(x, torch.tensor(0.1 * t_max, dtype=F64)).x0)
    s = torch.tensor([t_max, 0.7, 0.5, 0.2], dtype=F64) * (t_max if name == "trigflow" else 1.0)
    t = torch.tensor([0.6, 0.4, 0.45, 0.0], dtype=F64) * (t_max if name == "trigflow" else 1.0)
    batch = step_flow_sde(model, x, s, t, eta=0.8)
    for i in range(4):
        alone = step_flow_sde(model, x[i:i + 1], float(s[i]), float(t[i]), eta=0.8)
        torch.testing.assert_close(batch.mean[i:i + 1], alone.mean, rtol=1e-13, atol=1e-13)
        assert abs(float(batch.std[i]) - float(alone.std)) < 1e-13


@pytest.mark.parametrize("eta", [-0.1, float("nan"), "a lot"])
def test_bad_eta_is_refused(eta):
    model = GM.model(uf.paths.get("rf"), "velocity")
    with pytest.raises(UnifuseError, match="eta"):
        step_flow_sde(model, torch.zeros(2, 2, dtype=F64), 0.5, 0.4, eta=eta)

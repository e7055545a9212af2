"""One-step functions (`uf.samplers.step_*`): a time per sample, the sampler loops' own steps, and the orders
of the deterministic steps against the exact single-Gaussian PF-ODE map (GAUSSIAN_ORACLE sections 4-5)."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.samplers import step_ddim, step_dpmpp_2m, step_euler, step_heun
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture.gaussian([0.3, -0.5, 1.0, 0.0], [0.5, 0.2, 1.5, 0.05])
NOISE = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(1))


def ddim(model, x, s, t, **kw):
    return step_ddim(model, x, s, t, eta=0.0, **kw).mean


def dpmpp_2m(model, x, s, t, **kw):  # the second-order step, with the previous point at 1.5 s
    prev = torch.as_tensor(s, dtype=F64) * 1.5
    return step_dpmpp_2m(model, x, s, t, previous=(prev, model.denoise(x, prev)), **kw)


STEPS = {"euler": step_euler, "heun": step_heun, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


@pytest.mark.parametrize("name", list(STEPS))
def test_a_time_per_sample_equals_stepping_each_sample_alone(name):
    """Six samples, six different (s, t) pairs (one of them to the data end): each row is its own step."""
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "v")
    s = torch.tensor([0.9, 0.7, 0.5, 0.5, 0.3, 0.2], dtype=F64)
    t = torch.tensor([0.6, 0.65, 0.1, 0.4, 0.0, 0.19], dtype=F64)
    x = NOISE * path.sigma(s)[:, None]
    batch = STEPS[name](model, x, s, t)
    for i in range(6):
        alone = STEPS[name](model, x[i:i + 1], s[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-13, atol=1e-13, msg=f"{name}, sample {i}")
    torch.testing.assert_close(batch[4], model.denoise(x[4:5], s[4:5])[0], rtol=0, atol=1e-14)  # to the data


@pytest.mark.parametrize("name,sampler", [("euler", "euler"), ("heun", "heun"), ("ddim", "ddim")])
def test_the_step_is_the_sampler_loops_step(name, sampler):
    """On a grid that does not end on the data, the sampler makes exactly the steps of the step function."""
    path = uf.paths.get("edm")
    model = GM.model(path, "edm")
    ts = torch.tensor([20.0, 5.0, 1.0, 0.2], dtype=F64)
    x = NOISE * 20.0
    y = x
    for s, t in zip(ts[:-1].tolist(), ts[1:].tolist()):
        y = STEPS[name](model, y, s, t)
    loop = uf.samplers.get(sampler).fn(model, x, ts)
    torch.testing.assert_close(y, loop, rtol=1e-13, atol=1e-13)


def test_dpmpp_2m_step_is_the_multistep_loops_step():
    """DPM-Solver++(2M): a first-order step, then second-order steps given the previous denoised estimate."""
    path = uf.paths.get("ddpm-linear")
    model = GM.model(path, "eps")
    ts = torch.tensor([999.0, 700.0, 400.0, 150.0, 40.0], dtype=F64)
    x = NOISE * float(path.sigma(ts[0]))
    y, previous = x, None
    for s, t in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x0 = model.denoise(y, s)
        y, previous = step_dpmpp_2m(model, y, s, t, previous=previous), (s, x0)
    torch.testing.assert_close(y, uf.samplers.sample_dpmpp_2m(model, x, ts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_deterministic_steps_converge_at_their_order_with_a_grid_per_sample(name, order):
    """Each sample integrates over its own log-SNR grid (from its own noise level to sigma/alpha = 0.05); the
    error against the exact PF-ODE map falls by 2^order per doubling of steps."""
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "eps")
    hi = torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0, 2.0], dtype=F64)
    t0, t1 = path.t_from_sigma_edm(hi), path.t_from_sigma_edm(torch.tensor(0.05, dtype=F64))
    x = NOISE * torch.hypot(path.alpha(t0), path.sigma(t0))[:, None]
    exact = GM.pf_ode_map(x, path.alpha(t0), path.sigma(t0), path.alpha(t1), path.sigma(t1))
    errors = []
    for n in (20, 40, 80):
        lam = torch.stack([torch.linspace(-2 * math.log(h), -2 * math.log(0.05), n + 1, dtype=F64) for h in hi], 1)
        ts = path.t_from_log_snr(lam)  # [n + 1, batch]: a grid per sample
        y, previous = x, None
        for k in range(n):
            if name == "dpmpp_2m":
                x0 = model.denoise(y, ts[k])
                y, previous = step_dpmpp_2m(model, y, ts[k], ts[k + 1], previous=previous), (ts[k], x0)
            else:
                y = STEPS[name](model, y, ts[k], ts[k + 1])
        errors.append(float((y - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert rates[-1] > order - 0.3, (errors, rates)


def test_ddim_step_per_sample_keeps_its_gaussian():
    """With eta > 0 and a time per sample, the std is a per-sample column and the density is per sample."""
    path = uf.paths.get("ddpm-linear")
    model = GM.model(path, "eps")
    s, t = torch.tensor([900.0, 500.0]), torch.tensor([800.0, 100.0])
    x = NOISE[:2] * path.sigma(s.to(F64))[:, None]
    g = step_ddim(model, x, s, t, eta=0.5)
    assert g.std.shape == (2, 1)
    for i in range(2):
        alone = step_ddim(model, x[i:i + 1], float(s[i]), float(t[i]), eta=0.5)
        torch.testing.assert_close(g.mean[i:i + 1], alone.mean, rtol=1e-13, atol=1e-13)
        assert math.isclose(float(g.std[i]), alone.std, rel_tol=1e-15)
    assert g.log_prob(g.mean).shape == (2,)
    with pytest.raises(uf.UnifuseError, match=r"t must be a number or have shape \[batch\] = \[2\]"):
        step_ddim(model, x, s, torch.tensor([1.0, 2.0, 3.0]))

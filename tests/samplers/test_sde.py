"""Stochastic samplers: exact output laws by linear-Gaussian propagation (GAUSSIAN_ORACLE section 5), Monte
Carlo laws against the target, the one-step Gaussian transitions (DESIGN rule 6), per-sample seeds."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.samplers import SAMPLERS, step_ddim, step_ddpm, step_dpmpp_sde, step_euler_maruyama
from unifuse.testing import GaussianMixture

F64 = torch.float64
TARGET = GaussianMixture.gaussian([0.3], [0.5])


def propagate(model, ts, step, **kw):
    """Exact law N(m, V) of a sampler whose steps are x <- A x + b + c z (single Gaussian, linear model)."""
    probe = torch.tensor([[0.0], [1.0]], dtype=F64)
    m, V = 0.0, float(model.path.sigma(ts[0])) ** 2
    for s, t in zip(ts[:-1].tolist(), ts[1:].tolist()):
        g = step(model, probe, s, t, **kw)
        b, A = float(g.mean[0]), float(g.mean[1] - g.mean[0])
        c = float(g.std) if isinstance(g.std, float) else float(g.std.reshape(-1)[0])
        m, V = A * m + b, A * A * V + c * c
    return m, math.sqrt(V)


@pytest.mark.parametrize("variance,std", [("small", 0.4961), ("large", 0.5008)])
def test_ddpm_1000_steps_exact_law(variance, std):
    """Linear DDPM, 1000 steps, target N(0.3, 0.5^2): std 0.4961 (beta_tilde) / 0.5008 (beta) (card 1)."""
    path = uf.paths.DDPM.linear()
    model = TARGET.model(path, "eps")
    ts = uf.paths.time_grid(path, 1000, "uniform")
    m, s = propagate(model, ts, step_ddpm, variance=variance)
    assert abs(m - 0.3) < 5e-4 and abs(s - std) < 5e-4, (m, s)


def test_euler_maruyama_exact_law_converges():
    """Euler-Maruyama on the VP reverse SDE: the output law approaches the target as steps grow."""
    path = uf.paths.get("vp-linear")
    model = TARGET.model(path, "eps")
    errs = []
    for n in (100, 400):
        ts = uf.paths.time_grid(path, n, "uniform")
        m, s = propagate(model, ts[:-1], step_euler_maruyama)
        errs.append(abs(s - 0.5) + abs(m - 0.3))
    assert errs[1] < 0.6 * errs[0] and errs[1] < 0.02, errs


def test_first_order_sde_dpmpp_is_the_ancestral_step():
    """First-order SDE-DPM-Solver++ equals one exact posterior step q(x_t | x_s, x0 = x0_hat) (card 8)."""
    path = uf.paths.get("vp-cosine")
    model = TARGET.model(path, "v")
    x = torch.randn(5, 1, dtype=F64)
    a, b = step_dpmpp_sde(model, x, 0.7, 0.4), step_ddpm(model, x, 0.7, 0.4, variance="small")
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-12)
    assert abs(a.std - b.std) < 1e-12


def test_gaussian_step_log_prob():
    path = uf.paths.get("vp-linear")
    model = TARGET.model(path, "eps")
    x = torch.randn(6, 1, dtype=F64)
    g = step_ddim(model, x, 0.5, 0.3, eta=1.0)
    y = g.sample(torch.randn_like(x))
    ref = torch.distributions.Normal(g.mean, g.std).log_prob(y).sum(1)
    torch.testing.assert_close(g.log_prob(y), ref)
    with pytest.raises(uf.UnifuseError, match="deterministic"):
        step_ddim(model, x, 0.5, 0.3, eta=0.0).log_prob(y)


def per_sample_noise(seeds, shape):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda: torch.stack([torch.randn(shape, generator=g, dtype=F64) for g in gens])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_maruyama", "dpmpp_2m_sde"])
def test_sampler_loops_are_their_one_step_functions(name):
    """The sampler's loop takes exactly the Gaussian steps of the public one-step functions."""
    path = uf.paths.get("vp-linear")
    model = TARGET.model(path, "eps")
    ts = uf.paths.time_grid(path, 12, "uniform")
    seeds = [3, 4, 5]
    x = torch.randn(3, 1, dtype=F64) * float(path.sigma(ts[0]))
    opts = {"ddim": {"eta": 0.7}}.get(name, {})
    out = SAMPLERS[name].fn(model, x, ts, noise=seeds, **opts)
    z, y, prev = per_sample_noise(seeds, (1,)), x, None
    for s, t in zip(ts[:-1].tolist(), ts[1:].tolist()):
        if name == "ddpm":
            g = step_ddpm(model, y, s, t)
        elif name == "ddim":
            g = step_ddim(model, y, s, t, eta=0.7)
        elif name == "euler_maruyama":
            g = step_euler_maruyama(model, y, s, t)
        else:
            g = step_dpmpp_sde(model, y, s, t, previous=prev)
            prev = (s, model.denoise(y, s))
        y = g.sample(z()) if t != ts[-1] else g.mean
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pname,pred,name,nfe,opts", [
    ("ddpm-linear", "eps", "ddpm", 200, {"variance": "large"}),
    ("vp-linear", "eps", "dpmpp_2m_sde", 60, {}),
    ("rf", "velocity", "dpmpp_2m_sde", 60, {}),
    ("edm", "edm", "edm_stochastic", 319, {"S_churn": 40, "S_tmin": 0.05, "S_tmax": 50}),
    ("ve", "score", "pc", 600, {}),
    ("vp-linear", "x0", "pc", 600, {"predictor": "euler_maruyama"}),
    ("trigflow", "v", "euler_maruyama", 600, {}),
])
def test_stochastic_samplers_reach_the_target_law(pname, pred, name, nfe, opts):
    """Monte Carlo: 8000 samples of N(0.3, 0.5^2) (standard errors 0.006 in the mean, 0.004 in the std)."""
    model = TARGET.model(uf.paths.get(pname), pred)
    noise = torch.randn(8000, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = uf.sample(model, noise, name, nfe=nfe, generator=torch.Generator().manual_seed(1), **opts)
    assert abs(float(x.mean()) - 0.3) < 0.025 and abs(float(x.std()) - 0.5) < 0.02, (float(x.mean()), float(x.std()))


STOCHASTIC = [n for n, s in SAMPLERS.items() if s.stochastic]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_sample_i_depends_only_on_its_seed(name):
    """With one generator (or seed) per sample, sample i is the same in a batch of 4, of 2 or alone."""
    path = uf.paths.get("vp-linear")
    model = GaussianMixture.gaussian([0.3, -0.2, 0.1], [0.5, 0.3, 0.2]).model(path, "eps")
    noise = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    opts = {"ddim": {"eta": 1.0}, "edm_stochastic": {"S_churn": 10.0}}.get(name, {})
    full = uf.sample(model, noise, name, nfe=8, generator=[10, 11, 12, 13], **opts)
    pair = uf.sample(model, noise[2:], name, nfe=8, generator=[12, 13], **opts)
    one = uf.sample(model, noise[1:2], name, nfe=8, generator=[torch.Generator().manual_seed(11)], **opts)
    torch.testing.assert_close(full[2:], pair, rtol=0, atol=1e-12)
    torch.testing.assert_close(full[1:2], one, rtol=0, atol=1e-12)
    a = uf.sample(model, noise, name, nfe=8, generator=7, **opts)
    b = uf.sample(model, noise[:2], name, nfe=8, generator=7, **opts)
    torch.testing.assert_close(a[:2], b, rtol=0, atol=1e-12)
    c = uf.sample(model, noise, name, nfe=8, generator=[20, 21, 22, 23], **opts)
    assert (c - full).abs().max() > 1e-6  # the seeds matter


def test_learned_variance_interpolates_the_fixed_ones():
    """var_frac = 1 is beta ("large"), 0 is beta_tilde ("small") (Improved DDPM, card 3)."""
    path = uf.paths.DDPM.linear()
    base = TARGET.model(path, "eps")
    ts = uf.paths.time_grid(path, 30, "trailing")
    x = torch.randn(4, 1, dtype=F64)
    for frac, variance in ((1.0, "large"), (0.0, "small")):
        net = lambda x, t, f=frac: torch.cat([base.net(x, t), torch.full_like(x, 2 * f - 1)], 1)
        lv = uf.DiffusionModel(net, path, "eps", learned_variance=True)
        a = uf.samplers.sample_ddpm(lv, x, ts, variance="learned", noise=[1, 2, 3, 4])
        b = uf.samplers.sample_ddpm(base, x, ts, variance=variance, noise=[1, 2, 3, 4])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(uf.UnifuseError, match="learned variance"):
        uf.samplers.sample_ddpm(base, x, ts, variance="learned")


def exact_consistency_model(path):
    """The exact consistency function f*(x_t, t) (PF-ODE map to the data) as an x0-predicting model."""
    def net(x, t):
        a, s = path.alpha(t.to(F64)).reshape(-1, 1), path.sigma(t.to(F64)).reshape(-1, 1)
        return TARGET.pf_ode_map(x, a, s, 1.0, 0.0)
    return uf.DiffusionModel(net, path, "x0")


def test_consistency_sampling_with_the_exact_consistency_function():
    """One step reproduces the exact map; every step count samples the target law exactly."""
    path = uf.paths.get("edm")
    model = exact_consistency_model(path)
    noise = torch.randn(8000, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    one = uf.sample(model, noise, "consistency", nfe=1)
    torch.testing.assert_close(one, TARGET.pf_ode_map(noise * 80.0, 1.0, 80.0, 1.0, 0.0), rtol=0, atol=1e-12)
    for nfe in (2, 4):
        x = uf.sample(model, noise, "consistency", nfe=nfe, generator=torch.Generator().manual_seed(nfe))
        assert abs(float(x.mean()) - 0.3) < 0.025 and abs(float(x.std()) - 0.5) < 0.02


def test_edm_stochastic_without_churn_is_heun():
    path = uf.paths.get("edm")
    model = TARGET.model(path, "edm")
    noise = torch.randn(5, 1, dtype=F64)
    torch.testing.assert_close(uf.sample(model, noise, "edm_stochastic", nfe=9), uf.sample(model, noise, "heun", nfe=9),
                               rtol=0, atol=0)
    churned = uf.sample(model, noise, "edm_stochastic", nfe=9, S_churn=20.0)
    assert (churned - uf.sample(model, noise, "heun", nfe=9)).abs().max() > 1e-3

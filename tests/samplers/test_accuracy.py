"""Deterministic samplers against the exact single-Gaussian PF-ODE map (GAUSSIAN_ORACLE sections 4-5):
convergence orders, the identities between samplers (ALGORITHMS cards 4, 7-9), invariance under `on()`,
exact NFE, and the final step to the data."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.samplers import SAMPLERS
from unifuse.sampling import nfe_budget
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture.gaussian([0.3, -0.5, 1.0, 0.0], [0.5, 0.2, 1.5, 0.05])
NOISE = torch.randn(32, 4, dtype=F64, generator=torch.Generator().manual_seed(0))


def lam_grid(path, n, hi, lo):
    """n steps uniform in log-SNR between EDM noise levels hi and lo (a user grid ending at sigma > 0)."""
    lam = torch.linspace(-2 * math.log(hi), -2 * math.log(lo), n + 1, dtype=F64)
    return path.t_from_log_snr(lam)


def exact_error(model, name, ts, **kw):
    path = model.path
    a0, s0 = float(path.alpha(ts[0])), float(path.sigma(ts[0]))
    a1, s1 = float(path.alpha(ts[-1])), float(path.sigma(ts[-1]))
    x = NOISE * math.hypot(a0, s0)
    out = SAMPLERS[name].fn(model, x, ts, **kw)
    return float((out - GM.pf_ode_map(x, a0, s0, a1, s1)).abs().max())


# name, theoretical order, options, step counts (VP-linear, from t = 1 (sigma/alpha = 152) to sigma/alpha = 0.01)
ORDERS = [
    ("ddim", 1, {}, (40, 80, 160)),
    ("euler", 1, {}, (40, 80, 160)),
    ("dpm_solver_1", 1, {}, (40, 80, 160)),
    ("heun", 2, {}, (40, 80, 160)),
    ("midpoint", 2, {}, (40, 80, 160)),
    ("dpm_solver_2", 2, {}, (40, 80, 160)),
    ("dpmpp_2s", 2, {}, (40, 80, 160)),
    ("dpmpp_2m", 2, {}, (40, 80, 160)),
    ("dpm_solver_3", 3, {}, (20, 40, 80)),
    ("dpmpp_3m", 3, {}, (40, 80, 160)),
    ("unipc", 3, {"order": 2}, (40, 80, 160)),
    ("unipc", 4, {"order": 3}, (80, 160, 320)),
    ("ipndm", 4, {}, (80, 160, 320)),
]


@pytest.mark.parametrize("name,order,opts,ns", ORDERS, ids=[f"{o[0]}{o[2].get('order', '')}" for o in ORDERS])
def test_ode_samplers_converge_at_their_order(name, order, opts, ns):
    """Error against the exact map falls by 2^order per doubling of steps (3M: with D2 = 2(D1_0 - D1_1)/(r0+r1))."""
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "eps")
    errs = [exact_error(model, name, lam_grid(path, n, 152.0, 0.01), **opts) for n in ns]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert rates[-1] > order - 0.3, (name, errs, rates)
    assert errs[-1] < 0.05, errs


@pytest.mark.parametrize("pname,pred,name,order", [("rf", "velocity", "euler", 1), ("rf", "velocity", "midpoint", 2),
                                                   ("edm", "edm", "heun", 2), ("trigflow", "v", "dpmpp_3m", 3),
                                                   ("ddpm-linear", "eps", "unipc", 3)])
def test_native_and_exponential_solvers_on_other_paths(pname, pred, name, order):
    """Rectified-flow Euler/midpoint, EDM's Heun and the exponential integrators converge on their own paths.
    (Multistep methods start at first order, which limits them to order 2 unless the start is at high noise.)"""
    path = uf.paths.get(pname)
    model = GM.model(path, pred)
    hi = 150.0 if name in ("dpmpp_3m", "unipc") else 40.0
    errs = [exact_error(model, name, lam_grid(path, n, hi, 0.02)) for n in (40, 80, 160)]
    assert math.log2(errs[-2] / errs[-1]) > order - 0.3, errs


def test_ddim_is_euler_in_edm_coordinates():
    """DDIM (eta = 0) = Euler on y = x/alpha in s = sigma/alpha: y_next = y + (s_next - s) eps_hat (card 4)."""
    path = uf.paths.get("vp-cosine")
    model = GM.model(path, "v")
    ts = lam_grid(path, 7, 30.0, 0.05)
    x = NOISE * float(path.sigma(ts[0]))
    out = uf.samplers.sample_ddim(model, x, ts)
    y = x / path.alpha(ts[0])
    for i in range(len(ts) - 1):
        e = model.evaluate(y * path.alpha(ts[i]), ts[i])
        y = y + (path.sigma_edm(ts[i + 1]) - path.sigma_edm(ts[i])) * e.eps
    torch.testing.assert_close(out, y * path.alpha(ts[-1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,opts", [("dpm_solver_1", {}), ("dpmpp_2m", {}),
                                       ("unipc", {"order": 1, "corrector": False}),
                                       ("ipndm", {"order": 1})])
def test_first_order_methods_equal_ddim(name, opts):
    """DPM-Solver-1 = DPM-Solver++ first order = UniP-1 = DDIM, on a grid ending at the data."""
    path = uf.paths.get("ddpm-linear")
    model = GM.model(path, "x0")
    ts = uf.paths.time_grid(path, 6, "logsnr")
    x = NOISE * float(path.sigma(ts[0]))
    ref = uf.samplers.sample_ddim(model, x, ts)
    if name == "dpmpp_2m":  # first order on a one-step grid, then the final step to the data
        ts = ts[-2:]
        x = NOISE * float(path.sigma(ts[0]))
        ref = uf.samplers.sample_ddim(model, x, ts)
    torch.testing.assert_close(SAMPLERS[name].fn(model, x, ts, **opts), ref, rtol=0, atol=1e-11)


def test_ddim_eta_one_is_ddpm_ancestral():
    """DDIM with eta = 1 is DDPM ancestral sampling with the posterior ("small") variance (card 4)."""
    path = uf.paths.get("ddpm-linear")
    model = GM.model(path, "eps")
    ts = uf.paths.time_grid(path, 20, "trailing")
    x = NOISE * float(path.sigma(ts[0]))
    a = uf.samplers.sample_ddim(model, x, ts, eta=1.0, noise=[11 + i for i in range(32)])
    b = uf.samplers.sample_ddpm(model, x, ts, variance="small", noise=[11 + i for i in range(32)])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    c = uf.samplers.sample_ddim(model, x, ts, eta=0.5, noise=[11 + i for i in range(32)])
    assert (a - c).abs().max() > 1e-3


def test_step_to_the_data_returns_the_denoised_estimate():
    """Every sampler's step to sigma = 0 returns x0_hat of the current point (one evaluation)."""
    path = uf.paths.get("edm")
    model = GM.model(path, "edm")
    ts = torch.tensor([3.0, 0.0], dtype=F64)
    x = NOISE * 3.0
    for name in SAMPLERS:
        if name in ("adaptive", "pc"):
            continue
        out = SAMPLERS[name].fn(model, x, ts)
        torch.testing.assert_close(out, model.denoise(x, ts[0]), rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("target", ["rf", "edm", "trigflow", "ddpm-linear", "ve"])
def test_reexpressed_model_samples_the_same(target):
    """A model moved to another path with on() gives the same samples: exactly for the exponential
    integrators (they depend on the grid's log-SNR only), up to solver error for native-time Heun."""
    src = uf.paths.get("vp-linear")
    model = GM.model(src, "eps")
    other = model.on(uf.paths.get(target))
    grid = lam_grid(src, 9, 20.0, 0.02)
    same_snr = other.path.t_from_log_snr(src.log_snr(grid))  # the same grid in the other path's time
    for name in ("dpmpp_2m", "unipc", "dpm_solver_3"):
        a = uf.sample(model, NOISE, name, spacing=grid)
        b = uf.sample(other, NOISE, name, spacing=same_snr)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8, msg=name)
    # native-time Heun differs by solver error only: both are close to the exact map from the same start
    for m in (model, other):
        ts = uf.paths.time_grid(m.path, 30, "logsnr", sigma_min=0.02, sigma_max=20.0)
        x = NOISE * float(m.path.sigma(ts[0]))
        out = uf.samplers.sample_heun(m, x, ts[:-1])
        p = m.path
        ref = GM.pf_ode_map(x, p.alpha(ts[0]), p.sigma(ts[0]), p.alpha(ts[-2]), p.sigma(ts[-2]))
        assert float((out - ref).abs().max()) < 0.06


def counting(model):
    """The same model with a net that counts its calls."""
    calls = [0]
    net = model.net

    def counted(x, t, **kw):
        calls[0] += 1
        return net(x, t, **kw)

    return uf.DiffusionModel(counted, model.path, model.prediction, sigma_data=model.sigma_data), calls


@pytest.mark.parametrize("pname,pred", [("vp-linear", "eps"), ("rf", "velocity")])
def test_nfe_is_exact_for_every_sampler(pname, pred):
    """uf.sample(..., nfe=N) makes exactly N network calls, whatever the sampler (adaptive: at most N)."""
    model, calls = counting(GM.model(uf.paths.get(pname), pred))
    noise = NOISE[:4]
    for name in uf.samplers.available():
        for nfe in ((1, 2, 3, 4, 5, 6, 7, 10) if name != "adaptive" else (400,)):
            calls[0] = 0
            try:
                _, info = uf.sample(model, noise, name, nfe=nfe, return_info=True, generator=1)
            except uf.UnifuseError as err:  # refused before any network call (tests/samplers/test_defaults.py)
                assert "does not reach the data" in str(err) and calls[0] == 0, (name, nfe, err)
                continue
            if name == "adaptive":
                assert calls[0] == info["nfe"] <= nfe
            else:
                assert calls[0] == info["nfe"] == nfe, (name, nfe, calls[0])


def test_nfe_rules():
    """Single-step methods: the final step costs 1, then order-p steps and one lower-order step for the rest;
    at low budgets (up to 20) first-order steps: all of them below three order-p steps, else onto the least
    noisy time."""
    assert nfe_budget("heun", 35) == (18, {"orders": [2] * 17})  # EDM's Heun
    assert nfe_budget("heun", 24) == (13, {"orders": [2] * 11 + [1]})
    assert nfe_budget("dpm_solver_3", 26) == (10, {"orders": [3] * 8 + [1]})
    assert nfe_budget("dpm_solver_3", 31, zero_start=True) == (12, {"orders": [1] + [3] * 9 + [2]})
    assert nfe_budget("heun", 7) == (5, {"orders": [2, 2, 1, 1]})
    assert nfe_budget("heun", 8) == (5, {"orders": [2, 2, 2, 1]})
    assert nfe_budget("heun", 5) == (5, {"orders": [1, 1, 1, 1]})
    assert nfe_budget("dpm_solver_3", 9) == (9, {"orders": [1] * 8})
    assert nfe_budget("dpm_solver_3", 12) == (6, {"orders": [3, 3, 3, 1, 1]})
    assert nfe_budget("dpm_solver_3", 6, zero_start=True) == (6, {"orders": [1] * 5})
    assert nfe_budget("pc", 5) == (3, {"correctors": [0, 1, 1]})
    assert nfe_budget("dpmpp_3m", 5) == (5, {})
    with pytest.raises(uf.UnifuseError, match="adaptive"):
        uf.sample(GM.model(uf.paths.get("edm"), "x0"), NOISE, "adaptive", nfe=10)


def test_user_grid_and_its_cost():
    path = uf.paths.get("rf")
    model = GM.model(path, "velocity")
    grid = torch.tensor([1.0, 0.6, 0.3, 0.1], dtype=F64)
    _, info = uf.sample(model, NOISE, "heun", spacing=grid, return_info=True)
    assert info["nfe"] == 7 and info["grid"][-1] == 0.0  # 3 Heun steps + the final step to the data
    with pytest.raises(uf.UnifuseError, match="nfe=7"):
        uf.sample(model, NOISE, "heun", nfe=6, spacing=grid)


@pytest.mark.parametrize("pname", ["rf", "trigflow", "vp-cosine", "ddpm-ztsnr"])
def test_zero_terminal_snr_start(pname):
    """Every sampler starts at alpha = 0 (pure noise) with v / velocity models (karras/logsnr grids start at the
    noise end, then jump to sigma_max); deterministic samplers land near the exact map x0 = mu + s x_T / sigma_T."""
    path = uf.paths.DDPM.linear(zero_terminal_snr=True) if pname == "ddpm-ztsnr" else uf.paths.get(pname)
    model = GM.model(path, "velocity" if pname == "rf" else "v")
    assert float(path.alpha(torch.tensor(path.t_max, dtype=F64))) == 0.0
    exact = GM.means[0] + GM.stds[0] * NOISE
    for name in uf.samplers.available():
        if name == "adaptive":
            continue
        x, info = uf.sample(model, NOISE, name, nfe=48, spacing="logsnr", generator=3, return_info=True)
        assert torch.isfinite(x).all() and info["grid"][0] == path.t_max, name
        if not SAMPLERS[name].stochastic:
            err = float((x - exact).abs().max())
            assert err < (0.2 if SAMPLERS[name].max_order == 1 else 0.04), (name, err)


def test_3m_order_needs_the_factor_two(monkeypatch):
    """The convergence test can tell: with diffusers' D2 = (D1_0 - D1_1)/(r0 + r1) the rate falls to ~2."""
    import numpy as np

    from unifuse.samplers import multistep

    original = multistep.dpmpp_weights

    def half_d2(sch, i, p, variant="midpoint"):
        cx, w = original(sch, i, p, variant)
        if p == 3:  # remove half of the D2 term: b3 * D2 -> b3 * D2 / 2
            h, (r0, r1) = multistep._ratios(sch, i, 3)
            b3 = sch.alpha[i + 1] * h * multistep.phi(3, -h)
            d2 = 2.0 * (np.array([1.0, -1.0, 0.0]) / r0 - np.array([0.0, 1.0, -1.0]) / r1) / (r0 + r1)
            w = [float(v) for v in np.array(w) - 0.5 * b3 * d2]
        return cx, w

    monkeypatch.setattr(multistep, "dpmpp_weights", half_d2)
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "eps")
    errs = [exact_error(model, "dpmpp_3m", lam_grid(path, n, 152.0, 0.01)) for n in (40, 80, 160)]
    assert math.log2(errs[-2] / errs[-1]) < 2.5, errs


def test_adaptive_solver_meets_its_tolerance():
    """The adaptive Dormand-Prince reference: error against the exact map shrinks with the tolerance, on any path."""
    for pname, pred in (("vp-linear", "eps"), ("rf", "velocity")):
        path = uf.paths.get(pname)
        model = GM.model(path, pred)
        ts = lam_grid(path, 1, 80.0, 0.01)
        errs = [exact_error(model, "adaptive", ts, rtol=tol, atol=tol) for tol in (1e-4, 1e-7)]
        assert errs[1] < 1e-5 and errs[1] < errs[0] / 50, (pname, errs)


PATH_KINDS = [("ddpm-linear", "eps"), ("ddpm-cosine", "v"), ("vp-cosine", "x0"), ("ve", "score"), ("edm", "edm"),
              ("rf", "velocity"), ("trigflow", "trigflow")]


@pytest.mark.slow
@pytest.mark.parametrize("pname,pred", PATH_KINDS)
@pytest.mark.parametrize("name,order,opts,ns", ORDERS, ids=[f"{o[0]}{o[2].get('order', '')}" for o in ORDERS])
def test_every_ode_sampler_converges_on_every_path(pname, pred, name, order, opts, ns):
    """The full sweep: every ODE sampler at its order on every path and prediction kind (from high noise).
    Multistep methods start with a first-order step, whose O(h^2) error caps them at order 2 unless the grid
    starts at very high noise (ve and edm stop at sigma 50 and 80)."""
    path = uf.paths.get(pname)
    model = GM.model(path, pred)
    top = min(150.0, float(path.sigma_edm(torch.tensor(path.t_max, dtype=F64))) * 0.999)
    if top < 150.0 and name in ("dpmpp_3m", "unipc", "ipndm"):
        order = 2
    errs = [exact_error(model, name, lam_grid(path, n, top, 0.01), **opts) for n in ns]
    assert math.log2(errs[-2] / errs[-1]) > order - 0.35, errs

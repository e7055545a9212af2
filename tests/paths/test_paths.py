"""Paths: closed-form derivatives, log-SNR inverses, DDPM tables, grids, posteriors."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.paths import PATHS, time_grid
from unifuse.paths.posterior import posterior

F64 = torch.float64
ALL = sorted(PATHS)


def inner_times(path, n=64, seed=0):
    """Random times strictly inside (t_eps, t_max), plus a few near each end."""
    g = torch.Generator().manual_seed(seed)
    lo = path.t_eps if path.t_eps > path.t_min else path.t_min
    hi = path.t_max
    u = torch.rand(n, generator=g, dtype=F64) * 0.98 + 0.01
    return lo + u * (hi - lo)


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_autograd(name):
    path = uf.paths.get(name)
    t = inner_times(path).requires_grad_(True)
    for value, deriv in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        out = value(t)
        grad = torch.autograd.grad(out.sum(), t)[0] if out.requires_grad else torch.zeros_like(t)
        torch.testing.assert_close(deriv(t.detach()), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_inverse_round_trips(name):
    path = uf.paths.get(name)
    t = inner_times(path)
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(t)), t, rtol=1e-10, atol=1e-10)
    lam = path.log_snr(t)
    expected = torch.log(path.alpha(t) ** 2 / path.sigma(t) ** 2)
    torch.testing.assert_close(lam, expected, rtol=1e-10, atol=1e-10)
    assert bool((lam[1:] < lam[:-1]).eq(t[1:] > t[:-1]).all()), "log-SNR must decrease in t"


@pytest.mark.parametrize("name", ALL)
def test_endpoints(name):
    path = uf.paths.get(name)
    t_min = torch.tensor(path.t_min, dtype=F64)
    assert float(path.alpha(t_min)) == 1.0 and float(path.sigma(t_min)) == 0.0
    assert path.prior_sigma == pytest.approx(float(path.sigma(torch.tensor(path.t_max, dtype=F64))))
    assert path.t_min <= path.t_eps < path.t_max


def test_dtype_is_preserved_and_computed_in_float64():
    path = uf.paths.get("vp-linear")
    t32 = torch.tensor([1e-4], dtype=torch.float32)
    assert path.sigma(t32).dtype == torch.float32
    # sigma = sqrt(1 - alpha^2) near t = 0 is accurate because it is computed in float64
    exact = math.sqrt(-math.expm1(2 * (-0.25 * 1e-8 * 19.9 - 0.5 * 1e-4 * 0.1)))
    assert float(path.sigma(t32)) == pytest.approx(exact, rel=1e-6)


def test_ddpm_linear_is_exact_at_integer_steps():
    path = uf.paths.DDPM.linear()
    n = torch.arange(1000, dtype=F64)
    torch.testing.assert_close(path.alpha(n) ** 2, path.alphas_cumprod, rtol=1e-13, atol=0)
    assert float(path.alphas_cumprod[-1]) == pytest.approx(4.0358e-05, rel=1e-4)
    lam = path.log_snr(n)
    assert float(lam[0]) == pytest.approx(9.21, abs=0.01) and float(lam[-1]) == pytest.approx(-10.12, abs=0.01)
    # between steps: strictly monotone, and within the neighbouring knots
    mid = n[:-1] + 0.5
    a = path.alpha(mid)
    assert bool(((a < path.alpha(n[:-1])) & (a > path.alpha(n[1:]))).all())


def test_ddpm_cosine_and_scaled_linear_tables():
    cos = uf.paths.DDPM.cosine()
    assert float(cos.alphas_cumprod[-1]) == pytest.approx(2.43e-9, rel=0.01)
    assert int((cos.betas >= 0.999).sum()) == 1
    sl = uf.paths.DDPM.scaled_linear()
    assert float(sl.alphas_cumprod[-1]) == pytest.approx(4.66e-3, rel=0.01)


def test_zero_terminal_snr_rescaling():
    sl = uf.paths.DDPM.scaled_linear()
    z = sl.zero_terminal_snr()
    assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.betas[-1]) == pytest.approx(1.0)
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(sl.alphas_cumprod[0]), rel=1e-12)
    assert float(z.alphas_cumprod[-2]) == pytest.approx(1.968e-7, rel=0.01)
    assert float(z.log_snr(torch.tensor(999.0, dtype=F64))) == -math.inf
    assert float(z.t_from_log_snr(torch.tensor(-math.inf, dtype=F64))) == 999.0


def test_user_beta_table_and_other_T():
    path = uf.paths.DDPM(torch.full((50,), 0.05, dtype=F64))
    assert path.N == 50 and path.t_max == 49
    lin = uf.paths.DDPM.linear(T=4000)
    assert float(lin.betas[0]) == pytest.approx(2.5e-5) and float(lin.betas[-1]) == pytest.approx(0.005)


def test_ddpm_posterior_variance_is_beta_tilde():
    path = uf.paths.DDPM.linear()
    n = torch.arange(1, 1000, dtype=F64)
    post = posterior(path, n - 1, n)
    ab = path.alphas_cumprod
    beta_tilde = (1 - ab[:-1]) / (1 - ab[1:]) * path.betas[1:]
    torch.testing.assert_close(post.var_small, beta_tilde, rtol=1e-9, atol=0)
    torch.testing.assert_close(post.var_large, path.betas[1:], rtol=1e-9, atol=0)
    # DDPM posterior mean coefficients (NOTATION 2)
    torch.testing.assert_close(post.c_x0, ab[:-1].sqrt() * path.betas[1:] / (1 - ab[1:]), rtol=1e-9, atol=0)
    torch.testing.assert_close(post.c_xt, (1 - path.betas[1:]).sqrt() * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-9, atol=0)


def test_vp_matches_handbook_numbers():
    vp = uf.paths.get("vp-linear")
    assert float(vp.alpha(torch.tensor(1.0, dtype=F64)) ** 2) == pytest.approx(4.32e-5, rel=0.01)
    assert float(vp.log_snr(torch.tensor(1e-3, dtype=F64))) == pytest.approx(9.12, abs=0.01)
    # g^2 = beta(t) = -sigma^2 dlambda/dt
    t = torch.linspace(0.05, 0.95, 7, dtype=F64).requires_grad_(True)
    (dlam,) = torch.autograd.grad(vp.log_snr(t).sum(), t)
    torch.testing.assert_close(-vp.sigma(t.detach()) ** 2 * dlam, vp.beta(t.detach()), rtol=1e-9, atol=0)


def test_trigflow_and_rf_maps():
    trig = uf.paths.TrigFlow(sigma_d=0.5)
    assert float(trig.t_from_sigma_edm(torch.tensor(80.0, dtype=F64))) == pytest.approx(1.56455, abs=1e-5)
    assert float(trig.alpha(torch.tensor(math.pi / 2, dtype=F64))) == 0.0
    rf = uf.paths.RectifiedFlow()
    t = torch.linspace(0.1, 0.9, 5, dtype=F64)
    torch.testing.assert_close(rf.sigma_edm(t), t / (1 - t))


# --- grids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("spacing", uf.paths.SPACINGS)
def test_every_grid_ends_on_data_and_decreases(name, spacing):
    path = uf.paths.get(name)
    for steps in (1, 2, 7, 25):
        if spacing == "leading" and isinstance(path, uf.paths.DDPM) and steps > path.N:
            continue
        ts = time_grid(path, steps, spacing)
        assert ts.dtype == F64 and ts.numel() == steps + 1
        assert float(ts[-1]) == path.t_min
        assert bool((ts[1:] < ts[:-1]).all())
        assert float(ts[0]) <= path.t_max


def test_ddpm_index_spacings_match_diffusers_conventions():
    path = uf.paths.DDPM.linear()
    lead = time_grid(path, 50, "leading")[:-1]
    assert lead[:3].tolist() == [980, 960, 940] and float(lead[-1]) == 0
    lin = time_grid(path, 50, "linspace")[:-1]
    assert lin[:3].tolist() == [999, 979, 958] and float(lin[-1]) == 0
    trail = time_grid(path, 50, "trailing")[:-1]
    assert trail[:2].tolist() == [999, 979] and float(trail[-1]) == 19
    assert time_grid(path, 3, "leading")[:-1].tolist() == [666, 333, 0]
    assert time_grid(path, 1, "trailing")[:-1].tolist() == [999]
    assert time_grid(path, 1, "leading")[:-1].tolist() == [0]
    assert time_grid(path, 10, "leading", steps_offset=1)[:-1].tolist()[0] == 901


def test_karras_grid_matches_edm_18_steps():
    ts = time_grid(uf.paths.get("edm"), 18, "karras")
    expected = [80, 57.586, 40.786, 28.375, 19.353, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088,
                0.5853, 0.2964, 0.1395, 0.0599, 0.0229, 0.0075, 0.002, 0]
    torch.testing.assert_close(ts, torch.tensor(expected, dtype=F64), rtol=2e-3, atol=1e-4)


def test_logsnr_grid_is_uniform_in_log_snr_and_shift_divides_snr():
    vp = uf.paths.get("vp-linear")
    lam = vp.log_snr(time_grid(vp, 10, "logsnr")[:-1])
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=1e-9)
    rf = uf.paths.get("rf")
    plain, shifted = time_grid(rf, 8, "shift", shift=1.0), time_grid(rf, 8, "shift", shift=3.0)
    inner = slice(1, -1)
    snr_ratio = torch.exp(rf.log_snr(plain[inner]) - rf.log_snr(shifted[inner]))
    torch.testing.assert_close(snr_ratio, torch.full_like(snr_ratio, 9.0), rtol=1e-9, atol=0)


def test_user_grid_gets_data_end_and_is_validated():
    vp = uf.paths.get("vp-linear")
    ts = time_grid(vp, 3, torch.tensor([1.0, 0.5, 0.1], dtype=F64))
    assert ts.tolist() == [1.0, 0.5, 0.1, 0.0]
    with pytest.raises(uf.UnifuseError, match="decrease strictly"):
        time_grid(vp, 3, torch.tensor([1.0, 0.1, 0.5]))
    with pytest.raises(uf.UnifuseError, match="domain"):
        time_grid(vp, 3, torch.tensor([2.0, 0.5]))


def test_bad_names_give_clear_errors():
    with pytest.raises(uf.UnifuseError, match="unknown path 'vp'.*valid paths: .*vp-linear"):
        uf.paths.get("vp")
    with pytest.raises(uf.UnifuseError, match="unknown spacing 'karas'.*karras"):
        time_grid(uf.paths.get("edm"), 5, "karas")
    with pytest.raises(uf.UnifuseError, match="bad option for path 've'"):
        uf.paths.get("ve", beta_max=3)
    with pytest.raises(uf.UnifuseError, match="positive integer"):
        time_grid(uf.paths.get("edm"), 0)
    with pytest.raises(uf.UnifuseError, match="betas"):
        uf.paths.DDPM([0.5, 1.5])

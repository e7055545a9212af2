"""Prediction kinds: exact round trips, agreement with the oracle's own formulas, singular ends."""
import itertools
import math

import pytest
import torch

import unifuse as uf
from unifuse.parameterization import KINDS, coefficients, convert, from_pair, input_scale, to_pair
from unifuse.parameterization.precond import consistency_scalings, x0_from_raw
from unifuse.testing import GaussianMixture

from ..paths.test_paths import ALL, inner_times

F64 = torch.float64
ALL_KINDS = KINDS + ("edm", "trigflow")


def oracle_output(gm, path, kind, x, t):
    """The oracle network's raw output of one kind (preconditioned kinds see x_t / r)."""
    scale = input_scale(coefficients(path, t, x), 0.5) if kind in ("edm", "trigflow") else 1.0
    return gm.model(path, kind).net(x * scale, t)


def mixture():
    return GaussianMixture([0.2, 0.5, 0.3], [[1.0, -1.0, 0.5], [-0.5, 2.0, 0.0], [0.0, 0.0, -1.5]],
                           [[0.05, 0.3, 0.2], [1.0, 0.5, 0.7], [0.4, 0.4, 0.4]])


@pytest.mark.parametrize("name", ALL)
def test_every_conversion_round_trips_in_float64(name):
    path = uf.paths.get(name)
    t = inner_times(path, n=32, seed=1)
    x = torch.randn(32, 3, dtype=F64)
    c = coefficients(path, t, x)
    out = torch.randn(32, 3, dtype=F64)
    for src, dst in itertools.permutations(ALL_KINDS, 2):
        back = convert(convert(out, src, dst, x, c), dst, src, x, c)
        torch.testing.assert_close(back, out, rtol=1e-6, atol=1e-6, msg=f"{src} -> {dst} -> {src} on {name}")


@pytest.mark.parametrize("name", ALL)
def test_conversions_agree_with_the_oracle_formulas(name):
    """The oracle writes each kind out by itself; the converter must reproduce every one from any other."""
    gm, path = mixture(), uf.paths.get(name)
    t = inner_times(path, n=16, seed=2)
    x = torch.randn(16, 3, dtype=F64) * 2
    truth = {k: oracle_output(gm, path, k, x, t) for k in ALL_KINDS}
    c = coefficients(path, t, x)
    for src, dst in itertools.permutations(ALL_KINDS, 2):
        got = convert(truth[src], src, dst, x, c)
        torch.testing.assert_close(got, truth[dst], rtol=1e-6, atol=1e-6, msg=f"{src} -> {dst} on {name}")


def test_known_closed_forms():
    """VP v-prediction and rectified-flow velocity formulas of NOTATION 6.1 and 6.4."""
    x0, eps = torch.randn(8, 4, dtype=F64), torch.randn(8, 4, dtype=F64)
    vp = uf.paths.get("vp-linear")
    t = torch.rand(8, dtype=F64) * 0.9 + 0.05
    c = coefficients(vp, t, x0)
    x_t = c.alpha * x0 + c.sigma * eps
    v = from_pair("v", x0, eps, x_t, c)
    torch.testing.assert_close(c.alpha * x_t - c.sigma * v, x0)  # diffusers' VP formula
    rf = uf.paths.get("rf")
    t_rf = (c.sigma / (c.alpha + c.sigma)).flatten()
    x_rf = x_t / (c.alpha + c.sigma)
    u_rf = from_pair("velocity", x0, eps, x_rf, coefficients(rf, t_rf, x0))
    torch.testing.assert_close(u_rf, (c.sigma - c.alpha) * x_t + (c.alpha + c.sigma) * v)
    torch.testing.assert_close(u_rf, eps - x0)


def test_singular_conversions_raise_instead_of_returning_inf():
    rf = uf.paths.get("rf")
    x = torch.randn(2, 3, dtype=F64)
    noise_end = coefficients(rf, torch.ones(2, dtype=F64), x)
    with pytest.raises(uf.UnifuseError, match="alpha = 0"):
        to_pair("eps", x, x, noise_end)
    data_end = coefficients(rf, torch.zeros(2, dtype=F64), x)
    with pytest.raises(uf.UnifuseError, match="sigma = 0"):
        to_pair("x0", x, x, data_end)
    with pytest.raises(uf.UnifuseError, match="sigma = 0"):
        from_pair("score", x, x, x, data_end)
    vp0 = coefficients(uf.paths.get("vp-linear"), torch.zeros(2, dtype=F64), x)
    with pytest.raises(uf.UnifuseError, match="velocity is singular"):
        from_pair("velocity", x, x, x, vp0)
    # the velocity and v views stay finite at both ends of the rectified-flow path
    for c in (noise_end, data_end):
        x0, eps = to_pair("velocity", x, x, c)
        assert bool(torch.isfinite(x0).all() & torch.isfinite(eps).all())
    with pytest.raises(uf.UnifuseError, match="unknown prediction kind 'noise'"):
        convert(x, "noise", "x0", x, data_end)


def test_edm_and_trigflow_optimum_is_zero_for_gaussian_data_of_std_sigma_data():
    gm = GaussianMixture.gaussian([0.0, 0.0], 0.5)
    for name in ("edm", "vp-linear", "trigflow", "rf"):
        path = uf.paths.get(name)
        t = inner_times(path, n=8)
        x = torch.randn(8, 2, dtype=F64)
        x0 = gm.x0_hat(x, path.alpha(t), path.sigma(t))
        c = coefficients(path, t, x)
        for kind in ("edm", "trigflow"):
            F = from_pair(kind, x0, (x - c.alpha * x0) / c.sigma, x, c)
            torch.testing.assert_close(F, torch.zeros_like(F), atol=1e-12, rtol=0)


def test_trigflow_precond_is_cos_sin_form_on_trigflow():
    sd = 0.5
    path = uf.paths.TrigFlow(sigma_d=sd)
    t = inner_times(path, n=8)
    x, F = torch.randn(8, 3, dtype=F64), torch.randn(8, 3, dtype=F64)
    c = coefficients(path, t, x)
    got = x0_from_raw("trigflow", F, x, c, sd)
    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    torch.testing.assert_close(got, cos * x - sin * sd * F)
    torch.testing.assert_close(input_scale(c, sd) * x, x / sd)  # the network sees x_t / sigma_d


def test_consistency_boundary_condition_is_exact():
    edm = uf.paths.get("edm")
    x, F = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    c = coefficients(edm, torch.full((4,), 0.002, dtype=F64), x)
    k_skip, k_out = consistency_scalings(c, 0.5, 0.002)
    assert bool((k_skip == 1).all()) and bool((k_out == 0).all())
    torch.testing.assert_close(x0_from_raw("consistency", F, x, c, 0.5, 0.002), x)
    # away from the boundary the CM scalings equal the paper's formulas in EDM units
    s = torch.tensor([0.5, 3.0, 80.0], dtype=F64)
    c = coefficients(edm, s, torch.zeros(3, 1, dtype=F64))
    k_skip, k_out = consistency_scalings(c, 0.5, 0.002)
    torch.testing.assert_close(k_skip.flatten(), 0.25 / ((s - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(k_out.flatten(), 0.5 * (s - 0.002) / torch.sqrt(0.25 + s**2))


def test_edm_loss_weight_times_c_out_squared_is_one():
    sd = 0.5
    s = torch.logspace(-3, 2, 20, dtype=F64)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    lam = (s**2 + sd**2) / (s * sd) ** 2
    torch.testing.assert_close(lam * c_out**2, torch.ones_like(s))
    assert math.isfinite(float(lam[0]))

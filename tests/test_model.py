"""DiffusionModel: predictions, re-expression on other paths (velocity mapping), errors."""
import itertools

import pytest
import torch

import unifuse as uf
from unifuse.parameterization import KINDS
from unifuse.testing import GaussianMixture

from .parameterization.test_convert import mixture
from .paths.test_paths import ALL, inner_times

F64 = torch.float64


@pytest.mark.parametrize("name", ALL)
def test_predict_returns_every_kind_exactly(name):
    gm, path = mixture(), uf.paths.get(name)
    t = inner_times(path, n=16, seed=3)
    x = torch.randn(16, 3, dtype=F64)
    a, s = path.alpha(t), path.sigma(t)
    for source in KINDS + ("edm", "trigflow"):
        model = gm.model(path, source)
        torch.testing.assert_close(model.predict(x, t, "x0"), gm.x0_hat(x, a, s), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.predict(x, t, "score"), gm.score(x, a, s), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.predict(x, t, "eps"), gm.eps_hat(x, a, s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("source_name, target_name", list(itertools.product(ALL, ALL)))
def test_on_equals_the_oracle_written_directly_on_the_other_path(source_name, target_name):
    gm = mixture()
    source, target = uf.paths.get(source_name), uf.paths.get(target_name)
    model = gm.model(source, "eps" if source_name.startswith("ddpm") else "velocity").on(target)
    t = inner_times(target, n=16, seed=4)
    t = t[t <= model.t_max]  # times the source covers (the target may reach lower log-SNR)
    x = torch.randn(t.numel(), 3, dtype=F64) * target.sigma(t)[:, None]
    direct = gm.model(target, "x0")
    for kind in KINDS:
        torch.testing.assert_close(model.predict(x, t, kind), direct.predict(x, t, kind), rtol=1e-6, atol=1e-6,
                                   msg=f"{kind}: {source_name} seen on {target_name}")


def test_on_maps_a_ddpm_eps_model_to_rf_trigflow_edm_and_back():
    gm = mixture()
    ddpm = uf.paths.get("ddpm-linear")
    model = gm.model(ddpm, "eps")
    chain = model.on(uf.paths.get("rf")).on(uf.paths.get("trigflow")).on(uf.paths.get("edm")).on(ddpm)
    n = torch.tensor([10.0, 250.5, 700.0, 990.0], dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(chain.predict(x, n, "eps"), model.predict(x, n, "eps"), rtol=1e-9, atol=1e-9)
    # the RF view's noise end is capped at the DDPM model's lowest log-SNR
    rf_view = model.on(uf.paths.get("rf"))
    assert rf_view.t_max < 1.0
    assert float(uf.paths.get("rf").log_snr(torch.tensor(rf_view.t_max, dtype=F64))) == pytest.approx(
        float(ddpm.log_snr(torch.tensor(999.0, dtype=F64))), abs=1e-9)
    with pytest.raises(uf.UnifuseError, match="beyond the noise end"):
        rf_view.predict(x, torch.ones(4, dtype=F64), "x0")


def test_velocity_mapping_vp_v_to_rf_velocity():
    """NOTATION 6.4: u_rf = (sigma - alpha) x_vp + (alpha + sigma) v at t_rf = sigma/(alpha + sigma)."""
    gm = mixture()
    vp, rf = uf.paths.get("vp-cosine"), uf.paths.get("rf")
    t = torch.tensor([0.1, 0.4, 0.8], dtype=F64)
    a, s = vp.alpha(t)[:, None], vp.sigma(t)[:, None]
    x_vp = torch.randn(3, 3, dtype=F64)
    v = gm.model(vp, "v").predict(x_vp, t, "v")
    rf_model = gm.model(vp, "v").on(rf)
    u = rf_model.predict(x_vp / (a + s), (s / (a + s)).flatten(), "velocity")
    torch.testing.assert_close(u, (s - a) * x_vp + (a + s) * v)


def test_model_accepts_plain_functions_and_scalar_times():
    path = uf.paths.get("rf")
    model = uf.DiffusionModel(lambda x, t: -x, path, "velocity")
    x = torch.randn(5, 2)
    out = model.predict(x, 0.5, "x0")
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x - 0.5 * -x)  # x0 = x - t u


def test_learned_variance_split_and_fraction():
    path = uf.paths.get("ddpm-linear")
    net = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], 1)
    model = uf.DiffusionModel(net, path, "eps", learned_variance=True)
    ev = model.evaluate(torch.randn(3, 2, 4, 4), 500.0)
    assert ev.var_frac.shape == (3, 2, 4, 4) and float(ev.var_frac.mean()) == pytest.approx(0.75)


def test_bad_input_gives_one_clear_error():
    path = uf.paths.get("vp-linear")
    with pytest.raises(uf.UnifuseError, match="unknown prediction 'epsilon'.*valid predictions"):
        uf.DiffusionModel(lambda x, t: x, path, "epsilon")
    with pytest.raises(uf.UnifuseError, match="net must be callable"):
        uf.DiffusionModel(3, path)
    with pytest.raises(uf.UnifuseError, match="path must be a unifuse path"):
        uf.DiffusionModel(lambda x, t: x, "vp-linear")
    model = uf.DiffusionModel(lambda x, t: x[:, :1], path, "eps")
    with pytest.raises(uf.UnifuseError, match=r"returned shape \(4, 1\) for input shape \(4, 3\)"):
        model.predict(torch.randn(4, 3), 0.5)
    ok = uf.DiffusionModel(lambda x, t: x, path, "eps")
    with pytest.raises(uf.UnifuseError, match=r"shape \[batch\] = \[4\]"):
        ok.predict(torch.randn(4, 3), torch.rand(3))
    with pytest.raises(uf.UnifuseError, match="unknown prediction kind 'flow'"):
        ok.predict(torch.randn(4, 3), 0.5, "flow")
    lv = uf.DiffusionModel(lambda x, t: x, path, "eps", learned_variance=True)
    with pytest.raises(uf.UnifuseError, match="2C = 6 channels"):
        lv.evaluate(torch.randn(4, 3), 0.5)


def test_eps_model_at_zero_snr_raises():
    path = uf.paths.DDPM.linear(zero_terminal_snr=True)
    model = uf.DiffusionModel(lambda x, t: x, path, "eps")
    with pytest.raises(uf.UnifuseError, match="alpha = 0"):
        model.denoise(torch.randn(2, 3), 999.0)
    v_model = uf.DiffusionModel(lambda x, t: x, path, "v")
    x = torch.randn(2, 3)
    torch.testing.assert_close(v_model.denoise(x, 999.0), -x)  # at alpha = 0, x0 = -v


def test_gaussian_oracle_is_a_proper_module():
    gm = GaussianMixture.gaussian([0.3], 0.5)
    model = gm.model(uf.paths.get("edm"), "edm")
    assert isinstance(model, torch.nn.Module) and "edm" in repr(model)

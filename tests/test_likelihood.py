"""PF-ODE log-likelihood against the exact Gaussian-mixture log-density (GAUSSIAN_ORACLE sections 2 and 6)."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.likelihood import (
    T,
    bits_per_dim,
    dequantize,
    hutchinson_probes,
    image_levels,
    jacobian_trace,
    log_likelihood,
    nll_report,
    prior_log_prob,
)
from unifuse.testing import GaussianMixture

F64 = torch.float64
PATHS = ["ddpm-linear", "ddpm-cosine", "ddpm-scaled-linear", "vp-linear", "vp-cosine", "ve", "edm", "rf", "trigflow"]


def mixture(D=2):
    means = [[-0.5, 0.2, 0.1][:D], [0.6, -0.3, 0.4][:D]]
    stds = [[0.3, 0.2, 0.5][:D], [0.25, 0.4, 0.3][:D]]
    return GaussianMixture([0.3, 0.7], means, stds)


def exact_at_start(gm, path, x, out):
    return gm.log_prob(x, path.alpha(T(out.t_start)), path.sigma(T(out.t_start)))


def exact_prior(gm, path, out):
    return lambda x_end: gm.log_prob(x_end, path.alpha(T(out.t_end)), path.sigma(T(out.t_end)))


@pytest.mark.parametrize("name", PATHS)
def test_pf_ode_log_likelihood_is_exact_on_every_path(name):
    path = uf.paths.get(name)
    for gm in (GaussianMixture.gaussian([0.4, -0.3], [0.5, 0.2]), mixture()):
        x = gm.sample(16, torch.Generator().manual_seed(1))[0]
        out = log_likelihood(gm.model(path, "x0"), x, return_details=True)
        exact = exact_at_start(gm, path, x, out)
        # with the exact q_{t_end} in place of the prior, only the solver's error remains
        with_exact_prior = out.log_prob - out.prior + exact_prior(gm, path, out)(out.x_end)
        assert float((with_exact_prior - exact).abs().max()) / 2 < 1e-4
        # the library's prior N(0, sigma^2) ignores alpha(t_max) x: small on average over data
        assert abs(float((out.log_prob - exact).mean())) / 2 < 0.01


@pytest.mark.parametrize("name,kinds", [("vp-linear", ["eps", "v", "score", "velocity", "edm", "trigflow"]),
                                        ("rf", ["velocity", "v", "eps"]),
                                        ("ddpm-cosine", ["eps"])])
def test_every_prediction_kind_gives_the_same_likelihood(name, kinds):
    gm, path = mixture(3), uf.paths.get(name)
    x = gm.sample(8, torch.Generator().manual_seed(2))[0]
    ref = log_likelihood(gm.model(path, "x0"), x, return_details=True)
    for kind in kinds:
        out = log_likelihood(gm.model(path, kind), x, return_details=True)
        fix = exact_prior(gm, path, out)(out.x_end) - out.prior
        assert float((out.log_prob + fix - exact_at_start(gm, path, x, out)).abs().max()) / 3 < 1e-4, kind
        assert float((out.log_prob - ref.log_prob).abs().max()) / 3 < 2e-3, kind


def test_reexpressed_model_and_conditioning():
    gm, path = mixture(), uf.paths.get("edm")
    x = gm.sample(6, torch.Generator().manual_seed(3))[0]
    # a VP model seen on the EDM path has the same PF-ODE density at equal log-SNR
    vp = gm.model(uf.paths.get("vp-linear"), "eps").on(path)
    out = log_likelihood(vp, x, sigma_start=0.01, return_details=True)
    fix = exact_prior(gm, path, out)(out.x_end) - out.prior
    assert float((out.log_prob + fix - exact_at_start(gm, path, x, out)).abs().max()) < 2e-4
    # class-conditional: the PF-ODE of class k carries the density of component k
    cond = gm.model(path, "x0", conditional=True)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    out = log_likelihood(cond, x, class_labels=labels, prior=lambda z: torch.zeros(z.shape[0], dtype=F64),
                         batch_size=4, return_details=True)
    a, s = path.alpha(T(out.t_start)), path.sigma(T(out.t_start))
    comp = [GaussianMixture.gaussian(gm.means[k], gm.stds[k]) for k in range(2)]
    exact = torch.stack([comp[int(k)].log_prob(x[i:i + 1], a, s)[0] for i, k in enumerate(labels)])
    a1, s1 = path.alpha(T(out.t_end)), path.sigma(T(out.t_end))
    prior = torch.stack([comp[int(k)].log_prob(out.x_end[i:i + 1], a1, s1)[0] for i, k in enumerate(labels)])
    assert float((out.log_prob + prior - exact).abs().max()) < 2e-4


def test_data_aware_prior_and_single_gaussian_closed_form():
    # zero-mean data: N(0, alpha^2 s^2 + sigma^2) is the exact q_T, so the result is exact end to end
    gm = GaussianMixture.gaussian([0.0, 0.0, 0.0], 0.7)
    path = uf.paths.get("vp-linear")
    x = gm.sample(8, torch.Generator().manual_seed(4))[0]
    out = log_likelihood(gm.model(path, "eps"), x, data_std=0.7, rtol=1e-7, atol=1e-7, return_details=True)
    assert float((out.log_prob - exact_at_start(gm, path, x, out)).abs().max()) < 1e-5
    # the endpoint is the closed-form PF-ODE map of a single Gaussian (GAUSSIAN_ORACLE 4)
    a0, s0, a1, s1 = (f(T(t)) for t in (out.t_start, out.t_end) for f in (path.alpha, path.sigma))
    assert torch.allclose(out.x_end, gm.pf_ode_map(x, a0, s0, a1, s1), atol=1e-5)
    assert torch.allclose(prior_log_prob(path, out.x_end, out.t_end, data_std=0.7), gm.log_prob(out.x_end, a1, s1))


def test_rk4_converges_at_fourth_order():
    gm, path = mixture(), uf.paths.get("vp-linear")
    x = gm.sample(8, torch.Generator().manual_seed(5))[0]
    m = gm.model(path, "eps")
    errs = []
    for steps in (8, 16):
        out = log_likelihood(m, x, solver="rk4", steps=steps, return_details=True)
        fix = exact_prior(gm, path, out)(out.x_end) - out.prior
        errs.append(float((out.log_prob + fix - exact_at_start(gm, path, x, out)).abs().max()))
        assert out.nfe == 4 * steps
    assert errs[0] / errs[1] > 8, errs


def test_exact_divergence_matches_the_oracle_trace():
    gm, path = mixture(3), uf.paths.get("rf")
    g = torch.Generator().manual_seed(6)
    x = gm.sample(5, g)[0]
    m = gm.model(path, "v")
    for t in (0.05, 0.5, 0.95):
        xt = path.interpolate(x, torch.randn(x.shape, generator=g, dtype=F64), T(t))
        _, div = jacobian_trace(lambda z: m.predict(z, T(t), "velocity"), xt)
        assert torch.allclose(div, gm.velocity_divergence(xt, path, T(t)), atol=1e-9)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    gm, path = mixture(3), uf.paths.get("vp-linear")
    g = torch.Generator().manual_seed(7)
    m = gm.model(path, "eps")
    # one point, 4000 probes as 4000 replicas of the batch: the mean is the exact trace within its SE
    xt = path.interpolate(gm.sample(1, g)[0], torch.randn(1, 3, generator=g, dtype=F64), T(0.3)).expand(4000, 3)
    probes = hutchinson_probes(xt, 1, kind, g)
    _, est = jacobian_trace(lambda z: m.predict(z, T(0.3), "velocity"), xt, probes)
    exact = float(gm.velocity_divergence(xt[:1], path, T(0.3)))
    se = float(est.std()) / math.sqrt(est.numel())
    assert abs(float(est.mean()) - exact) < 4 * se and se > 0
    # whole solves on a fixed RK4 grid: the estimate is linear in the probes, so E[hutchinson] = exact
    x = gm.sample(6, g)[0]
    ref = log_likelihood(m, x, solver="rk4", steps=8, divergence="exact")
    runs = torch.stack([log_likelihood(m, x, solver="rk4", steps=8, divergence="hutchinson", probe=kind,
                                       n_probes=2, generator=g) for _ in range(16)])
    z = (runs.mean(0) - ref) / (runs.std(0) / 4)
    assert float(z.abs().max()) < 4.5 and float(runs.std(0).max()) > 0


def test_dequantization_and_bits_per_dim_convention():
    # levels: uint8 and k/127.5 - 1 agree; dequantized values fill k's bin [k/128 - 1, (k+1)/128 - 1)
    k = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(image_levels(k), image_levels(k.double() / 127.5 - 1))
    y = dequantize(k.expand(64, 256), torch.Generator().manual_seed(0), F64)
    lo = k.double() / 128 - 1
    assert bool(((y >= lo) & (y < lo + 1 / 128)).all())
    # exact case: one Gaussian at t_start; E_u log N(y) over a bin is log N(c) - w^2 / (24 v) per dimension
    gm = GaussianMixture.gaussian([0.1, -0.3], [0.3, 0.2])
    path = uf.paths.get("rf")
    model = gm.model(path, "x0")
    img = torch.tensor([[140, 90]], dtype=torch.uint8).expand(512, 2)
    g = torch.Generator().manual_seed(1)
    bpd, det = bits_per_dim(model, img, generator=g, dtype=F64, prior=None, return_details=True, rtol=1e-6, atol=1e-6)
    out = det[0]
    a, s = path.alpha(T(out.t_start)), path.sigma(T(out.t_start))
    v = a * a * gm.stds[0] ** 2 + s * s
    c, w = (img[0].double() + 0.5) / 128 - 1, 1 / 128
    e_logp = (-0.5 * torch.log(2 * math.pi * v) - 0.5 * ((c - a * gm.means[0]) ** 2 + w * w / 12) / v).sum()
    expected = float(-e_logp / (2 * math.log(2)) + 7)
    se = float(bpd.std()) / math.sqrt(bpd.numel())
    prior_bias = 1e-3  # rf: alpha(t_max) = 0, so the prior is exact; this is the solver's allowance
    assert abs(float(bpd.mean()) - expected) < 4 * se + prior_bias, (float(bpd.mean()), expected, se)
    # the importance-weighted bound with 4 draws is tighter on average
    bpd4 = bits_per_dim(model, img[:64], generator=g, dtype=F64, n_dequant=4)
    assert float(bpd4.mean()) < float(bpd.mean())


def test_bits_per_dim_rejects_bad_images_and_bad_options():
    gm = GaussianMixture.gaussian([0.0, 0.0], 0.5)
    model = gm.model(uf.paths.get("rf"), "x0")
    with pytest.raises(uf.UnifuseError, match="outside"):
        bits_per_dim(model, torch.full((2, 2), 1.5))
    with pytest.raises(uf.UnifuseError, match="256-level grid"):
        bits_per_dim(model, torch.full((2, 2), 0.123))
    with pytest.raises(uf.UnifuseError, match="n_dequant"):
        bits_per_dim(model, torch.zeros(2, 2, dtype=torch.uint8), n_dequant=0)
    with pytest.raises(uf.UnifuseError, match="shape"):
        log_likelihood(model, torch.zeros(2, 3, dtype=F64))  # the model's data are 2-D
    with pytest.raises(uf.UnifuseError, match="batch"):
        log_likelihood(model, torch.zeros(3, dtype=F64))
    with pytest.raises(uf.UnifuseError, match="NaN"):
        log_likelihood(model, torch.full((2, 2), math.nan, dtype=F64))
    with pytest.raises(uf.UnifuseError, match="t_start"):
        log_likelihood(model, torch.zeros(2, 2, dtype=F64), t_start=0.0)
    with pytest.raises(uf.UnifuseError, match="divergence"):
        log_likelihood(model, torch.zeros(2, 2, dtype=F64), divergence="trace")
    with pytest.raises(uf.UnifuseError, match="max_steps"):
        log_likelihood(model, torch.zeros(2, 2, dtype=F64), rtol=1e-12, atol=1e-12, max_steps=5)


def test_solver_reports_a_non_finite_model():
    gm = GaussianMixture.gaussian([0.0, 0.0], 0.5)
    path = uf.paths.get("rf")
    bad = uf.DiffusionModel(lambda x, t: x * torch.where(t > 0.5, math.nan, 1.0).reshape(-1, 1), path, "x0")
    with pytest.raises(uf.UnifuseError, match="finite"):
        log_likelihood(bad, gm.sample(2)[0])


def test_nll_report_and_batching():
    gm = GaussianMixture.gaussian([0.1, -0.2], [0.3, 0.4])
    path = uf.paths.DDPM.linear(T=50)
    model = gm.model(path, "eps")
    imgs = ((gm.sample(6, torch.Generator().manual_seed(8))[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rep = nll_report(model, imgs, batch_size=4, dtype=F64, progress=False)
    for key in ("bpd", "bpd_sem", "seconds_per_image", "nfe_mean", "sigma_start", "vlb_bpd", "convention"):
        assert key in rep
    assert rep["n_images"] == 6 and 0 < rep["bpd"] < rep["vlb_bpd"] + 1
    # splitting into batches changes only the shared adaptive step sequence: agreement to the tolerance
    y = dequantize(imgs, torch.Generator().manual_seed(0), F64)
    model = gm.model(uf.paths.get("rf"), "x0")
    whole = log_likelihood(model, y, rtol=1e-7, atol=1e-7)
    split = log_likelihood(model, y, rtol=1e-7, atol=1e-7, batch_size=2)
    assert float((whole - split).abs().max()) < 1e-4


def test_evaluation_turns_dropout_off_and_restores_the_mode():
    gm = GaussianMixture.gaussian([0.1, -0.2], [0.3, 0.4])
    path = uf.paths.get("rf")
    oracle = gm.model(path, "x0").net

    class Dropped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(oracle(x, t))

    model = uf.DiffusionModel(Dropped(), path, "x0")
    model.train()
    x = gm.sample(4, torch.Generator().manual_seed(9))[0]
    out = log_likelihood(model, x, return_details=True)
    assert model.training
    assert float((out.log_prob - exact_at_start(gm, path, x, out)).abs().max()) < 1e-3


def test_nll_report_splits_conditioning_with_the_batches():
    gm = mixture()
    path = uf.paths.get("rf")
    imgs = ((gm.sample(4, torch.Generator().manual_seed(10))[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    opts = dict(batch_size=2, dtype=F64, progress=False, vlb=False)
    plain = nll_report(gm.model(path, "x0"), imgs, **opts)["bpd"]
    model = gm.model(path, "x0", conditional=True)
    uncond = nll_report(model, imgs, cond={"class_labels": torch.full((4,), -1)}, **opts)["bpd"]
    labelled = nll_report(model, imgs, cond={"class_labels": torch.tensor([0, 1, 1, 0])}, **opts)["bpd"]
    assert abs(plain - uncond) < 1e-9 and abs(labelled - plain) > 1e-3

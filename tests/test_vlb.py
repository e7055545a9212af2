"""The DDPM variational bound against the exact Gaussian oracle (ALGORITHMS card 2; GAUSSIAN_ORACLE 6)."""
import math

import pytest
import torch
from torch.special import ndtr

import unifuse as uf
from unifuse.paths.posterior import posterior
from unifuse.testing import GaussianMixture
from unifuse.vlb import (
    BIN,
    ddpm_vlb,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_kl,
    reverse_log_variance,
    vlb_bits_per_dim,
    vlb_term,
)

F64 = torch.float64
GRID = torch.linspace(-1, 1, 256, dtype=F64)


def quantize(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    l1, l2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    assert torch.allclose(normal_kl(m1, l1, m2, l2), ref, atol=1e-12)
    assert float(normal_kl(m1, l1, m1, l1).abs().max()) < 1e-15


@pytest.mark.parametrize("mean,std", [(0.3, 0.4), (1.3, 1e-4), (-1.2, 3.0), (0.0, 1e-4), (0.5, 0.02), (-0.99, 0.05)])
def test_decoder_bins_sum_to_one_and_match_the_normal_cdf(mean, std):
    log_var = torch.tensor(2 * math.log(std), dtype=F64)
    lp = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean, dtype=F64), log_var)
    assert abs(float(lp.exp().sum()) - 1) < 1e-12
    lo = torch.cat([torch.tensor([-math.inf], dtype=F64), GRID[1:] - BIN])
    hi = torch.cat([GRID[:-1] + BIN, torch.tensor([math.inf], dtype=F64)])
    ref = ndtr((hi - mean) / std) - ndtr((lo - mean) / std)
    big = ref > 1e-6  # where the plain CDF difference is itself accurate
    assert torch.allclose(lp[big].exp(), ref[big], rtol=1e-9, atol=0)
    assert bool(torch.isfinite(lp).all())


def test_decoder_far_tail_is_accurate_and_differentiable():
    # bin [39, 41] sigma from the mean: log P = log(Phi(-39) - Phi(-41)) ~ log phi(39)/39
    x = torch.tensor([0.0], dtype=F64)
    std = BIN
    mean = torch.tensor([-40 * std], dtype=F64, requires_grad=True)
    lp = discretized_gaussian_log_likelihood(x, mean, torch.tensor(2 * math.log(std), dtype=F64))
    approx = -0.5 * 39**2 - math.log(39 * math.sqrt(2 * math.pi))
    assert abs(float(lp.detach()) - approx) < 0.05
    lp.sum().backward()
    assert bool(torch.isfinite(mean.grad).all())
    # float32 in the hybrid loss: gradients finite at the edge bins too
    m = torch.zeros(256, requires_grad=True)
    lv = torch.full((256,), -9.0, requires_grad=True)
    discretized_gaussian_log_likelihood(GRID.float(), m, lv).sum().backward()
    assert bool(torch.isfinite(m.grad).all() and torch.isfinite(lv.grad).all())


def test_prior_term_of_linear_ddpm():
    path = uf.paths.DDPM.linear()
    x = torch.tensor([[1.0], [-1.0], [0.0]], dtype=F64)
    for std in (None, 1.0):
        lt = prior_kl(path, x, prior_std=std)
        assert 1.9e-5 < float(lt[0]) < 2.1e-5 and 1.9e-5 < float(lt[1]) < 2.1e-5
        assert float(lt[2]) < 1e-9
    abar = float(path.alphas_cumprod[-1])  # the card's closed form for the N(0, I) prior
    assert abs(float(prior_kl(path, x, prior_std=1.0)[0]) - 0.5 * (abar * 1.0**2 - abar - math.log(1 - abar))) < 1e-12
    assert float(prior_kl(uf.paths.DDPM.cosine(), x).max()) <= 1.3e-9


def test_reverse_variances_are_beta_and_beta_tilde():
    path = uf.paths.DDPM.linear()
    n = torch.arange(1, 1000, dtype=F64)
    beta, abar = path.betas[1:], path.alphas_cumprod
    beta_tilde = (1 - abar[:-1]) / (1 - abar[1:]) * beta
    assert torch.allclose(reverse_log_variance(path, n - 1, n).exp(), beta_tilde, rtol=1e-10)
    assert torch.allclose(reverse_log_variance(path, n - 1, n, frac=torch.ones(999, dtype=F64)).exp(), beta, rtol=1e-10)
    lv0 = reverse_log_variance(path, n - 1, n, frac=torch.zeros(999, dtype=F64))
    assert torch.allclose(lv0.exp(), beta_tilde, rtol=1e-10)
    # step 0 (to the data): beta_tilde_0 = 0 is replaced by beta_tilde_1 (improved-diffusion's clipping)
    zero, minus = torch.tensor(0.0, dtype=F64), torch.tensor(-1.0, dtype=F64)
    assert abs(float(reverse_log_variance(path, minus, zero).exp()) / float(beta_tilde[0]) - 1) < 1e-10
    large = reverse_log_variance(path, minus, zero, variance="large")
    assert abs(float(large.exp()) / float(beta_tilde[0]) - 1) < 1e-10
    lv = reverse_log_variance(path, minus, zero, frac=torch.tensor([1.0], dtype=F64))
    assert abs(float(lv.exp()) / float(path.betas[0]) - 1) < 1e-10
    # a respaced chain (improved-diffusion respacing): beta' = 1 - abar_t / abar_s
    s, t = torch.tensor([99.0], dtype=F64), torch.tensor([199.0], dtype=F64)
    lv = reverse_log_variance(path, s, t, frac=torch.ones(1, dtype=F64))
    assert abs(float(lv.exp()) - (1 - float(abar[199] / abar[99]))) < 1e-12


@pytest.mark.parametrize("name", ["ddpm-linear", "vp-cosine", "edm"])
def test_kl_term_vanishes_at_the_true_posterior(name):
    path = uf.paths.get(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=F64) * 0.5
    lo, hi = float(path.t_eps) + 0.1 * (path.t_max - path.t_eps), 0.9 * path.t_max
    t = torch.linspace(lo, hi, 6, dtype=F64)
    s = t - 0.05 * (hi - lo)
    x_t = path.interpolate(x, torch.randn(6, 3, generator=g, dtype=F64), t)
    log_var = torch.log(posterior(path, s, t).var_small)[:, None]
    assert float(vlb_term(path, x, x_t, s, t, x, log_var).abs().max()) < 1e-12
    assert float(vlb_term(path, x, x_t, s, t, x + 0.1, log_var).min()) > 0


def test_vlb_term_mixes_decoder_and_kl_rows_with_finite_gradients():
    path = uf.paths.DDPM.linear()
    x = quantize(torch.rand(4, 2, dtype=F64) * 2 - 1)
    t = torch.tensor([0.0, 0.0, 10.0, 500.0], dtype=F64)
    x_t = path.interpolate(x, torch.randn(4, 2, dtype=F64), t)
    frac = torch.full((4, 2), 0.5, dtype=F64, requires_grad=True)
    lv = reverse_log_variance(path, t - 1, t, frac=frac)
    out = vlb_term(path, x, x_t, t - 1, t, x, lv)
    out.sum().backward()
    assert bool(torch.isfinite(out).all() and torch.isfinite(frac.grad).all())
    dec = -discretized_gaussian_log_likelihood(x[:2], x[:2], lv[:2]).mean(1)
    assert torch.allclose(out[:2], dec)


class IdealVarianceNet(torch.nn.Module):
    """Single-Gaussian oracle with the ideal reverse variance beta_tilde + c_x0^2 Var[x0 | x_t]
    (GAUSSIAN_ORACLE 6) expressed as Improved DDPM's interpolation fraction: 2C channels [eps, v]."""

    def __init__(self, gm, path):
        super().__init__()
        self.gm, self.path = gm, path

    def forward(self, x, t):
        t = t.to(F64)
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        x0 = self.gm.x0_hat(x, a[:, 0], s[:, 0])
        v2 = self.gm.stds**2
        post = posterior(self.path, t - 1, t)
        ideal = post.var_small[:, None] + post.c_x0[:, None] ** 2 * v2 * s**2 / (a * a * v2 + s * s)
        lo = reverse_log_variance(self.path, t - 1, t)[:, None]
        hi = reverse_log_variance(self.path, t - 1, t, frac=torch.ones_like(t))[:, None]
        frac = (torch.log(ideal) - lo) / (hi - lo)
        return torch.cat([(x - a * x0) / s, 2 * frac - 1], 1)


def test_vlb_with_ideal_variance_is_the_exact_nll():
    # with the exact reverse kernels the bound is tight: E[VLB(x)] = -log q(x) (continuous decoder)
    gm = GaussianMixture.gaussian([0.3, -0.2], [0.3, 0.5])
    path = uf.paths.DDPM.linear(T=50)
    model = uf.DiffusionModel(IdealVarianceNet(gm, path), path, "eps", learned_variance=True)
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.5, -0.9]], dtype=F64).expand(8000, 2).clone()
    v = ddpm_vlb(model, x, decoder="gaussian", generator=g).total
    nll = float(-gm.log_prob(x[:1]))
    se = float(v.std()) / math.sqrt(v.numel())
    assert abs(float(v.mean()) - nll) < 4 * se + 1e-4, (float(v.mean()), nll, se)
    # the fixed variances are strictly looser
    fixed = ddpm_vlb(gm.model(path, "eps"), x[:2000], decoder="gaussian", generator=g).total
    assert float(fixed.mean()) > nll + 0.5


def exact_discrete_nll(gm, xq):
    """-log P(bin) of 8-bit data under the mixture: products of CDF differences, edge bins to +-inf."""
    lo = torch.where(xq < -1 + BIN / 2, torch.full_like(xq, -math.inf), xq - BIN)
    hi = torch.where(xq > 1 - BIN / 2, torch.full_like(xq, math.inf), xq + BIN)
    m, s = gm.means[None], gm.stds[None]
    p = ndtr((hi[:, None] - m) / s) - ndtr((lo[:, None] - m) / s)
    return -torch.logsumexp(torch.log(gm.weights)[None] + torch.log(p).sum(-1), 1)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_vlb_of_the_oracle_bounds_the_exact_nll(variance):
    gm = GaussianMixture([0.3, 0.7], [[-0.5, 0.2], [0.6, -0.3]], [[0.3, 0.2], [0.25, 0.4]])
    g = torch.Generator().manual_seed(3)
    xq = quantize(gm.sample(1000, g)[0])
    path = uf.paths.DDPM.linear(T=100)
    vlb = ddpm_vlb(gm.model(path, "x0"), xq, variance=variance, generator=g)
    gap = vlb.total - exact_discrete_nll(gm, xq)
    se = float(gap.std()) / math.sqrt(gap.numel())
    assert float(gap.mean()) > 3 * se, (float(gap.mean()), se)       # a bound, clearly on the right side
    assert float(gap.mean()) / 2 < 1.5                                 # and not absurdly loose (nats/dim)
    bpd = vlb_bits_per_dim(gm.model(path, "x0"), xq[:8], generator=g)
    assert bpd.shape == (8,) and bool((bpd > 0).all())


def test_vlb_ideal_variance_discrete_decoder_is_nearly_tight():
    gm = GaussianMixture.gaussian([0.1, -0.2], [0.3, 0.4])
    path = uf.paths.DDPM.linear(T=50)
    g = torch.Generator().manual_seed(4)
    xq = quantize(gm.sample(2000, g)[0])
    model = uf.DiffusionModel(IdealVarianceNet(gm, path), path, "eps", learned_variance=True)
    nll = exact_discrete_nll(gm, xq)
    gap = ddpm_vlb(model, xq, generator=g).total - nll
    se = float(gap.std()) / math.sqrt(gap.numel())
    # the oracle is exact for the continuous data, so a small gap remains from the 8-bit rounding (~0.06 nats/dim)
    assert float(gap.mean()) > -3 * se and float(gap.mean()) / 2 < 0.1, (float(gap.mean()), se)
    fixed = ddpm_vlb(gm.model(path, "eps"), xq, generator=g).total - nll
    assert float(fixed.mean()) > float(gap.mean()) + 10 * se


def test_bad_input_gives_clear_errors():
    gm = GaussianMixture.gaussian([0.0, 0.0], [0.5, 0.5])
    model = gm.model(uf.paths.DDPM.linear(T=20), "eps")
    with pytest.raises(uf.UnifuseError, match="256-level grid"):
        ddpm_vlb(model, torch.full((2, 2), 0.1234, dtype=F64))
    with pytest.raises(uf.UnifuseError, match="outside"):
        ddpm_vlb(model, torch.full((2, 2), 2.0, dtype=F64))
    with pytest.raises(uf.UnifuseError, match="needs a chain"):
        ddpm_vlb(gm.model(uf.paths.get("vp-linear"), "eps"), torch.full((2, 2), 1 / 255, dtype=F64))
    with pytest.raises(uf.UnifuseError, match="decoder"):
        ddpm_vlb(model, torch.full((2, 2), 1 / 255, dtype=F64), decoder="logistic")
    # a continuous path works with an explicit chain
    v = ddpm_vlb(gm.model(uf.paths.get("vp-linear"), "eps"), torch.full((2, 2), 1 / 255, dtype=F64), steps=50)
    assert bool(torch.isfinite(v.total).all()) and v.terms.shape == (50, 2)

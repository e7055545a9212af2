"""Objectives against the exact Gaussian-mixture oracle: each loss is minimised by the exact model, weightings
match NOTATION 6.5 and stay finite at SNR = 0, time densities have the laws of NOTATION 7."""
import math

import pytest
import torch

import unifuse as uf
from unifuse import objectives as O
from unifuse.errors import UnifuseError
from unifuse.objectives.consistency import _same_random_state
from unifuse.parameterization import coefficients
from unifuse.testing import GaussianMixture

F64 = torch.float64


def mixture():
    return GaussianMixture([0.3, 0.7], [[0.6, -0.4], [-0.5, 0.5]], [[0.3, 0.2], [0.15, 0.4]])


class Shifted(torch.nn.Module):
    """The oracle's raw output plus delta (and, for learned-variance models, a constant variance channel)."""

    def __init__(self, net, delta, var=None):
        super().__init__()
        self.net, self.delta, self.var = net, delta, var

    def forward(self, x, t, **cond):
        out = self.net(x, t, **cond) + self.delta
        return out if self.var is None else torch.cat([out, torch.full_like(out, self.var)], 1)


def expected_loss(objective, make_model, delta, x, seed=1):
    """Monte Carlo loss with common random numbers (the same times and noise for every delta)."""
    return float(objective(make_model(delta), x, generator=torch.Generator().manual_seed(seed)).mean())


CASES = [
    ("ddpm-linear", "eps", O.DDPMLoss()),
    ("ddpm-linear", "eps", O.DDPMLoss(target="x0")),
    ("ddpm-cosine", "v", O.DDPMLoss(target="v", weighting="min_snr")),
    ("vp-linear", "eps", O.DSMLoss()),
    ("vp-linear", "eps", O.DSMLoss(weighting="likelihood", time="logsnr_uniform")),
    ("vp-cosine", "x0", O.DSMLoss(target="x0", weighting="sigmoid")),
    ("ve", "eps", O.DSMLoss(t_lo=0.0)),
    ("edm", "edm", O.EDMLoss()),
    ("edm", "edm", O.DenoisingLoss(target="x0", weighting="edm", time="log_normal", mean=-1.2, std=1.2)),
    ("rf", "velocity", O.FlowMatchingLoss()),
    ("rf", "velocity", O.FlowMatchingLoss(time="uniform", weighting="snr", target="eps", t_hi=0.999)),
    ("trigflow", "trigflow", O.TrigFlowLoss()),
]


@pytest.mark.parametrize("path_name,prediction,objective", CASES, ids=[f"{c[0]}-{c[2]!r}"[:60] for c in CASES])
def test_oracle_minimises_regression_objectives(path_name, prediction, objective):
    gm, path = mixture(), uf.paths.get(path_name)
    oracle = gm.model(path, prediction)
    x, _ = gm.sample(16384, torch.Generator().manual_seed(0))

    def make(delta):
        return uf.DiffusionModel(Shifted(oracle.net, delta), path, prediction)

    d = 0.1
    lo, mid, hi = (expected_loss(objective, make, s * d, x) for s in (-1, 0, 1))
    assert lo > mid and hi > mid
    # The loss is quadratic in delta; its minimiser must sit at the oracle (delta = 0).
    curvature, slope = (hi + lo - 2 * mid) / (2 * d * d), (hi - lo) / (2 * d)
    assert abs(slope / (2 * curvature)) < 0.2 * d


@pytest.mark.parametrize("timesteps", ["uniform", "importance"])
def test_oracle_minimises_hybrid_loss(timesteps):
    import copy

    gm, path = mixture(), uf.paths.get("ddpm-cosine")
    oracle = gm.model(path, "eps")
    x, _ = gm.sample(4096, torch.Generator().manual_seed(0))
    objective = O.HybridLoss(timesteps=timesteps, decoder="gaussian")
    if timesteps == "importance":  # a full loss history, so the steps are drawn non-uniformly
        objective._sampler(path).update(torch.arange(1000.).repeat(10), torch.linspace(0.1, 3, 1000).repeat(10))
        assert float(objective.sampler.probabilities().max() / objective.sampler.probabilities().min()) > 5

    def make(delta, var=0.0):
        return uf.DiffusionModel(Shifted(oracle.net, delta, var), path, "eps", learned_variance=True)

    d = 0.1  # a copy per evaluation, so every delta sees the same sampler state (common random numbers)
    lo, mid, hi = (expected_loss(copy.deepcopy(objective), make, s * d, x) for s in (-1, 0, 1))
    assert lo > mid and hi > mid
    assert abs((hi - lo) / (2 * d) / ((hi + lo - 2 * mid) / (d * d))) < 0.2 * d


def test_hybrid_vlb_term_teaches_only_the_variance():
    """Stop-gradient on the mean: the VLB term's gradient reaches the variance channel, not the mean."""
    from unifuse.vlb import reverse_log_variance, vlb_term

    gm, path = mixture(), uf.paths.get("ddpm-cosine")
    x, _ = gm.sample(256, torch.Generator().manual_seed(0))
    raw = torch.zeros(256, 4, dtype=F64, requires_grad=True)
    model = uf.DiffusionModel(lambda x_in, t: raw, path, "eps", learned_variance=True)
    g = torch.Generator().manual_seed(2)
    t = O.rand_index(256, path, generator=g)
    x_t = path.interpolate(x, torch.randn(x.shape, generator=g, dtype=F64), t)
    ev = model.evaluate(x_t, t)
    log_var = reverse_log_variance(path, t - 1, t, ev.var_frac)
    vb = vlb_term(path, x, x_t, t - 1, t, ev.x0.detach(), log_var, decoder="gaussian")
    vb.sum().backward()
    assert raw.grad[:, :2].abs().max() == 0 and raw.grad[:, 2:].abs().max() > 0


def exact_consistency_model(gm, path, sigma_min):
    """f*(x_t, t): the exact PF-ODE map of a single Gaussian to sigma_edm = sigma_min (GAUSSIAN_ORACLE 4)."""

    def net(x, t):
        a, s = path.alpha(t), path.sigma(t)
        return gm.pf_ode_map(x, a, s, torch.ones_like(a), torch.full_like(s, sigma_min))

    return uf.DiffusionModel(net, path, "x0")


@pytest.mark.parametrize("schedule,step", [("ict", 10_000), ("ect", 40)])
def test_exact_consistency_function_is_the_ct_fixed_point(schedule, step):
    """With the stop-gradient target at the exact consistency function, perturbing the online model raises
    the expected loss, and the loss's minimiser along the perturbation is the exact function."""
    gm = GaussianMixture.gaussian([0.5, -0.3], [0.4, 0.6])
    path = uf.paths.get("edm")
    exact = exact_consistency_model(gm, path, 0.002)
    objective = O.ConsistencyTrainingLoss(schedule=schedule, total_steps=1000, stage_every=5, huber_c=0.0)
    x, _ = gm.sample(4096, torch.Generator().manual_seed(0))

    def loss(delta):
        online = uf.DiffusionModel(Shifted(exact.net, delta), path, "x0")
        g = torch.Generator().manual_seed(1)
        return float(objective(online, x, generator=g, step=step, target_model=exact).mean())

    d = 0.05
    lo, mid, hi = loss(-d), loss(0.0), loss(d)
    assert lo > mid and hi > mid


def test_ct_schedules_match_the_papers():
    assert [O.ict_steps(k, 400_000) for k in (0, 200_000, 400_000)] == [11, 161, 1281]
    assert O.ict_steps(49_999, 400_000) == 11 and O.ict_steps(50_000, 400_000) == 21
    t = torch.tensor([1.9, 2.0, 5.0, 1e4], dtype=F64)
    r0 = O.ect_r(t, 0)
    assert r0[0] == 0 and abs(float(r0[1] / t[1]) - 0.0238) < 2e-3 and abs(float(r0[2] / t[2]) - 0.47) < 0.01
    assert abs(float(r0[3] / t[3]) - 0.5) < 1e-6
    for stage in range(1, 6):
        assert float((O.ect_r(t, stage) / t).max()) <= 1 - 2.0 ** -(stage + 1) + 1e-12
    sig = O.karras_sigmas(18).flip(0)
    assert abs(float(sig[1]) - 57.586) < 1e-3 and abs(float(sig[-1]) - 0.002) < 1e-12


def test_pseudo_huber():
    d = torch.tensor([[3.0, 4.0], [1e-4, 0.0]], dtype=F64)
    assert torch.allclose(O.pseudo_huber(d, 0.0), torch.tensor([5.0, 1e-4], dtype=F64))
    c = 0.1
    assert abs(float(O.pseudo_huber(d, c)[1]) - 1e-8 / (2 * c)) < 1e-12  # quadratic near 0


def test_same_random_state_reproduces_dropout_masks():
    drop, x = torch.nn.Dropout(0.5), torch.ones(1000)
    with _same_random_state(x.device):
        a = drop(x)
    b = drop(x)
    assert torch.equal(a, b)


# --- weightings --------------------------------------------------------------------------------

def test_equivalent_x0_weights_match_notation_6_5():
    sd = 0.5
    for name, t in [("vp-linear", 0.3), ("rf", 0.4), ("edm", 1.7), ("trigflow", 0.8)]:
        path = uf.paths.get(name) if name != "trigflow" else uf.paths.TrigFlow(sd)
        tt = torch.tensor([t], dtype=F64)
        c = coefficients(path, tt, torch.zeros(1, 1, dtype=F64))
        a, s = float(c.alpha), float(c.sigma)
        snr = a * a / (s * s)
        se = s / a
        expected = {"eps": snr, "x0": 1.0, "v": ((a * a + s * s) / s) ** 2,
                    "edm": (se**2 + sd**2) / (se * sd) ** 2, "trigflow": (se**2 + sd**2) / (se * sd) ** 2}
        if name == "rf":
            expected["velocity"] = 1 / t**2
        if name == "trigflow":
            expected["trigflow"] = 1 / (sd * math.sin(t)) ** 2
        for kind, k in expected.items():
            assert abs(float(O.equivalent_x0_weight(kind, c, sd)) / k - 1) < 1e-9, (name, kind)


def test_weighting_formulas():
    lam = torch.linspace(-8, 8, 33, dtype=F64)
    snr = lam.exp()
    assert torch.allclose(O.eps_weight("min_snr", lam, gamma=5.0), torch.clamp(5.0 / snr, max=1.0))
    assert torch.allclose(O.x0_weight("min_snr", lam, gamma=5.0), torch.clamp(snr, max=5.0))
    assert torch.allclose(O.x0_weight("sigmoid", lam, bias=1.0), snr * torch.sigmoid(1.0 - lam))
    assert torch.allclose(O.x0_weight("edm", lam, sigma_data=0.5), snr + 4.0)
    for name in ("snr", "min_snr", "edm", "sigmoid"):  # w_eps = w_x0 / SNR
        assert torch.allclose(O.eps_weight(name, lam), O.x0_weight(name, lam) / snr)


@pytest.mark.parametrize("path_name", ["rf", "trigflow", "vp-cosine"])
def test_weightings_are_finite_at_zero_snr(path_name):
    path = uf.paths.get(path_name)
    t = torch.tensor([float(path.t_max), 0.5 * float(path.t_max)], dtype=F64)
    assert float(path.alpha(t[:1])) == 0.0  # a zero-SNR end
    c = coefficients(path, t, torch.zeros(2, 1, dtype=F64))
    for name in O.WEIGHTINGS:
        for kind in ("eps", "x0", "v", "velocity", "edm", "trigflow"):
            if name == "edm" and kind == "eps":
                continue  # refused by the objective (an eps model has no finite x0 at SNR = 0)
            w = O.loss_weight(name, kind, path, t, c)
            assert bool(torch.isfinite(w).all()) and bool((w >= 0).all()), (name, kind, w)
    assert float(O.loss_weight("min_snr", "eps", path, t, c)[0]) == 1.0  # min(1, gamma / 0)
    with pytest.raises(UnifuseError, match="SNR = 0"):
        model = mixture().model(path, "v")
        O.DenoisingLoss(target="eps", weighting="edm").weight(model, t, c)


# --- time densities ------------------------------------------------------------------------------

def test_time_densities_have_their_log_snr_laws():
    """EDM's log-normal(-1.2, 1.2) is lambda ~ N(2.4, 2.4^2) on every path; logit-normal(m, s) is
    lambda ~ N(-2m, 4s^2) (NOTATION 7)."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for path in (uf.paths.get("edm", sigma_max=1e4, sigma_min=1e-4), uf.paths.TrigFlow(0.5), uf.paths.get("rf")):
        lam = path.log_snr(O.rand_log_normal(n, path, -1.2, 1.2, generator=g))
        assert abs(float(lam.mean()) - 2.4) < 0.03 and abs(float(lam.std()) - 2.4) < 0.03
        lam = path.log_snr(O.rand_logit_normal(n, path, 0.3, 1.0, generator=g))
        assert abs(float(lam.mean()) + 0.6) < 0.03 and abs(float(lam.std()) - 2.0) < 0.03
    rf = uf.paths.get("rf")
    z = torch.logit(O.rand_logit_normal(n, rf, 0.0, 1.0, generator=g))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    ddpm = uf.paths.get("ddpm-linear")
    idx = O.rand_index(n, ddpm, generator=g)
    assert float(idx.min()) == 0 and float(idx.max()) == ddpm.N - 1 and bool((idx == idx.round()).all())
    lam = uf.paths.get("vp-linear").log_snr(O.rand_logsnr_uniform(n, uf.paths.get("vp-linear"), 1e-3, 1.0, generator=g))
    hist = torch.histc(lam, bins=10, min=float(lam.min()), max=float(lam.max()))
    assert float(hist.max() / hist.min()) < 1.05
    with pytest.raises(UnifuseError):
        O.rand_index(4, rf)


def test_likelihood_weighting_is_the_same_with_importance_sampling():
    """Uniform t with weight -lambda'/2 / p(t) and uniform log-SNR (importance sampling) estimate the same
    continuous-time ELBO term."""
    gm, path = mixture(), uf.paths.get("vp-linear")
    model = gm.model(path, "eps")
    x, _ = gm.sample(60_000, torch.Generator().manual_seed(0))
    a = O.DSMLoss(weighting="likelihood", t_lo=1e-2)(model, x, generator=torch.Generator().manual_seed(1))
    importance = O.DSMLoss(weighting="likelihood", t_lo=1e-2, time="logsnr_uniform")
    b = importance(model, x, generator=torch.Generator().manual_seed(2))
    se = math.sqrt(float(a.var()) / a.numel() + float(b.var()) / b.numel())
    assert abs(float(a.mean()) - float(b.mean())) < 4 * se


def test_importance_sampler():
    s = O.ImportanceSampler(4, history=2, uniform_prob=0.0)
    assert torch.allclose(s.probabilities(), torch.full((4,), 0.25, dtype=F64))
    s.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3.]), torch.tensor([1, 1, 2, 2, 3, 3, 4, 4.]))
    p = s.probabilities()
    assert torch.allclose(p, torch.tensor([1, 2, 3, 4.], dtype=F64) / 10)
    _, w = s.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert abs(float(w.mean()) - 1) < 0.01  # E_p[1 / (N p)] = 1: the weighted loss is unbiased
    s.update(torch.tensor([0.]), torch.tensor([9.]))  # history of step 0 becomes [1, 9]
    assert torch.allclose(s.losses[0], torch.tensor([1, 9.], dtype=F64))
    other = O.ImportanceSampler(4, history=2)
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.losses, s.losses) and torch.equal(other.counts, s.counts)


def test_ot_coupling_pairs_better_and_keeps_the_noise():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(64, 3, generator=g) + 2, torch.randn(64, 3, generator=g)
    paired = O.couple("ot", x, noise)
    assert float(((x - paired) ** 2).sum()) < float(((x - noise) ** 2).sum())
    assert torch.equal(paired.sort(0).values, noise.sort(0).values)
    assert O.couple("independent", x, noise) is noise


def test_bad_objective_options_raise_one_clear_error():
    with pytest.raises(UnifuseError, match="weighting"):
        O.DenoisingLoss(weighting="nope")
    with pytest.raises(UnifuseError, match="target"):
        O.DenoisingLoss(target="flow")
    with pytest.raises(UnifuseError, match="likelihood"):
        O.EDMLoss(weighting="likelihood")
    with pytest.raises(UnifuseError, match="bad option"):
        O.get("edm", P_mean=1.0)
    with pytest.raises(UnifuseError, match="objective"):
        O.get("diffusion")

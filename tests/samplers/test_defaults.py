"""Every sampler's defaults against the exact Gaussian-mixture oracle (issue 12): at every NFE a call either
lands near the data or is refused in one line naming an NFE that works; sampling builds no graph unless
asked; sample i depends only on (seed, i) however the samples are batched."""
import math

import pytest
import torch

import unifuse as uf
from unifuse.samplers.checks import nearest_mean_ratio
from unifuse.testing import GaussianMixture

F64 = torch.float64
D, K = 8, 4
MEANS = torch.randint(0, 2, (K, D), generator=torch.Generator().manual_seed(1)).to(F64) - 0.5  # pixel-like
GM = GaussianMixture(torch.full((K,), 1.0 / K, dtype=F64), MEANS, 0.05)
PATHS = {"ddpm-linear": "eps", "vp-linear": "eps", "ve": "eps", "edm": "edm", "rf": "velocity", "trigflow": "v"}
NOISE = torch.randn(48, D, dtype=F64, generator=torch.Generator().manual_seed(0))
SAMPLERS = [s for s in uf.samplers.available() if s != "adaptive"]  # adaptive: nfe is a bound, exceeding it raises
# the posterior mean at the noise end (one evaluation) scores 0.47 here, converged samplers 0.05, noise 1
SENSIBLE = 0.6


def outcome(name, path, nfe):
    """The nearest-mean ratio of uf.sample's defaults, or None where the call is refused in one line."""
    model = GM.model(uf.paths.get(path), PATHS[path])
    try:
        x = uf.sample(model, NOISE, name, nfe, generator=0)
    except uf.UnifuseError as err:
        msg = str(err)
        assert "\n" not in msg and f"nfe={nfe}" in msg and ("nfe >= " in msg or "another sampler" in msg), msg
        return None
    return nearest_mean_ratio(x, MEANS, NOISE)


def check(name, nfes):
    bad = {}
    for path in PATHS:
        for nfe in nfes:
            r = outcome(name, path, nfe)
            if r is not None and not r < SENSIBLE:
                bad[(path, nfe)] = round(r, 3)
    assert not bad, bad


@pytest.mark.parametrize("name", SAMPLERS)
def test_defaults_reach_the_data_or_refuse_fast(name):
    """Each sampler at its lowest NFEs and at 10-20 on every path family."""
    check(name, (1, 2, 3, 4, 10, 15, 20))


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLERS)
def test_defaults_reach_the_data_or_refuse_every_nfe(name):
    check(name, list(range(1, 13)) + [14, 16, 18, 20, 25, 30, 35, 40, 50])


@pytest.mark.parametrize("name,path,nfe", [("euler_maruyama", "edm", 10), ("pc", "edm", 20), ("heun", "edm", 3),
                                           ("dpm_solver_2", "edm", 3), ("euler_maruyama", "vp-linear", 30)])
def test_the_reported_noise_cases_now_reach_the_data(name, path, nfe):
    """Issue 12: these returned pure noise on their default grids."""
    r = outcome(name, path, nfe)
    assert r is not None and r < 0.4, r  # they scored 3 to 150


def test_a_refusal_names_an_nfe_that_works():
    model = GM.model(uf.paths.get("ve"), "eps")
    with pytest.raises(uf.UnifuseError, match=r"'euler_maruyama' at nfe=5 .*use nfe >= (\d+)") as err:
        uf.sample(model, NOISE, "euler_maruyama", 5)
    works = int(str(err.value).split("nfe >= ")[1].split(",")[0])
    assert outcome("euler_maruyama", "ve", works) < SENSIBLE


# --- no graph unless asked --------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D + 1, D)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], 1))


def test_sampling_builds_no_graph_by_default():
    model = uf.DiffusionModel(Net(), uf.paths.get("rf"), "velocity")
    seen = []
    model.net.register_forward_hook(lambda m, i, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    x = uf.sample(model, torch.randn(4, D), "heun", 7)
    assert x.grad_fn is None and not x.requires_grad
    assert seen and not any(g or r for g, r in seen)


def test_grad_true_reaches_the_parameters():
    model = uf.DiffusionModel(Net(), uf.paths.get("rf"), "velocity")
    with torch.no_grad():  # grad=True turns the graph on even inside no_grad
        x = uf.sample(model, torch.randn(4, D), "dpmpp_2m_sde", 6, generator=0, grad=True)
    assert x.grad_fn is not None
    x.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())


# --- seeds ---------------------------------------------------------------------------------------------------
STOCHASTIC = [s for s in uf.samplers.available() if uf.samplers.get(s).stochastic]


def test_an_int_seed_is_the_generators_helper():
    a = uf.samplers.randn((5, D), generator=7, dtype=F64)
    b = uf.samplers.randn((5, D), generator=uf.samplers.generators(7, 0, 5), dtype=F64)
    tail = uf.samplers.randn((2, D), generator=uf.samplers.generators(7, 3, 2), dtype=F64)
    assert torch.equal(a, b) and torch.equal(a[3:], tail)


@pytest.mark.parametrize("name", STOCHASTIC + ["heun"])
def test_sample_i_depends_only_on_seed_and_i(name):
    """Samples 4..15 of a 16-sample call equal a call on samples 4..15 alone (bit-identical in float64):
    the initial noise and the sampler's noise both come from each sample's own stream."""
    model = GM.model(uf.paths.get("edm"), "edm")
    opts = {"S_churn": 10.0} if name == "edm_stochastic" else {}

    def run(start, count):
        gens = uf.samplers.generators(5, start, count)
        noise = uf.samplers.randn((count, D), generator=gens, dtype=F64)
        return uf.sample(model, noise, name, 12, generator=gens, **opts)

    assert torch.equal(run(0, 16)[4:], run(4, 12))


# --- the default grids (issue 16) -----------------------------------------------------------------------------------
def exact_solution(path):
    """The PF-ODE solution from uf.sample's start (NOISE read at the path's noise end), solved in EDM units."""
    p = uf.paths.get(path)
    top = torch.tensor(p.t_max, dtype=F64)
    se = float(p.sigma_edm(top)) if float(p.alpha(top)) > 0 else 1e4  # rf: zero SNR at t_max, start far up
    start = NOISE * (se if float(p.alpha(top)) == 0 else float(p.sigma(top) / p.alpha(top)))
    edm = GM.model(uf.paths.EDM(sigma_max=se), "x0")
    return uf.samplers.sample_adaptive(edm, start, torch.tensor([se, 0.0], dtype=F64), rtol=1e-8, atol=1e-8,
                                       sigma_stop=1e-4)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "heun", "euler"])
def test_default_grid_beats_the_whole_range_at_few_steps(name):
    """At NFE 5 and 10 the default grid (first jump, sigma range of `default_grid`; one table for every path) lands
    closer to the exact PF-ODE solution than the sampler's spacing over the path's whole range: by a factor < 0.8
    in the geometric mean over three path families and both NFEs, and never more than 2x worse in one case
    (this 8-D problem, sharper than the benchmark's, is not one the table was chosen on). The one case above 1x is
    the analytic first step's known cost: its means are offset from 0 (mu ~ 0.25 per coordinate), and reading the
    noise at sigma_max moves the samples by ~ mu s / sigma_max, where the evaluated first step (the whole range)
    is exact at zero SNR; on this easy problem that is 1.2-1.9x a tiny error at NFE 5."""
    ratios = {}
    for path in ("ddpm-linear", "edm", "rf"):
        model, exact = GM.model(uf.paths.get(path), PATHS[path]), exact_solution(path)
        err = lambda x: float((x - exact).square().mean().sqrt())
        for nfe in (5, 10):
            whole = uf.sample(model, NOISE, name, nfe, spacing=uf.samplers.get(name).spacing)
            ratios[(path, nfe)] = err(uf.sample(model, NOISE, name, nfe)) / err(whole)
    geo = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
    assert geo < 0.8 and max(ratios.values()) < 2.0, ratios

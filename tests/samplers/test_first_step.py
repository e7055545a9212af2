"""The analytic first step (issue 16; Zhou et al. 2024): the jump from the noise end down to sigma_max taken as
the DDIM step with x0-hat = 0, at no network evaluation, and GITS's dynamic programme with that free jump.

On one Gaussian N(0, s^2) the PF-ODE maps the noise read at sigma_max, x = sigma_max z (EDM units), to the data
as x0 = s z sigma_max / sqrt(s^2 + sigma_max^2) (GAUSSIAN_ORACLE), and the evaluated start, x = sigma_T z, to
s z sigma_T / sqrt(s^2 + sigma_T^2): the analytic step replaces the noisy marginal at sigma_max, N(0, s^2 +
sigma_max^2), by N(0, sigma_max^2), an error of relative size ~ s^2 / (2 sigma_max^2)."""
import itertools
import math

import pytest
import torch

import unifuse as uf
from unifuse.samplers.grids import GitsTable, gits_path
from unifuse.testing import CountingNet, GaussianMixture

F64 = torch.float64
D, S = 4, 0.5
GAUSS = GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, D, dtype=F64), S)
PATHS = {"ddpm-linear": "eps", "edm": "edm", "rf": "velocity", "trigflow": "v"}
Z = torch.randn(64, D, generator=torch.Generator().manual_seed(0), dtype=F64)


def through(top, sig_end):
    """The exact result for noise read at sigma = top (EDM units; inf: the zero-SNR end): the PF-ODE down to the
    grid's last noisy level sig_end, then the exact final denoise there, s^2 / (s^2 + sig_end^2) x."""
    f = 1.0 if math.isinf(top) else top / math.sqrt(S**2 + top**2)
    return S**2 * Z * f / math.sqrt(S**2 + sig_end**2)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("hi", [2.0, 10.0])
def test_the_analytic_start_is_the_exact_flow_of_noise_read_at_sigma_max(path, hi):
    p = uf.paths.get(path)
    counting = CountingNet(GAUSS.model(p, PATHS[path]).net)
    model = uf.DiffusionModel(counting, p, PATHS[path])
    sig = lambda t: float(p.sigma_edm(torch.tensor(t, dtype=F64)))
    x, info = uf.sample(model, Z, "unipc", 100, spacing="logsnr", sigma_max=hi, sigma_min=1e-3,
                        first_step="analytic", return_info=True)
    assert counting.calls == 100 and info["nfe"] == 100  # the jump from the noise end cost nothing
    assert sig(info["grid"][0]) == pytest.approx(hi, rel=1e-9)
    expected = through(hi, sig(info["grid"][-2]))
    assert float((x - expected).norm() / expected.norm()) < 2e-5
    # the evaluated start over the whole range reads the noise at the noise end: the exact map of the same noise
    y, info = uf.sample(model, Z, "unipc", 100, spacing="logsnr", sigma_min=1e-3, first_step="evaluated",
                        return_info=True)
    assert info["grid"][0] == pytest.approx(p.t_max, rel=1e-12)
    exact = through(sig(p.t_max), sig(info["grid"][-2]))
    assert float((y - exact).norm() / exact.norm()) < 1e-4
    # the analytic step's own error: the ratio of the two maps, 1 - hi / sqrt(s^2 + hi^2) ~ s^2 / (2 hi^2)
    top = sig(p.t_max)
    ratio = (hi / math.sqrt(S**2 + hi**2)) / (1.0 if math.isinf(top) else top / math.sqrt(S**2 + top**2))
    assert float((x - exact).norm() / exact.norm()) == pytest.approx(1 - ratio, rel=0.05)


def test_default_rows_marked_analytic_start_at_sigma_max_and_count_exactly():
    p = uf.paths.get("ddpm-linear")
    for sampler in uf.samplers.grids.DEFAULT_TABLE:
        for nfe in range(3, uf.samplers.grids.FEW_STEP_MAX + 1):
            d = uf.samplers.default_grid(sampler, nfe)
            counting = CountingNet(GAUSS.model(p, "eps").net)
            try:
                _, info = uf.sample(uf.DiffusionModel(counting, p, "eps"), Z[:4], sampler, nfe, return_info=True)
            except uf.UnifuseError:  # a budget this sampler refuses (named in one line, tested elsewhere)
                continue
            assert counting.calls == nfe, (sampler, nfe)
            start = float(p.sigma_edm(torch.tensor(info["grid"][0], dtype=F64)))
            if d["first_step"] == "analytic":
                assert start == pytest.approx(d["sigma_max"], rel=1e-9), (sampler, nfe)
            else:
                assert info["grid"][0] == p.t_max, (sampler, nfe)


def test_first_step_is_checked():
    model = GAUSS.model(uf.paths.get("edm"), "edm")
    with pytest.raises(uf.UnifuseError, match="unknown first_step 'free'"):
        uf.sample(model, Z, "euler", 5, spacing="logsnr", first_step="free")
    with pytest.raises(uf.UnifuseError, match="drop first_step"):
        uf.sample(model, Z, "euler", spacing=torch.tensor([10.0, 1.0, 0.1]), first_step="analytic")


def brute_force(table, steps, analytic_first):
    """The cheapest path of the DP by enumeration: candidate 0 -> increasing candidates -> the data."""
    n, best = len(table.cand), (math.inf, None)
    total = steps + int(analytic_first)
    for mid in itertools.combinations(range(1, n), total - 1):
        nodes = (0, *mid, n)
        c = sum((table.free[j] if analytic_first and k == 0 else table.cost[i][j])
                for k, (i, j) in enumerate(itertools.pairwise(nodes)))
        if c < best[0]:
            best = (c, nodes)
    return best


@pytest.mark.parametrize("analytic_first", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_gits_dynamic_programme_equals_enumeration(steps, analytic_first):
    g = torch.Generator().manual_seed(steps + 10 * analytic_first)
    n = 7
    cost = [[float(torch.rand(1, generator=g)) if j > i else math.inf for j in range(n)] + [float(torch.rand(1, generator=g))]
            for i in range(n)]
    free = [math.inf] + [float(torch.rand(1, generator=g)) for _ in range(n - 1)] + [math.inf]
    table = GitsTable(torch.linspace(10.0, 1.0, n, dtype=F64), cost, free, torch.zeros(1), 0.0)
    grid = gits_path(table, steps, analytic_first)
    _, nodes = brute_force(table, steps, analytic_first)
    keep = nodes[1:-1] if analytic_first else nodes[:-1]
    assert grid.tolist() == [float(table.cand[i]) for i in keep] + [0.0]


def test_optimize_grid_fits_the_analytic_start_too():
    """On a two-Gaussian mixture at NFE 3, the fitted grid with first_step="analytic" starts below the noise
    end, and the fit only lowers the error of its starting grids on the fitting batch."""
    means = torch.tensor([[0.5, -0.5, 0.5, 0.5], [-0.5, 0.5, -0.5, 0.5]], dtype=F64)
    model = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), means, 0.1).model(uf.paths.get("edm"), "edm")
    fast = dict(reference_nfe=64, candidates=16, max_evals=12)
    grid, info = uf.samplers.optimize_grid(model, Z[:32], 3, "dpmpp_2m", first_step="analytic", return_info=True, **fast)
    assert float(grid[0]) < model.path.t_max and set(info["errors"]) == {"default, analytic", "gits, analytic"}
    assert info["error"] <= min(info["errors"].values())
    _, both = uf.samplers.optimize_grid(model, Z[:32], 3, "dpmpp_2m", return_info=True, **fast)
    assert {"gits", "default", "gits, analytic", "default, analytic"} <= set(both["errors"])
    assert both["error"] <= min(both["errors"].values())

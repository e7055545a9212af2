"""optimize_grid and the default grids (issue 16): a fitted grid is a valid grid of every path that costs
exactly the asked NFE (counted at the network), and on one exact Gaussian, where the PF-ODE map is closed
form, its error is no worse than that of the best named spacing."""
import pytest
import torch

import unifuse as uf
from unifuse.paths import SPACINGS
from unifuse.testing import CountingNet, GaussianMixture

F64 = torch.float64
D = 4
PATHS = {"ddpm-linear": "eps", "vp-linear": "eps", "ve": "eps", "edm": "edm", "rf": "velocity", "trigflow": "v"}
MEANS = torch.tensor([[0.5, -0.5, 0.5, 0.5], [-0.5, 0.5, -0.5, 0.5]], dtype=F64)
MIX = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), MEANS, 0.1)
FAST = dict(reference_nfe=64, candidates=16, max_evals=12)


def noise(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_fitted_grid_is_valid_on_every_path_and_costs_exactly_nfe(path):
    p = uf.paths.get(path)
    model = MIX.model(p, PATHS[path])
    nfe = 5
    grid = uf.samplers.optimize_grid(model, noise(16, 0), nfe, "dpmpp_2m", **FAST)
    assert grid.dtype == F64 and grid.ndim == 1 and grid.numel() == nfe + 1  # nfe steps, the last to the data
    assert bool((grid[1:] < grid[:-1]).all())
    assert float(grid[0]) <= p.t_max and float(grid[-1]) == p.t_min and float(grid[-2]) >= p.t_eps
    counting = CountingNet(model.net)
    counted = uf.DiffusionModel(counting, p, PATHS[path])
    x, info = uf.sample(counted, noise(8, 1), "dpmpp_2m", spacing=grid, return_info=True)
    assert info["nfe"] == nfe and counting.calls == nfe and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler,nfe", [("unipc", 4), ("heun", 5), ("euler", 3), ("dpmpp_3m", 6)])
def test_nfe_is_counted_exactly_on_the_returned_grid(sampler, nfe):
    p = uf.paths.get("edm")
    model = MIX.model(p, "edm")
    grid = uf.samplers.optimize_grid(model, noise(16, 0), nfe, sampler, **FAST)
    counting = CountingNet(model.net)
    _, info = uf.sample(uf.DiffusionModel(counting, p, "edm"), noise(8, 1), sampler, spacing=grid, return_info=True)
    assert info["nfe"] == nfe and counting.calls == nfe
    uf.sample(model, noise(8, 1), sampler, nfe, spacing=grid)  # the matching nfe is accepted


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_on_one_gaussian_no_worse_than_the_best_named_spacing(sampler):
    """One Gaussian N(m, s^2 I): the PF-ODE from (alpha_0, sigma_0) to the data is the affine map
    x -> m + (s / sqrt(alpha_0^2 s^2 + sigma_0^2)) (x - alpha_0 m) (GAUSSIAN_ORACLE), so the error of each grid
    is measured against the exact solution, on noise other than the fitting batch."""
    gm = GaussianMixture(torch.ones(1, dtype=F64), torch.full((1, D), 0.3, dtype=F64), 0.5)
    p = uf.paths.get("vp-linear")
    model = gm.model(p, "eps")
    nfe, test = 5, noise(256, 2)

    a0, s0 = (float(f(torch.tensor(p.t_max, dtype=F64))) for f in (p.alpha, p.sigma))
    x_T = test * s0  # the noise as a draw from the prior at the noise end (a grid starting lower reads it there)
    exact = 0.3 + 0.5 / (a0**2 * 0.25 + s0**2) ** 0.5 * (x_T - a0 * 0.3)

    def error(x, grid0):
        return float((x - exact).square().mean().sqrt())

    named = {}
    for sp in SPACINGS:
        try:
            x, info = uf.sample(model, test, sampler, nfe, spacing=sp, return_info=True)
        except uf.UnifuseError:  # a spacing this path or sampler refuses
            continue
        named[sp] = error(x, info["grid"][0])
    grid = uf.samplers.optimize_grid(model, noise(64, 0), nfe, sampler, max_evals=40)
    fitted = error(uf.sample(model, test, sampler, spacing=grid), float(grid[0]))
    assert fitted <= min(named.values()), (fitted, named)


def test_defaults_come_from_the_table():
    """Without a spacing, uf.sample goes from the noise end to the table's sigma_max (by one evaluated step, or by
    the free analytic one: the grid then starts there) and ends at its sigma_min."""
    p = uf.paths.get("ddpm-linear")
    model = MIX.model(p, "eps")
    for nfe in (3, 5, 8, 10):
        d = uf.samplers.default_grid("dpmpp_2m", nfe)
        _, info = uf.sample(model, noise(4, 0), "dpmpp_2m", nfe, return_info=True)
        sig = p.sigma_edm(torch.tensor(info["grid"][:-1], dtype=F64))
        assert len(info["grid"]) == nfe + 1
        if d["first_step"] == "analytic":
            assert float(sig[0]) == pytest.approx(d["sigma_max"], rel=1e-6)
        else:
            assert info["grid"][0] == p.t_max and float(sig[1]) == pytest.approx(d["sigma_max"], rel=1e-6)
        assert float(sig[-1]) == pytest.approx(d["sigma_min"], rel=1e-6)
    assert uf.samplers.default_grid("dpmpp_2m", 3)["first_step"] == "analytic"
    assert uf.samplers.default_grid("dpmpp_2m", 10)["first_step"] == "evaluated"
    for nfe in (13, 20, 200):  # above FEW_STEP_MAX: the path's own range
        assert uf.samplers.default_grid("dpmpp_2m", nfe) == {"spacing": "logsnr"}


def test_refuses_stochastic_samplers_and_unreachable_budgets():
    model = MIX.model(uf.paths.get("edm"), "edm")
    with pytest.raises(uf.UnifuseError, match="deterministic ODE samplers"):
        uf.samplers.optimize_grid(model, noise(4, 0), 5, "euler_maruyama")
    with pytest.raises(uf.UnifuseError, match=r"nfe=4 .*use nfe in"):
        uf.samplers.optimize_grid(model, noise(4, 0), 4, "heun")


def test_unifuse_grid_writes_a_grid_that_unifuse_sample_uses(toy_run, tmp_path, capsys):
    """`unifuse grid` writes JSON whose grid `unifuse sample --grid` runs with the file's sampler and exact NFE."""
    import json

    from unifuse.cli import main

    out = str(tmp_path / "g.json")
    assert main(["grid", "--ckpt", toy_run, "--sampler", "dpmpp_2m", "--nfe", "4", "--out", out, "--n", "8",
                 "--reference-nfe", "48", "--max-evals", "4"]) == 0
    record = json.load(open(out))
    grid = torch.tensor(record["grid"], dtype=F64)
    assert record["sampler"] == "dpmpp_2m" and record["nfe"] == 4 and grid.numel() == 5
    assert bool((grid[1:] < grid[:-1]).all())
    assert main(["sample", "--ckpt", toy_run, "--grid", out, "--out", str(tmp_path / "s"), "--n", "8"]) == 0
    meta = json.load(open(tmp_path / "s" / "samples.json"))
    assert meta["nfe"] == 4 and meta["sampler"] == "dpmpp_2m" and meta["spacing"].startswith("grid:")
    assert main(["sample", "--ckpt", toy_run, "--grid", out, "--nfe", "5", "--out", str(tmp_path / "t")]) == 1
    assert "--nfe 5 disagrees with the grid file" in capsys.readouterr().err

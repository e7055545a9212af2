"""Thresholding of the denoised estimate (unifuse.guidance.thresholding): an identity when nothing is out of range, a
consistent (x0, eps) pair, the Imagen dynamic rule, and the cure for eps models that blow up near zero SNR."""
import pytest
import torch

import unifuse as uf
from unifuse.errors import UnifuseError
from unifuse.guidance.thresholding import threshold
from unifuse.parameterization.convert import coefficients
from unifuse.testing import GaussianMixture

F64 = torch.float64
PATHS = ["ddpm-cosine", "vp-linear", "ve", "edm", "rf", "trigflow"]


def _mixture(far: float = 0.5) -> GaussianMixture:
    means = torch.tensor([[far, -far, 0.2, 0.0], [-far, far, -0.2, 0.1]], dtype=F64)
    return GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), means, 0.1)


def _times(path, n):
    return torch.linspace(0.05, 0.95, n, dtype=F64) * (path.t_max - max(path.t_min, 0.0)) + max(path.t_min, 0.0)


@pytest.mark.parametrize("name", PATHS)
def test_identity_inside_the_range_and_a_consistent_pair_outside(name):
    path, gm = uf.paths.get(name), _mixture(3.0)
    model = gm.model(path, "eps" if name.startswith(("ddpm", "vp")) else "x0")
    x0 = gm.sample(64, torch.Generator().manual_seed(0))[0]
    t = _times(path, 64)
    c = coefficients(path, t, x0)
    x = c.alpha * x0 + c.sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    inner = model.evaluate(x, t)
    wide = threshold(model, limit=1e3).evaluate(x, t)  # nothing clipped: the same model
    torch.testing.assert_close(wide.x0, inner.x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(wide.eps, inner.eps, rtol=1e-9, atol=1e-9)
    for clipped in (threshold(model, 1.0).evaluate(x, t), threshold(model, 1.0, percentile=0.9).evaluate(x, t)):
        assert float(clipped.x0.abs().max()) <= 1.0 + 1e-12 and float(inner.x0.abs().max()) > 2.0
        torch.testing.assert_close(c.alpha * clipped.x0 + c.sigma * clipped.eps, x, rtol=1e-9, atol=1e-9)


def test_dynamic_threshold_is_the_imagen_rule():
    path, gm = uf.paths.get("vp-linear"), _mixture(0.5)
    model = gm.model(path, "eps")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=F64) * 3
    t = torch.full((8,), 0.9, dtype=F64)
    x0 = model.evaluate(x, t).x0
    got = threshold(model, 1.0, percentile=0.75).evaluate(x, t).x0
    s = torch.quantile(x0.abs(), 0.75, dim=1).clamp_min(1.0)[:, None]
    torch.testing.assert_close(got, torch.maximum(torch.minimum(x0, s), -s) / s)


def test_thresholding_cures_an_eps_model_that_blows_up_at_zero_snr():
    """A cosine-DDPM eps model with a small constant error: 1/alpha (2e4 at the last step) turns it into a
    denoised estimate far outside the data; with static clipping every sampler stays in [-1, 1], near the data."""
    path, gm = uf.paths.get("ddpm-cosine"), _mixture(0.5)
    exact = gm.model(path, "eps")

    class Biased(torch.nn.Module):
        def forward(self, x, t):
            return exact.net(x, t) + 0.05

    model = uf.DiffusionModel(Biased(), path, "eps")
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    for sampler in ("dpmpp_2m", "ddim", "euler"):
        raw = uf.sample(model, noise, sampler, nfe=10, return_trajectory=True)[1]
        clipped, traj = uf.sample(threshold(model, 1.0), noise, sampler, nfe=10, return_trajectory=True)
        assert float(raw.denoised[0].abs().max()) > 100.0, sampler
        assert max(float(d.abs().max()) for d in traj.denoised if d is not None) <= 1.0 + 1e-9, sampler
        assert float(clipped.abs().max()) <= 1.0 + 1e-9, sampler
        # and the clipped samples are close to the data: each near one of the two means
        d = torch.cdist(clipped[:, :2], gm.means[:, :2]).min(1).values
        assert float(d.median()) < 0.3, sampler


def test_bad_thresholds_are_refused():
    model = _mixture().model(uf.paths.get("edm"), "x0")
    with pytest.raises(UnifuseError, match="limit must be a positive number"):
        threshold(model, 0.0)
    with pytest.raises(UnifuseError, match="percentile must be in"):
        threshold(model, 1.0, percentile=1.5)
    with pytest.raises(UnifuseError, match="wraps a uf.DiffusionModel"):
        threshold(object(), 1.0)


def test_the_old_spelling_still_works():
    assert uf.thresholding.threshold is threshold is uf.guidance.threshold

"""Prediction-kind knowledge (parameterization/kinds.py, weights.py): where each kind is singular, the pair from a
raw output, the guarded conversion at the ends of a path, and what unit weight on a kind's MSE means in x0 units."""
import pytest
import torch

import unifuse as uf
from unifuse.errors import UnifuseError
from unifuse.parameterization.convert import (
    CONVERTIBLE,
    KINDS,
    PRECONDITIONED,
    Coefficients,
    coefficients,
    from_pair,
    to_pair,
    validate,
)
from unifuse.parameterization.kinds import (
    PREDICTIONS,
    defined_at_zero_snr,
    model_pair,
    noise_scaled,
    safe_div,
    safe_pair,
    valid_times,
)
from unifuse.parameterization.precond import x0_from_raw
from unifuse.parameterization.weights import equivalent_x0_weight, kind_weight

F64 = torch.float64


def ends(path_name: str, x: torch.Tensor):
    """Coefficients at the data end, inside, and at the noise end of a path that reaches both (rf: t = 0, 0.5, 1)."""
    path = uf.paths.get(path_name)
    return coefficients(path, torch.tensor([0.0, 0.5, 1.0], dtype=F64), x)


def test_safe_div_divides_where_positive_and_keeps_gradients_finite():
    num = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    den = torch.tensor([2.0, 0.0, 4.0], dtype=F64)
    out = safe_div(num, den, torch.full((3,), 7.0, dtype=F64))
    assert out.tolist() == [0.5, 7.0, 0.75]
    out.sum().backward()
    assert num.grad.tolist() == [0.5, 0.0, 0.25]  # no inf * 0 = NaN from the masked entry


def test_predictions_and_where_kinds_are_defined_at_pure_noise():
    assert PREDICTIONS == KINDS + PRECONDITIONED and set(CONVERTIBLE) < set(PREDICTIONS)
    x = torch.randn(3, 2, dtype=F64)
    noise_end = Coefficients(*(v[2:] for v in ends("rf", x)))  # alpha = 0, sigma = 1
    for kind in CONVERTIBLE:
        try:
            validate(kind, noise_end)
            ok = True
        except UnifuseError:
            ok = False
        assert ok == defined_at_zero_snr(kind), kind
    assert [k for k in KINDS if noise_scaled(k)] == ["eps", "score"]  # -eps / sigma is eps up to a time factor


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_model_pair_reads_every_kind(kind):
    x, out = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    c = coefficients(uf.paths.get("vp-linear"), torch.tensor([0.2, 0.5, 0.9], dtype=F64), x)
    x0, eps = model_pair(kind, out, x, c, 0.5, 0.01)
    if kind in PRECONDITIONED:
        torch.testing.assert_close(x0, x0_from_raw(kind, out, x, c, 0.5, 0.01), rtol=0, atol=0)
        torch.testing.assert_close(c.alpha * x0 + c.sigma * eps, x, rtol=1e-12, atol=1e-12)
    else:
        ref = to_pair(kind, out, x, c, 0.5)
        assert torch.equal(x0, ref[0]) and torch.equal(eps, ref[1])


def test_model_pair_of_a_preconditioned_kind_reports_zero_noise_at_the_data_end():
    x, out = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    x0, eps = model_pair("edm", out, x, ends("rf", x), 0.5, 0.0)
    assert bool(torch.isfinite(x0).all()) and torch.equal(eps[0], torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_valid_times_agree_with_the_per_time_check(kind):
    path = uf.paths.get("rf")
    ts = torch.tensor([1.0, 0.7, 0.3, 0.0], dtype=F64)  # both ends: alpha = 0 first, sigma = 0 last
    c = Coefficients(*path.coefficients(ts))
    got = valid_times(kind, c)
    if kind in PRECONDITIONED:
        assert got == [False] * 4
        return
    expected = []
    for k in range(4):
        try:
            validate(kind, Coefficients(*(v[k:k + 1] for v in c)))
            expected.append(True)
        except UnifuseError:
            expected.append(False)
    assert got == expected


@pytest.mark.parametrize("kind", CONVERTIBLE)
def test_safe_pair_is_to_pair_inside_and_the_fallback_where_it_divides_by_zero(kind):
    x = torch.randn(3, 2, dtype=F64)
    x0, eps = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    inside = coefficients(uf.paths.get("rf"), torch.tensor([0.2, 0.5, 0.8], dtype=F64), x)
    x_t = inside.alpha * x0 + inside.sigma * eps
    out = from_pair(kind, x0, eps, x_t, inside)
    fallback = (torch.full_like(x0, 5.0), torch.full_like(eps, 6.0))
    got = safe_pair(kind, out, x_t, inside, 0.5, fallback)
    torch.testing.assert_close(got[0], x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], eps, rtol=1e-9, atol=1e-9)
    # at the end where to_pair divides by zero (x0 -> eps at sigma = 0, eps -> x0 at alpha = 0) the fallback is used
    x0_s, eps_s = safe_pair(kind, torch.ones(3, 2, dtype=F64), x, ends("rf", x), 0.5, fallback)
    assert bool(torch.isfinite(x0_s).all() and torch.isfinite(eps_s).all())
    if kind == "x0":
        assert torch.equal(eps_s[0], fallback[1][0])
    if kind == "eps":
        assert torch.equal(x0_s[2], fallback[0][2])


@pytest.mark.parametrize("kind", CONVERTIBLE)
def test_kind_weight_realises_an_x0_weighting(kind):
    """Weight k_w on a kind's MSE times that MSE is w_x0 times the x0 MSE, at fixed x_t (NOTATION 6.5)."""
    path = uf.paths.get("vp-cosine")
    t = torch.tensor([0.1, 0.4, 0.8], dtype=F64)
    x_t = torch.randn(3, 2, dtype=F64)
    c = coefficients(path, t, x_t)
    w_x0 = torch.tensor([1.5, 0.7, 0.2], dtype=F64)
    snr = (c.alpha / c.sigma).reshape(-1) ** 2
    w = kind_weight(kind, c, 0.5, lambda: w_x0, lambda: w_x0 / snr)
    x0, x0_hat = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    pair = lambda v: (v, (x_t - c.alpha * v) / c.sigma)
    err_kind = (from_pair(kind, *pair(x0_hat), x_t, c) - from_pair(kind, *pair(x0), x_t, c)).pow(2).sum(1)
    err_x0 = (x0_hat - x0).pow(2).sum(1)
    torch.testing.assert_close(w * err_kind, w_x0 * err_x0, rtol=1e-9, atol=1e-12)
    k = equivalent_x0_weight(kind, c, 0.5).reshape(-1)
    torch.testing.assert_close(err_kind, k * err_x0, rtol=1e-9, atol=1e-12)

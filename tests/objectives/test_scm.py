"""sCM (card 18) against the exact Gaussian oracle in float64: the two tangent conventions and a central difference
agree (NVlabs/Sana#327), the exact consistency field has g = 0, the df/dt formula is the total derivative along the
PF-ODE, and the loss masks bad rows and trains both the model and its adaptive-weight head."""
import math

import pytest
import torch
from torch import nn

import unifuse as uf
from unifuse.errors import UnifuseError
from unifuse.model import DiffusionModel
from unifuse.nets import MLP
from unifuse.objectives.scm import SCTLoss, normalize_tangent, scm_tangent, scm_times, trigflow_sigma_d, trigflow_tangent
from unifuse.tangent import jvp
from unifuse.testing import GaussianMixture

F64 = torch.float64
SD = 0.5
PATH = uf.paths.get("trigflow", sigma_d=SD)
GAUSS = GaussianMixture([1.0], [[0.3, -0.2]], [[0.4, 0.7]])
MIXTURE = GaussianMixture([0.3, 0.7], [[0.5, -0.4], [-0.6, 0.2]], [[0.3, 0.2], [0.25, 0.5]])


def col(c, x):
    return c.reshape((-1,) + (1,) * (x.ndim - 1))


class ExactConsistencyNet(nn.Module):
    """F_cm*(x, t) = (cos t x - f*(x, t)) / (sigma_d sin t), f* the exact PF-ODE map to t = 0; input x_t / sigma_d."""

    def __init__(self, gm: GaussianMixture):
        super().__init__()
        self.gm = gm

    def forward(self, x_in, t):
        x = x_in * SD
        c, s = torch.cos(t), torch.sin(t)
        f = self.gm.pf_ode_map(x, c, SD * s, torch.ones_like(t), torch.zeros_like(t))
        return (col(c, x) * x - f) / (SD * col(s, x))


def exact_cm(gm):
    return DiffusionModel(ExactConsistencyNet(gm), PATH, "trigflow", sigma_data=SD)


def noisy(gm, n=64, seed=0, lo=0.05, hi=1.5):
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, generator=g)[0]
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    x_t = PATH.interpolate(x0.to(F64), torch.randn(n, 2, generator=g, dtype=F64), t)
    return x_t, t


def mlp_model(dtype=F64):
    torch.manual_seed(1)
    net = MLP(dim=2, width=32, depth=2, emb_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return DiffusionModel(net.to(dtype), PATH, "trigflow", sigma_data=SD)


@pytest.mark.parametrize("which", ["oracle", "mlp"])
def test_tangent_conventions_equal_scaled_central_difference(which):
    model = MIXTURE.model(PATH, "x0") if which == "oracle" else mlp_model()
    x, t = noisy(MIXTURE)
    dxdt = torch.randn_like(x)
    cs = torch.cos(t) * torch.sin(t)

    def F_paper(y, s):  # the paper's F_theta(x_t / sigma_d, t)
        return model.predict(SD * y, s, "trigflow")

    _, conv_a = jvp(F_paper, (x / SD, t), (col(cs, x) * dxdt / SD, cs), method="autodiff")
    _, conv_b = jvp(F_paper, (x / SD, t), (dxdt / SD, torch.ones_like(t)), method="autodiff")
    conv_b = col(cs, x) * conv_b
    h = 1e-5
    fd = col(cs, x) * (model.predict(x + h * dxdt, t + h, "trigflow")
                       - model.predict(x - h * dxdt, t - h, "trigflow")) / (2 * h)
    F_lib, ours = trigflow_tangent(model, x, t, dxdt, method="autodiff")
    scale = float(fd.abs().max())
    assert scale > 1e-2
    for got in (conv_a, conv_b, ours):
        assert (got - fd).abs().max() < 1e-8 * max(1.0, scale)
    assert (conv_a - conv_b).abs().max() < 1e-12 * max(1.0, scale)
    assert torch.equal(F_lib, model.predict(x, t, "trigflow"))
    twice = col(cs, x) * conv_a  # Sana#327's "fix" would scale by cos t sin t a second time
    assert (twice - fd).abs().max() > 1e-3


def test_exact_consistency_field_has_zero_tangent():
    model, teacher = exact_cm(GAUSS), GAUSS.model(PATH, "x0")
    x, t = noisy(GAUSS, lo=1e-3, hi=math.pi / 2 - 1e-3)
    a, s = PATH.alpha(t), PATH.sigma(t)
    assert (model.denoise(x, t) - GAUSS.pf_ode_map(x, a, s, torch.ones_like(t), torch.zeros_like(t))).abs().max() < 1e-12
    dxdt = teacher.predict(x, t, "velocity")
    F, cs_dFdt = trigflow_tangent(model, x, t, dxdt, method="autodiff")
    g = scm_tangent(F, cs_dFdt, x, t, dxdt, SD, r=1.0)
    assert float(g.abs().max()) < 1e-10
    F, cs_dFdt = trigflow_tangent(model, x, t, dxdt, method="fd")
    assert float(scm_tangent(F, cs_dFdt, x, t, dxdt, SD).abs().max()) < 1e-8
    loss = SCTLoss(warmup=0, adaptive=False, jvp="autodiff", window=0)
    data = GAUSS.sample(64, generator=torch.Generator().manual_seed(2))[0]
    assert float(loss(model, data, teacher=teacher, generator=torch.Generator().manual_seed(3)).max()) < 1e-18


def test_standard_gaussian_data_closed_forms():
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [[SD, SD]])
    model, teacher = exact_cm(gm), gm.model(PATH, "x0")
    x, t = noisy(gm, lo=1e-3, hi=math.pi / 2 - 1e-3)
    F = model.predict(x, t, "trigflow")
    assert (F + col(torch.tan(t / 2), x) * x / SD).abs().max() < 1e-12
    dxdt = teacher.predict(x, t, "velocity")
    assert float(dxdt.abs().max()) < 1e-12  # the marginals are stationary: the PF-ODE map is the identity
    F, cs_dFdt = trigflow_tangent(model, x, t, dxdt, method="autodiff")
    assert float(scm_tangent(F, cs_dFdt, x, t, dxdt, SD).abs().max()) < 1e-12


@pytest.mark.parametrize("kind", ["x0", "eps", "velocity"])
def test_df_dt_formula_is_total_derivative_along_pf_ode(kind):
    model = GAUSS.model(PATH, kind)  # a diffusion model: f = its denoiser, not a consistency function
    x, t = noisy(GAUSS, lo=0.1, hi=1.4)
    dxdt = model.predict(x, t, "velocity")
    F, cs_dFdt = trigflow_tangent(model, x, t, dxdt, method="autodiff")
    df_dt = scm_tangent(F, cs_dFdt, x, t, dxdt, SD) / col(torch.cos(t), x)
    h = 1e-5
    a, s = PATH.alpha(t), PATH.sigma(t)
    ends = [GAUSS.pf_ode_map(x, a, s, PATH.alpha(t + d), PATH.sigma(t + d)) for d in (h, -h)]
    fd = (model.denoise(ends[0], t + h) - model.denoise(ends[1], t - h)) / (2 * h)
    assert float(fd.abs().max()) > 1e-2 and (df_dt - fd).abs().max() < 1e-7


def test_warm_up_and_normalisation():
    loss = SCTLoss(warmup=1000)
    assert (loss.warmup_ratio(0), loss.warmup_ratio(500), loss.warmup_ratio(5000)) == (0.0, 0.5, 1.0)
    assert SCTLoss(warmup=0).warmup_ratio(0) == 1.0
    x, t = noisy(GAUSS)
    F, dxdt = torch.randn_like(x), torch.randn_like(x)
    g0 = scm_tangent(F, torch.randn_like(x), x, t, dxdt, SD, r=0.0)
    assert (g0 + col(torch.cos(t) ** 2, x) * (SD * F - dxdt)).abs().max() < 1e-14
    g = torch.randn(5, 3, 4, dtype=F64)
    n = normalize_tangent(g, 0.1, "l2")
    assert torch.allclose(n * (g.reshape(5, -1).norm(dim=1) + 0.1)[:, None, None], g)
    r = normalize_tangent(g, 0.1, "rms")
    assert torch.allclose(r * (g.reshape(5, -1).norm(dim=1) / math.sqrt(12) + 0.1)[:, None, None], g)


def test_times_are_log_normal_edm_sigma():
    t = scm_times(40000, PATH, -1.0, 1.4, generator=torch.Generator().manual_seed(0))
    tau = torch.log(SD * torch.tan(t))
    assert t.dtype == F64 and float(t.max()) <= math.pi / 2 - 1e-4 and float(t.min()) >= 1e-4
    assert abs(float(tau.mean()) + 1.0) < 0.03 and abs(float(tau.std()) - 1.4) < 0.03


def test_loss_trains_model_and_head():
    model = mlp_model(torch.float32)
    loss = SCTLoss(warmup=10)
    assert {n for n, _ in loss.named_parameters()} >= {"head.mlp.0.weight", "head.mlp.2.weight"}
    x = GAUSS.sample(32, generator=torch.Generator().manual_seed(0))[0].float()
    out = loss(model, x, generator=torch.Generator().manual_seed(1), step=5)
    assert out.shape == (32,) and bool(torch.isfinite(out).all())
    out.mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert float(loss.head.mlp[2].weight.grad.abs().sum()) > 0
    assert float(model.net.inp.weight.grad.abs().sum()) > 0


class KinkNet(nn.Module):
    """F = W x sqrt(|t - t0|): finite, but its forward-mode t-derivative is NaN at t = t0 exactly."""

    def __init__(self, t0: float):
        super().__init__()
        self.lin, self.t0 = nn.Linear(2, 2).double(), t0

    def forward(self, x, t):
        return self.lin(x) * torch.sqrt((t - self.t0).abs())[:, None]


def test_nan_rows_are_dropped():
    t = torch.tensor([0.7, 0.3, 0.9, 1.2], dtype=F64)
    model = DiffusionModel(KinkNet(0.7), PATH, "trigflow", sigma_data=SD)
    x = GAUSS.sample(4, generator=torch.Generator().manual_seed(0))[0]
    terms = SCTLoss(jvp="autodiff", window=0).terms(model, x, t=t, generator=torch.Generator().manual_seed(1), step=2000)
    assert terms.ok.tolist() == [False, True, True, True] and float(terms.mse[0]) == 0.0
    out = SCTLoss(jvp="autodiff", window=0)(model, x, generator=torch.Generator().manual_seed(1))
    out.mean().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_bad_paths_are_named():
    with pytest.raises(UnifuseError, match="TrigFlow"):
        trigflow_sigma_d(GAUSS.model(uf.paths.get("edm"), "x0"))
    with pytest.raises(UnifuseError, match="sigma_d"):
        trigflow_sigma_d(GAUSS.model(PATH, "x0", sigma_data=1.0))
    with pytest.raises(UnifuseError):
        SCTLoss(norm="max")


def test_loss_is_the_same_with_autodiff_and_finite_differences():
    model = mlp_model()
    x = MIXTURE.sample(32, generator=torch.Generator().manual_seed(0))[0]
    out = [SCTLoss(warmup=0, jvp=m, window=0)(model, x, generator=torch.Generator().manual_seed(1)) for m in ("autodiff", "fd")]
    assert float(out[0].min()) > 1e-3 and (out[0] - out[1]).abs().max() < 1e-7 * float(out[0].max())


class WiggleNet(nn.Module):
    """F = F_cm* + a sin(omega log sigma_edm): the exact consistency field plus the high-frequency error in t that a
    network fitted only at sampled times keeps when its time embedding is sinusoidal(c_noise), c_noise = 250 log
    sigma (EDM's, top frequency 1: omega = 250 per unit of log sigma)."""

    def __init__(self, gm: GaussianMixture, a: float, omega: float):
        super().__init__()
        self.exact, self.a, self.omega = ExactConsistencyNet(gm), a, omega

    def forward(self, x_in, t):
        return self.exact(x_in, t) + self.a * torch.sin(self.omega * torch.log(SD * torch.tan(t)))[:, None]


def secant_g(model, x, t, dxdt, window, t_max=math.pi / 2):
    F, cs_dFdt = trigflow_tangent(model, x, t, dxdt, method="fd", window=window, t_max=t_max)
    return scm_tangent(F, cs_dFdt, x, t, dxdt, SD)


def test_secant_tangent_is_second_order_on_the_exact_consistency_field():
    """On F_cm* (g = 0 exactly) the secant over +-w in log sigma along the pre-scaled tangent leaves g = O(w^2):
    halving w divides g by 4 (the straight line leaves the curved PF-ODE by O(w^2))."""
    model, teacher = exact_cm(GAUSS), GAUSS.model(PATH, "x0")
    x, t = noisy(GAUSS, n=256, lo=0.05, hi=1.5)
    dxdt = teacher.predict(x, t, "velocity")
    sizes = [float(secant_g(model, x, t, dxdt, w).abs().max()) for w in (0.1, 0.05, 0.025)]
    assert sizes[0] < 0.05 and 3.6 < sizes[0] / sizes[1] < 4.4 and 3.6 < sizes[1] / sizes[2] < 4.4


def test_secant_bounds_the_tangent_of_high_frequency_time_errors():
    """F = F_cm* + e, e = a sin(omega L), L = log sigma_edm: along the pre-scaled tangent dL/ds = 1, so the pointwise
    tangent carries sigma_d a omega cos(omega L) (omega = 250: 250 times the error itself), while the secant's part
    |e(L + w) - e(L - w)| / 2w <= a / w. Hence |g| <= sigma_d a (cos^2 t + 1 / w) + the O(w^2) bias, whatever omega."""
    a, omega, w = 0.01, 250.0, 0.1
    teacher = GAUSS.model(PATH, "x0")
    model = DiffusionModel(WiggleNet(GAUSS, a, omega), PATH, "trigflow", sigma_data=SD)
    x, t = noisy(GAUSS, n=256, lo=0.05, hi=1.5)
    dxdt = teacher.predict(x, t, "velocity")
    F, cs_dFdt = trigflow_tangent(model, x, t, dxdt, method="autodiff")
    pointwise = scm_tangent(F, cs_dFdt, x, t, dxdt, SD)
    L = torch.log(SD * torch.tan(t))
    expected = -SD * a * (torch.cos(t) ** 2 * torch.sin(omega * L) + omega * torch.cos(omega * L))
    assert (pointwise - col(expected, x)).abs().max() < 1e-8  # the error term, exactly
    assert float(pointwise.abs().max()) > 0.9 * SD * a * omega
    bias = float(secant_g(exact_cm(GAUSS), x, t, dxdt, w).abs().max())
    secant = secant_g(model, x, t, dxdt, w)
    assert float(secant.abs().max()) <= SD * a * (1 + 1 / w) + bias + 1e-9


def test_secant_window_narrows_at_the_ends():
    """Rows whose window would leave [0, t_max] take a narrower one: every evaluation stays inside, and on a field
    linear in (x, t) the secant is the exact tangent for any window."""
    seen = []

    class Linear(nn.Module):
        def forward(self, x_in, t):
            seen.append(t.detach().clone())
            return 0.3 * x_in + 0.7 * t[:, None]

    model = DiffusionModel(Linear(), PATH, "trigflow", sigma_data=SD)
    t = torch.tensor([1e-4, 0.5, 1.19, 1.1999], dtype=F64)
    x, v = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    _, tan = trigflow_tangent(model, x, t, v, method="fd", window=0.5, t_max=1.2)
    cs = col(torch.cos(t) * torch.sin(t), x)
    assert (tan - cs * (0.3 * v / SD + 0.7)).abs().max() < 1e-9
    assert float(torch.cat(seen).min()) > 0 and float(torch.cat(seen).max()) < 1.2
    with pytest.raises(UnifuseError, match="window=0"):
        SCTLoss(jvp="autodiff")

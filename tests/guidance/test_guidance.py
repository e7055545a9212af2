"""Guidance transforms against the exact class-conditional Gaussian mixture (GAUSSIAN_ORACLE section 3):
the exact noisy classifier is the responsibility r_y(x_t), and CFG with scale w on the exact models is
score + w (score_y - score)."""
import math
from itertools import pairwise

import pytest
import torch

import unifuse as uf
from unifuse import guidance as G
from unifuse.data import conditions
from unifuse.errors import UnifuseError
from unifuse.nets.classifier import NoisyClassifier
from unifuse.objectives.classifier import ClassifierLoss
from unifuse.objectives.time import rand_logsnr_uniform
from unifuse.parameterization.convert import coefficients
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture([0.25, 0.45, 0.3], [[1.5, 0.0, -1.0, 0.5], [-1.0, 1.0, 0.5, 0.0], [0.0, -1.5, 1.0, 1.0]],
                     [[0.3, 0.5, 0.2, 0.4], [0.6, 0.05, 0.4, 0.3], [0.2, 0.3, 0.5, 0.6]])
PATHS = ["vp-linear", "rf", "edm", "ddpm-cosine", "trigflow"]


class OracleClassifier:
    """The exact noisy classifier log r_k(x_t) on a path (its logits)."""

    def __init__(self, gm, path):
        self.gm, self.path = gm, path

    def __call__(self, x, t):
        return torch.log(self.gm.responsibilities(x, self.path.alpha(t), self.path.sigma(t)))


def mid_times(path, n=3):
    """Times strictly inside the path, spread in log-SNR between 6 and -4."""
    return [path.t_from_log_snr(torch.tensor(lam, dtype=F64)) for lam in torch.linspace(6.0, -4.0, n).tolist()]


def ddim(model, x, path, steps=12, generator=None, eta=0.0, **cond):
    """DDIM (ALGORITHMS card 4) over a log-SNR grid; eta = 1 is ancestral. Only model.evaluate is used."""
    ts = uf.paths.time_grid(path, steps, "logsnr")
    x = x * path.prior_sigma
    for t, s in pairwise(ts):
        e = model.evaluate(x, t, **cond)
        a_s, s_s, a_t, s_t = path.alpha(s), path.sigma(s), path.alpha(t), path.sigma(t)
        var = eta**2 * s_s**2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2)  # posterior variance of q(x_s | x_t, x0)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) if eta else 0
        x = a_s * e.x0 + torch.sqrt(s_s**2 - var) * e.eps + torch.sqrt(var) * noise
    return x


def oracle_cfg_eps(x, path, t, w, y):
    """eps of CFG on the exact models: -sigma (score + w (score_y - score)); y = -1 keeps the plain score."""
    a, s = path.alpha(t), path.sigma(t)
    sc, scy = GM.score(x, a, s), GM.score(x, a, s, y.clamp(min=0))
    guided = sc + w * (scy - sc)
    return -s * torch.where((y >= 0)[:, None], guided, sc)


# --- classifier guidance ------------------------------------------------------------------------
@pytest.mark.parametrize("name", PATHS)
def test_classifier_guidance_scale_one_is_the_conditional_model(name):
    path = uf.paths.get(name)
    uncond = GM.model(path, "v")
    cond = GM.model(path, "eps", conditional=True)
    guided = G.classifier_guidance(uncond, OracleClassifier(GM, path), 1.0)
    x = torch.randn(6, 4, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for t in mid_times(path):
        g, c, u = guided.evaluate(x, t, class_labels=y), cond.evaluate(x, t, class_labels=y), uncond.evaluate(x, t)
        assert (c.x0 - u.x0).abs().max() > 1e-3  # the guidance does something here
        torch.testing.assert_close(g.x0, c.x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(g.eps, c.eps, rtol=0, atol=1e-9)
    assert guided.classifier_evals == guided.cond_evals == 3


def test_classifier_guidance_with_a_classifier_on_another_path():
    """A classifier trained on VP guides an RF model: times map at equal log-SNR, x is rescaled."""
    rf, vp = uf.paths.get("rf"), uf.paths.get("vp-cosine")
    guided = G.classifier_guidance(GM.model(rf, "velocity"), OracleClassifier(GM, vp), 1.0)
    cond = GM.model(rf, "x0", conditional=True)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([2, 1, 0, 1, 2])
    for t in (0.2, 0.5, 0.8):
        torch.testing.assert_close(guided.evaluate(x, t, class_labels=y).x0, cond.evaluate(x, t, class_labels=y).x0,
                                   rtol=0, atol=1e-8)


def test_classifier_guidance_scale_and_null_label():
    """Scale s multiplies the classifier gradient: score_s = score + s (score_y - score); label -1 is unguided."""
    path = uf.paths.get("vp-linear")
    guided = G.classifier_guidance(GM.model(path, "eps"), OracleClassifier(GM, path), 2.5)
    x, y, t = torch.randn(4, 4, dtype=F64), torch.tensor([0, 2, -1, 1]), torch.tensor(0.3, dtype=F64)
    torch.testing.assert_close(guided.evaluate(x, t, class_labels=y).eps, oracle_cfg_eps(x, path, t, 2.5, y),
                               rtol=0, atol=1e-9)


# --- classifier-free guidance ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp-linear", "rf", "edm"])
def test_cfg_matches_the_exact_guided_score(name):
    path = uf.paths.get(name)
    model = GM.model(path, "v", conditional=True)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, -1, 1])
    for t in mid_times(path):
        for batch in (True, False):
            guided = G.classifier_free(model, 3.0, batch=batch)
            torch.testing.assert_close(guided.evaluate(x, t, class_labels=y).eps, oracle_cfg_eps(x, path, t, 3.0, y),
                                       rtol=0, atol=1e-9)
            assert guided.counts()["cond_evals"] == guided.counts()["uncond_evals"] == 1


def test_cfg_scale_one_and_zero_are_the_conditional_and_unconditional_models():
    path = uf.paths.get("vp-cosine")
    model = GM.model(path, "x0", conditional=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    noise = torch.randn(6, 4, dtype=F64)
    one, zero = G.classifier_free(model, 1.0), G.classifier_free(model, 0.0)
    assert torch.equal(ddim(one, noise, path, class_labels=y), ddim(model, noise, path, class_labels=y))
    null = -torch.ones(6, dtype=torch.long)
    assert torch.equal(ddim(zero, noise, path, class_labels=y), ddim(model, noise, path, class_labels=null))
    assert (one.cond_evals, one.uncond_evals, zero.cond_evals, zero.uncond_evals) == (12, 0, 0, 12)
    # and w slightly off 1 or 0 is continuous with them (the general formula, not the shortcut)
    near = G.classifier_free(model, 1.0 + 1e-9)
    assert (ddim(near, noise, path, class_labels=y) - ddim(one, noise, path, class_labels=y)).abs().max() < 1e-7


@pytest.mark.parametrize("name", ["vp-linear", "rf", "trigflow"])
def test_cfg_in_any_prediction_kind_gives_the_same_samples(name):
    path = uf.paths.get(name)
    model = GM.model(path, {"vp-linear": "eps", "rf": "velocity", "trigflow": "v"}[name], conditional=True)
    noise, y = torch.randn(8, 4, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    runs = {}
    for kind in ("eps", "x0", "v", "velocity", "score", "edm"):
        g = torch.Generator().manual_seed(1)
        runs[kind] = ddim(G.classifier_free(model, 4.0, kind=kind), noise, path, generator=g, eta=1.0, class_labels=y)
    for kind, out in runs.items():
        torch.testing.assert_close(out, runs["x0"], rtol=0, atol=1e-9, msg=kind)
    # the same through the library's samplers (a multistep and a stochastic one)
    if hasattr(uf, "sample"):
        for sampler in ("dpmpp_2m", "euler_maruyama"):
            nfe = 8 if sampler == "dpmpp_2m" else 16  # Euler-Maruyama is refused below ~10 steps on these paths
            outs = [uf.sample(model, noise, sampler=sampler, nfe=nfe, generator=5, cond={"class_labels": y}, guidance=4.0,
                              guidance_options={"kind": kind}) for kind in ("eps", "x0", "v", "velocity")]
            for out in outs[1:]:
                torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-9)
    # the guided samples are not the conditional ones (the test can fail)
    unguided = ddim(model, noise, path, generator=torch.Generator().manual_seed(1), eta=1.0, class_labels=y)
    assert (runs["x0"] - unguided).abs().max() > 1e-2


def test_cfg_rescale():
    """Lin et al. (2023): phi = 1 gives the conditional prediction's std; phi = 0 is plain CFG; depends on kind."""
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "eps", conditional=True)
    x, y, t = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 0, 1]), torch.tensor(0.5, dtype=F64)
    plain = G.classifier_free(model, 5.0).evaluate(x, t, class_labels=y)
    v_guided = G.classifier_free(model, 5.0, rescale=0.0, kind="v")
    torch.testing.assert_close(v_guided.evaluate(x, t, class_labels=y).x0, plain.x0)
    full = G.classifier_free(model, 5.0, rescale=1.0, kind="x0").evaluate(x, t, class_labels=y)
    cond = model.evaluate(x, t, class_labels=y)
    torch.testing.assert_close(full.x0.std(1), cond.x0.std(1), rtol=1e-10, atol=0)
    assert (full.x0.std(1) - plain.x0.std(1)).abs().max() > 1e-3
    in_v = G.classifier_free(model, 5.0, rescale=0.7, kind="v").evaluate(x, t, class_labels=y)
    in_x0 = G.classifier_free(model, 5.0, rescale=0.7, kind="x0").evaluate(x, t, class_labels=y)
    assert (in_v.x0 - in_x0.x0).abs().max() > 1e-4  # not affine: card 4's checkable fact


# --- the guidance interval ---------------------------------------------------------------------------
def test_interval_switches_guidance_exactly():
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "eps", conditional=True)
    lo, hi = 0.5, 3.0
    guided = G.classifier_free(model, 4.0, interval=(lo, hi))
    plain = G.classifier_free(model, 4.0)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 0, 1])
    for s_edm in (0.1, 0.5, 0.50001, 1.0, 3.0, 3.0001, 20.0):
        t = path.t_from_sigma_edm(torch.tensor(s_edm, dtype=F64))
        inside = lo < float(path.sigma_edm(t)) <= hi
        before = guided.uncond_evals
        out = guided.evaluate(x, t, class_labels=y)
        ref = plain.evaluate(x, t, class_labels=y) if inside else model.evaluate(x, t, class_labels=y)
        assert torch.equal(out.x0, ref.x0) and torch.equal(out.eps, ref.eps)
        assert guided.uncond_evals - before == int(inside)  # outside, only the conditional network runs


def test_interval_per_sample_times_and_log_snr_form():
    path = uf.paths.get("edm")
    model = GM.model(path, "edm", conditional=True)
    x, y = torch.randn(4, 4, dtype=F64), torch.tensor([0, 1, 2, 1])
    t = torch.tensor([0.2, 1.0, 4.0, 10.0], dtype=F64)  # sigma_edm = t on EDM
    by_sigma = G.classifier_free(model, 3.0, interval=(0.5, 5.0))
    by_lam = G.classifier_free(model, 3.0, interval_log_snr=(-2 * math.log(5.0), -2 * math.log(0.5)))
    plain = G.classifier_free(model, 3.0).evaluate(x, t, class_labels=y)
    cond = model.evaluate(x, t, class_labels=y)
    for g in (by_sigma, by_lam):
        out = g.evaluate(x, t, class_labels=y)
        for i, on in enumerate([False, True, True, False]):
            ref = plain if on else cond
            torch.testing.assert_close(out.x0[i], ref.x0[i], rtol=0, atol=1e-12)


def test_full_interval_is_plain_cfg_and_empty_interval_is_the_conditional_model():
    path = uf.paths.get("rf")
    model = GM.model(path, "velocity", conditional=True)
    noise, y = torch.randn(6, 4, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    full = ddim(G.classifier_free(model, 3.0, interval=(0.0, math.inf)), noise, path, class_labels=y)
    assert torch.equal(full, ddim(G.classifier_free(model, 3.0), noise, path, class_labels=y))
    empty = G.classifier_free(model, 3.0, interval=(1.0, 1.0))
    assert torch.equal(ddim(empty, noise, path, class_labels=y), ddim(model, noise, path, class_labels=y))
    assert empty.uncond_evals == 0


def test_interval_means_the_same_on_another_path():
    """The interval is a set of noise levels: the guided VP model seen on RF switches at the same sigma/alpha."""
    vp, rf = uf.paths.get("vp-linear"), uf.paths.get("rf")
    model = GM.model(vp, "eps", conditional=True)
    on_rf = G.classifier_free(model, 3.0, interval=(0.4, 2.0)).on(rf)
    native = G.classifier_free(model.on(rf), 3.0, interval=(0.4, 2.0))
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([2, 0, 1])
    for s_edm in (0.3, 0.41, 1.0, 1.99, 2.5):
        t = rf.t_from_sigma_edm(torch.tensor(s_edm, dtype=F64))
        torch.testing.assert_close(on_rf.evaluate(x, t, class_labels=y).x0, native.evaluate(x, t, class_labels=y).x0,
                                   rtol=0, atol=1e-10)


# --- autoguidance ------------------------------------------------------------------------------------
def test_autoguidance():
    """D = D_weak + w (D - D_weak); w = 1 is the main model; a weak model on another path is re-expressed."""
    path = uf.paths.get("vp-linear")
    main = GM.model(path, "eps", conditional=True)
    weak_gm = GaussianMixture(GM.weights, GM.means * 0.8, GM.stds * 1.5)
    weak = weak_gm.model(uf.paths.get("rf"), "velocity", conditional=True)
    x, y, t = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 0, -1]), torch.tensor(0.4, dtype=F64)
    a, s = path.alpha(t), path.sigma(t)
    d_main = GM.x0_hat(x, a, s, y.clamp(min=0))
    d_main[4] = GM.x0_hat(x[4:], a, s)[0]
    d_weak = weak_gm.x0_hat(x, a, s, y.clamp(min=0))
    d_weak[4] = weak_gm.x0_hat(x[4:], a, s)[0]
    g = G.autoguidance(main, weak, 2.0)
    torch.testing.assert_close(g.evaluate(x, t, class_labels=y).x0, d_weak + 2.0 * (d_main - d_weak), rtol=0, atol=1e-9)
    assert (g.cond_evals, g.weak_evals) == (1, 1)
    one = G.autoguidance(main, weak, 1.0)
    assert torch.equal(one.evaluate(x, t, class_labels=y).x0, main.evaluate(x, t, class_labels=y).x0)
    assert one.weak_evals == 0


# --- the guided object is a model ---------------------------------------------------------------------
def test_guided_model_keeps_the_model_interface():
    path = uf.paths.get("ddpm-linear")
    model = GM.model(path, "eps", conditional=True)
    g = G.classifier_free(model, 2.0, interval=(0.1, 10.0))
    assert isinstance(g, uf.DiffusionModel)
    assert (g.path, g.prediction, g.t_max, g.t_eps) == (model.path, model.prediction, model.t_max, model.t_eps)
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 1, 2])
    v = g.predict(x, 500, "v", class_labels=y)
    e = g.evaluate(x, 500, class_labels=y)
    c = coefficients(path, torch.tensor(500.0, dtype=F64), x)
    torch.testing.assert_close(v, c.alpha * e.eps - c.sigma * e.x0)
    g.reset_counts()
    assert sum(g.counts().values()) == 0


def test_sample_reports_guided_evaluations():
    """uf.sample(..., guidance=w) wraps the model and counts conditional and unconditional calls separately;
    with an interval only the grid points inside it pay for the unconditional call."""
    if not hasattr(uf, "sample"):
        pytest.skip("uf.sample is not available yet")
    path = uf.paths.get("vp-linear")
    model = GM.model(path, "eps", conditional=True)
    y, noise = torch.tensor([0, 1, 2, 0]), torch.randn(4, 4, dtype=F64)
    _, info = uf.sample(model, noise, sampler="dpmpp_2m", nfe=6, cond={"class_labels": y}, guidance=3.0,
                        return_info=True)
    assert info["nfe"] == 6 and info["guidance"]["cond_evals"] == info["guidance"]["uncond_evals"] == 6
    _, info = uf.sample(model, noise, sampler="dpmpp_2m", nfe=6, cond={"class_labels": y}, guidance=3.0,
                        guidance_options={"interval": (0.5, 5.0)}, return_info=True)
    sig = path.sigma_edm(torch.tensor(info["grid"][:-1], dtype=F64))
    assert info["guidance"]["cond_evals"] == 6
    assert info["guidance"]["uncond_evals"] == int(((sig > 0.5) & (sig <= 5.0)).sum()) > 0


# --- bad input --------------------------------------------------------------------------------------------
def test_bad_conditions_give_one_clear_message():
    path = uf.paths.get("vp-linear")
    cond_model = GM.model(path, "eps", conditional=True)
    x = torch.randn(2, 4, dtype=F64)
    with pytest.raises(UnifuseError, match=r"class 5 is outside the trained range 0\.\.2"):
        G.classifier_free(cond_model, 2.0).evaluate(x, 0.5, class_labels=torch.tensor([0, 5]))
    with pytest.raises(UnifuseError, match="trained without classes or text"):
        G.classifier_free(GM.model(path, "eps"), 2.0)
    with pytest.raises(UnifuseError, match="needs a condition"):
        G.classifier_free(cond_model, 2.0).evaluate(x, 0.5)
    with pytest.raises(UnifuseError, match="trained without text"):
        conditions.check_condition(cond_model, text=torch.zeros(2, 384))
    with pytest.raises(UnifuseError, match="interval"):
        G.classifier_free(cond_model, 2.0, interval=(3.0, 1.0))
    with pytest.raises(UnifuseError, match="scale"):
        G.classifier_free(cond_model, "strong")
    with pytest.raises(UnifuseError, match="rescale"):
        G.classifier_free(cond_model, 2.0, rescale=1.5)
    with pytest.raises(UnifuseError, match="target classes"):
        G.classifier_guidance(GM.model(path, "eps"), OracleClassifier(GM, path), 1.0).evaluate(x, 0.5)


def test_network_conditioning_is_read_for_checks():
    unet = pytest.importorskip("unifuse.nets.unet")
    net = unet.UNet(channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=10)
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")
    assert conditions.conditioning(model) == {"num_classes": 10, "text_dim": 0}
    seen = G.classifier_free(model, 2.0).on(uf.paths.get("rf"))
    assert conditions.conditioning(seen) == {"num_classes": 10, "text_dim": 0}
    with pytest.raises(UnifuseError, match=r"outside the trained range 0\.\.9"):
        conditions.check_condition(model, class_labels=torch.tensor([3, 11]))
    with pytest.raises(UnifuseError, match="trained without text"):
        conditions.check_condition(model, text=torch.zeros(2, 5, 384))


def test_cfg_batches_token_text_of_different_lengths():
    """Conditional tokens [B, L, d] and a shorter null are padded and masked into one forward pass."""
    unet = pytest.importorskip("unifuse.nets.unet")
    torch.manual_seed(0)
    net = unet.UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, text_dim=6,
                    dropout=0.0).double()
    for p in net.parameters():  # make the zero-initialised output layers live
        torch.nn.init.normal_(p, std=0.2)
    model = uf.DiffusionModel(net, uf.paths.get("vp-linear"), "eps")
    text, mask = torch.randn(2, 5, 6, dtype=F64), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    null = {"text": torch.randn(1, 2, 6, dtype=F64), "text_mask": torch.ones(1, 2, dtype=torch.bool)}
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    one = G.classifier_free(model, 2.5, uncond=null, batch=True).evaluate(x, 0.5, text=text, text_mask=mask)
    two = G.classifier_free(model, 2.5, uncond=null, batch=False).evaluate(x, 0.5, text=text, text_mask=mask)
    torch.testing.assert_close(one.x0, two.x0, rtol=0, atol=1e-10)


# --- the noise-conditional classifier -------------------------------------------------------------------
def test_noisy_classifier_is_path_invariant_and_trains():
    vp, rf = uf.paths.get("vp-linear"), uf.paths.get("rf")
    torch.manual_seed(0)
    clf = NoisyClassifier(vp, in_channels=1, num_classes=3, width=8, emb_dim=16).double()
    other = NoisyClassifier(rf, in_channels=1, num_classes=3, width=8, emb_dim=16).double()
    other.load_state_dict(clf.state_dict())
    x0 = torch.randn(4, 1, 8, 8, dtype=F64)
    noise = torch.randn_like(x0)
    t_vp = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    t_rf = rf.t_from_log_snr(vp.log_snr(t_vp))
    torch.testing.assert_close(clf(vp.interpolate(x0, noise, t_vp), t_vp), other(rf.interpolate(x0, noise, t_rf), t_rf),
                               rtol=1e-7, atol=1e-9)
    # the loss is per sample and a few steps lower it on separable data
    labels = torch.arange(3).repeat(22)[:64]
    data = (labels.double() - 1)[:, None, None, None] * torch.ones(64, 1, 8, 8, dtype=F64)
    data = data + 0.1 * torch.randn(64, 1, 8, 8, dtype=F64)
    loss = ClassifierLoss(clean_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    first = loss(clf, data, labels, g)
    assert first.shape == (64,) and bool(torch.isfinite(first).all())
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(30):
        value = loss(clf, data, labels, torch.Generator().manual_seed(1)).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        assert float(loss(clf, data, labels, torch.Generator().manual_seed(1)).mean()) < 0.7 * float(first.mean())
    t = rand_logsnr_uniform(1000, vp, generator=torch.Generator().manual_seed(0), clip=(-5.0, 5.0))
    lam = vp.log_snr(t)
    assert float(lam.min()) >= -5 - 1e-9 and float(lam.max()) <= 5 + 1e-9 and float(lam.std()) > 2.5
    # it plugs into classifier guidance of a model on another path: eps -= s sigma grad log p(y | x_t)
    gm = GaussianMixture.gaussian(torch.zeros(64, dtype=F64), 1.0)
    base = gm.model(rf, "velocity")
    guided = G.classifier_guidance(base, clf, 2.0)
    x, y, t = torch.randn(2, 1, 8, 8, dtype=F64), torch.tensor([0, 2]), torch.tensor(0.4, dtype=F64)
    t_vp = vp.t_from_log_snr(rf.log_snr(t))
    scale = torch.sqrt((vp.alpha(t_vp) ** 2 + vp.sigma(t_vp) ** 2) / (rf.alpha(t) ** 2 + rf.sigma(t) ** 2))
    xg = (x * scale).requires_grad_(True)
    logp = torch.log_softmax(clf(xg, t_vp), 1).gather(1, y[:, None]).sum()
    grad = torch.autograd.grad(logp, xg)[0] * scale
    expected = base.evaluate(x, t).eps - 2.0 * rf.sigma(t) * grad
    torch.testing.assert_close(guided.evaluate(x, t, class_labels=y).eps, expected, rtol=1e-9, atol=1e-12)


def test_condition_dropout_for_training():
    y = torch.arange(10).repeat(100)
    out = conditions.drop_condition({"class_labels": y}, 0.2, torch.Generator().manual_seed(0))
    dropped = out["class_labels"] == -1
    assert bool((out["class_labels"][~dropped] == y[~dropped]).all())
    assert 0.15 < float(dropped.double().mean()) < 0.25
    text, mask = torch.randn(20, 5, 3), torch.ones(20, 5, dtype=torch.bool)
    null = {"text": torch.full((1, 2, 3), 7.0), "text_mask": torch.ones(1, 2, dtype=torch.bool)}
    g = torch.Generator().manual_seed(3)
    out = conditions.drop_condition({"text": text, "text_mask": mask}, 0.5, g, uncond=null)
    gone = out["text_mask"].sum(1) == 2
    assert 0 < int(gone.sum()) < 20
    assert bool((out["text"][gone, :2] == 7).all()) and bool((out["text"][gone, 2:] == 0).all())
    assert torch.equal(out["text"][~gone], text[~gone])


def test_classifier_preset_saves_and_loads(tmp_path):
    from unifuse.nets.classifier import load_noisy_classifier
    from unifuse.training.classifier import train_classifier_preset

    record = train_classifier_preset("digits-classifier", str(tmp_path), steps=1, progress=False, log=lambda *_: None)
    assert set(record["heldout_accuracy"]) == {"sigma=0", "sigma=0.5", "sigma=1", "sigma=2", "sigma=5"}
    assert record["shape"] == [1, 8, 8] and record["class_names"] == [str(i) for i in range(10)]
    clf = load_noisy_classifier(str(tmp_path), shape=(1, 8, 8), num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    assert clf(x, 1.0).shape == (3, 10)
    with pytest.raises(UnifuseError, match=r"shape \[1, 8, 8\], but the model makes \[1, 32, 32\]"):
        load_noisy_classifier(str(tmp_path), shape=(1, 32, 32))
    with pytest.raises(UnifuseError, match="knows 10 classes, but the model's data has 2"):
        load_noisy_classifier(str(tmp_path), num_classes=2)
    with pytest.raises(UnifuseError, match="train one with"):
        load_noisy_classifier(str(tmp_path / "missing"))
    with pytest.raises(UnifuseError, match="classifier preset"):
        train_classifier_preset("cifar-classifier", str(tmp_path))


def test_cli_class_guidance_interval_and_bad_input(tmp_path, capsys):
    cli = pytest.importorskip("unifuse.cli")
    run = str(tmp_path / "run")
    small = ["--set", "model.net=unet-digits-cond", "--set", "model.net_options={'channels': 8, 'num_res_blocks': 1}",
             "--set", "data.batch=16"]
    assert cli.main(["train", "digits-cond", "--out", run, "--steps", "1", "--no-progress", *small]) == 0
    out = str(tmp_path / "s")
    assert cli.main(["sample", "--ckpt", run, "--out", out, "--n", "4", "--nfe", "3", "--class", "3", "--guidance", "2",
                     "--guidance-interval", "0.3,5"]) == 0
    import numpy as np
    assert np.load(f"{out}/samples.npz")["labels"].tolist() == [3, 3, 3, 3]
    capsys.readouterr()
    for bad, message in ((["--class", "12"], "0..9"), (["--prompt", "a three"], "caption-conditional"),
                         (["--guidance", "2", "--guidance-interval", "5"], "LO,HI"),
                         (["--guidance-interval", "1,2"], "needs --guidance")):
        assert cli.main(["sample", "--ckpt", run, "--out", out, "--n", "2", "--nfe", "2", *bad]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1

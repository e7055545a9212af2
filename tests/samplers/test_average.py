"""The "average" sampler (samplers/average.py): with the exact average velocity of a single Gaussian one jump per
step reproduces the exact probability-flow map on any grid; the network receives the end time in its own units;
a one-time model is sampled by Euler's method on the same grid; uf.sample spends exactly nfe evaluations."""
import pytest
import torch

import unifuse as uf
from unifuse.nets import MLP
from unifuse.samplers.average import sample_average

from ..objectives.test_meanflow import GM, RF, exact_model

F64 = torch.float64
NOISE = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))


def exact_map(x, t_from, t_to):
    p = RF
    t0, t1 = torch.tensor(t_from, dtype=F64), torch.tensor(t_to, dtype=F64)
    return GM.pf_ode_map(x, p.alpha(t0), p.sigma(t0), p.alpha(t1), p.sigma(t1))


@pytest.mark.parametrize("nfe", [1, 2, 3, 5])
def test_exact_average_velocity_reproduces_the_exact_map(nfe):
    """uf.sample(..., "average", nfe=K) from noise at t = 1 lands on the exact ODE map to t = 0 (any K)."""
    model = exact_model()
    out, info = uf.sample(model, NOISE, "average", nfe=nfe, return_info=True)
    assert info["nfe"] == nfe and info["grid"][0] == 1.0 and info["grid"][-1] == 0.0
    torch.testing.assert_close(out, exact_map(NOISE, 1.0, 0.0), rtol=0, atol=1e-12)


def test_one_jump_between_any_two_times_is_the_exact_map():
    """One step on a user grid [t, r] (not ending at the data) is Phi_{t->r}; the network is fed r in its own
    units (here 1000 t, the rf path's c_noise)."""
    model = exact_model(scale=1000.0)
    for t, r in ((0.9, 0.4), (0.5, 0.05), (0.3, 0.29)):
        x = exact_map(NOISE, 1.0, t)
        model.net.seen.clear()
        out = sample_average(model, x, torch.tensor([t, r], dtype=F64))
        torch.testing.assert_close(out, exact_map(x, t, r), rtol=0, atol=1e-12)
        assert len(model.net.seen) == 1 and torch.allclose(model.net.seen[0], torch.full((32,), r, dtype=F64))


def test_a_one_time_model_is_sampled_by_euler():
    """Without two_times the step is Euler's, bit for bit, on the same grid."""
    model = GM.model(RF, "velocity")
    for nfe in (1, 4):
        a = uf.sample(model, NOISE, "average", nfe=nfe)
        b = uf.sample(model, NOISE, "euler", nfe=nfe, spacing="uniform")
        assert torch.equal(a, b)
    assert float((uf.sample(model, NOISE, "average", nfe=1) - exact_map(NOISE, 1.0, 0.0)).abs().max()) > 0.1


def test_a_two_time_network_gets_r_and_samples_in_float32():
    """A two-time MLP (zero-initialised end-time embedding) sampled in float32: the same as Euler at init (u = v
    there), and different once the end-time layer is non-zero; cond entries reach the net alongside r."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1, emb_dim=16, two_times=True, num_classes=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net.embed.gap[-1].weight.zero_()
        net.embed.gap[-1].bias.zero_()
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise)
    noise = NOISE.float()
    cond = {"class_labels": torch.ones(32, dtype=torch.long)}
    a = uf.sample(model, noise, "average", nfe=3, cond=cond)
    b = uf.sample(model, noise, "euler", nfe=3, spacing="uniform", cond=cond)
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        net.embed.gap[-1].weight.normal_()
    c = uf.sample(model, noise, "average", nfe=3, cond=cond)
    assert float((c - b).abs().max()) > 1e-3


def test_refusals():
    with pytest.raises(uf.UnifuseError, match="on another path"):
        uf.sample(exact_model().on(uf.paths.get("trigflow")), NOISE, "average", nfe=2)


def test_registered():
    assert "average" in uf.samplers.available()
    spec = uf.samplers.get("average")
    assert spec.cost == "step" and spec.spacing == "uniform" and spec.default_nfe == 1


def test_guided_two_time_model():
    """Classifier-free guidance passes r to both halves: each jump uses u_null + w (u_cond - u_null)."""
    from unifuse.objectives.meanflow import average_velocity

    torch.manual_seed(1)
    net = MLP(dim=2, width=16, depth=1, emb_dim=16, two_times=True, num_classes=2).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = uf.DiffusionModel(net, RF, "velocity", time_input=RF.c_noise)
    labels = torch.ones(32, dtype=torch.long)
    out = uf.sample(model, NOISE, "average", nfe=2, guidance=2.0, cond={"class_labels": labels})
    x = NOISE.clone()
    for t, r in ((1.0, 0.5), (0.5, 0.0)):
        tt, rr = torch.full((32,), t, dtype=F64), torch.full((32,), r, dtype=F64)
        u_c = average_velocity(model, x, rr, tt, {"class_labels": labels})
        u_n = average_velocity(model, x, rr, tt, {"class_labels": -torch.ones_like(labels)})
        x = x - (t - r) * (u_n + 2.0 * (u_c - u_n))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)

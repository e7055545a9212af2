"""Diffusion-DPO and IPO (card 22): closed forms at theta = ref, the diffusers convention, a Gaussian base moving
toward the preferred side, folder pairs and their errors."""
import copy
import math

import numpy as np
import pytest
import torch

import unifuse.paths as P
from unifuse import DiffusionModel
from unifuse.errors import UnifuseError
from unifuse.finetune import Context, dpo, get
from unifuse.finetune.dpo import DiffusionDPO, DiffusionIPO, dpo_loss, implicit_margin, ipo_loss, pair_losses
from unifuse.nets.mlp import MLP
from unifuse.objectives.losses import DDPMLoss, DenoisingLoss, HybridLoss
from unifuse.testing.oracle import LearnableGaussian

F64 = torch.float64
BETA = 37.0


def _mlp_pair(path="ddpm-linear", prediction="eps"):
    """(policy, frozen reference copy) of a tiny class-conditional MLP in float64, weights perturbed off zero."""
    net = MLP(dim=3, width=16, depth=1, emb_dim=8, num_classes=3).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref_net = copy.deepcopy(net).requires_grad_(False)
    return net, DiffusionModel(net, P.get(path), prediction), DiffusionModel(ref_net, P.get(path), prediction)


def _pair_inputs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_w, x_l, noise = (torch.randn(n, 3, generator=g, dtype=F64) for _ in range(3))
    t = torch.randint(0, 1000, (n,), generator=g).to(F64)
    return x_w, x_l, noise, t, {"class_labels": torch.randint(0, 3, (n,), generator=g)}


def _grad(net, loss):
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def _losses(policy, reference, objective, x_w, x_l, noise, t, cond):
    l_w, l_l = (dpo.denoising_losses(policy, objective, x, noise, t, cond) for x in (x_w, x_l))
    with torch.no_grad():
        r_w, r_l = (dpo.denoising_losses(reference, objective, x, noise, t, cond) for x in (x_w, x_l))
    return l_w, l_l, r_w, r_l


# (1) DPO at theta = ref: log 2 and 0.25 beta grad(L_w - L_l) -----------------------------------------------------
@pytest.mark.parametrize("objective", [DDPMLoss(), DenoisingLoss(target="v", weighting="min_snr")])
def test_dpo_at_reference_is_log2_with_quarter_beta_gradient(objective):
    net, policy, reference = _mlp_pair()
    x_w, x_l, noise, t, cond = _pair_inputs()
    l_w, l_l, r_w, r_l = _losses(policy, reference, objective, x_w, x_l, noise, t, cond)
    loss = dpo_loss(l_w, l_l, r_w, r_l, BETA)
    assert torch.equal(implicit_margin(l_w, l_l, r_w, r_l), torch.zeros(6, dtype=F64))
    torch.testing.assert_close(loss, torch.full((6,), math.log(2), dtype=F64), rtol=0, atol=1e-15)
    got = _grad(net, loss.mean())
    expected = 0.25 * BETA * _grad(net, (l_w - l_l).mean())
    assert expected.abs().max() > 1e-3  # the identity is not 0 = 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_pair_losses_share_time_and_noise_between_winner_and_loser():
    _, policy, reference = _mlp_pair()
    x, _, _, _, cond = _pair_inputs()
    l_w, l_l, r_w, r_l = pair_losses(policy, reference, DDPMLoss(), x, x.clone(), cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(l_w, l_l, rtol=0, atol=0)  # same image, same t and noise: the same loss
    torch.testing.assert_close((r_w, r_l), (l_w, l_w), rtol=0, atol=0)  # policy = reference: the same loss
    assert not r_w.requires_grad and l_w.requires_grad
    assert l_w.std() > 0  # t and noise differ across pairs


def test_denoising_objective_falls_back_to_eps_mse_with_uniform_time():
    assert dpo.denoising_objective(DDPMLoss()) == DDPMLoss()
    for other in (None, HybridLoss()):
        assert dpo.denoising_objective(other) == DenoisingLoss(target="eps", weighting="uniform", time="uniform")


# (2) diffusers' beta' = beta / 2 and Salesforce's -0.5 beta give the same loss and gradient -----------------------
def test_dpo_conventions_agree_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    l_w, l_l = (torch.rand(8, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    r_w, r_l = torch.rand(8, generator=g, dtype=F64), torch.rand(8, generator=g, dtype=F64)
    model_diff, ref_diff = l_w - l_l, r_w - r_l
    ours = dpo_loss(l_w, l_l, r_w, r_l, BETA)
    diffusers = -torch.nn.functional.logsigmoid(BETA / 2 * (ref_diff - model_diff))
    salesforce = -torch.nn.functional.logsigmoid(-0.5 * BETA * (model_diff - ref_diff))
    torch.testing.assert_close(ours, diffusers, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours, salesforce, rtol=1e-14, atol=0)
    a, b = torch.autograd.grad(ours.sum(), (l_w, l_l), retain_graph=True)
    c, d = torch.autograd.grad(diffusers.sum(), (l_w, l_l))
    torch.testing.assert_close((a, b), (c, d), rtol=1e-14, atol=0)
    # diffusers' IPO (logits - 1/(2 beta'))^2 with logits = ref_diff - model_diff = 2u is 4x ours
    torch.testing.assert_close((ref_diff - model_diff - 1 / BETA) ** 2, 4 * ipo_loss(l_w, l_l, r_w, r_l, BETA))


# (3) IPO: (u - 1/(2 beta))^2; at theta = ref 1/(4 beta^2) with gradient grad(L_w - L_l) / (2 beta) -----------------
def test_ipo_closed_form_at_reference_and_minimiser():
    net, policy, reference = _mlp_pair(path="rf", prediction="velocity")
    obj = DenoisingLoss(target="velocity", time="logit_normal")
    x_w, x_l, noise, _, cond = _pair_inputs()
    t = torch.rand(6, dtype=F64, generator=torch.Generator().manual_seed(2))
    l_w, l_l, r_w, r_l = _losses(policy, reference, obj, x_w, x_l, noise, t, cond)
    loss = ipo_loss(l_w, l_l, r_w, r_l, BETA)
    torch.testing.assert_close(loss, torch.full((6,), 1 / (4 * BETA**2), dtype=F64), rtol=1e-15, atol=0)
    got, expected = _grad(net, loss.mean()), _grad(net, (l_w - l_l).mean()) / (2 * BETA)
    assert expected.abs().max() > 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-16)
    # the minimiser: u = 1/(2 beta) gives loss 0 and zero slope in u
    u = torch.tensor(1 / (2 * BETA), dtype=F64, requires_grad=True)
    value = ipo_loss(-2 * u, torch.zeros((), dtype=F64), torch.zeros((), dtype=F64), torch.zeros((), dtype=F64), BETA)
    assert float(value.detach()) == 0.0 and float(torch.autograd.grad(value, u)[0]) == 0.0


# (4) a Gaussian base moves toward the preferred side ------------------------------------------------------------
def _gaussian_context(batch=64, lr=0.05, seed=0):
    path = P.get("ddpm-linear")
    base = LearnableGaussian(path, [0.0], [1.0])
    ref = copy.deepcopy(base).requires_grad_(False)
    reward = lambda x, cond=None: x.reshape(x.shape[0], -1)[:, 0].double()  # prefers larger x
    return base, Context(policy=base.model(), policy_net=base, reference=ref.model(), reward=reward,
                         info={"shape": [1], "num_classes": 0}, device=torch.device("cpu"),
                         optimizer=torch.optim.Adam(base.parameters(), lr), batch=batch, objective=DDPMLoss(),
                         seed=seed)


def _mean_reward(ctx, model, n=2000):
    ctx.images = 10**6  # the same evaluation seeds for every model
    return float(ctx.reward(ctx.generate(n, model=model)).mean())


@pytest.mark.parametrize("name, options", [("dpo", {}), ("ipo", {}), ("dpo", {"online": True}),
                                           ("dpo", {"pool": 128, "candidates": 3})])
def test_dpo_moves_gaussian_toward_preferred_side(name, options):
    base, ctx = _gaussian_context()
    method = get(name, pairs_per_step=32, **options)
    method.setup(ctx)
    before = _mean_reward(ctx, ctx.reference)
    first = None
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        out = method.step(ctx, gen, step)
        first = first or out
    assert math.isclose(first["loss"], math.log(2) if name == "dpo" else 1 / (4 * method.beta**2), rel_tol=1e-6)
    assert first["reward_margin"] > 0 and out["kl"] is None
    after = _mean_reward(ctx, ctx.policy)
    assert float(base.mean.detach()) > 0.15 and after > before + 0.15, (float(base.mean.detach()), before, after)
    assert out["implicit_acc"] > 0.9


def test_ipo_stops_at_its_closed_form_fixed_point():
    """Only the Gaussian's mean trains: u = delta * g exactly (the m^2 part of L cancels in L_w - L_l), so IPO's
    population optimum is delta* = c E[g] / E[g^2] with c = 1/(2 beta), E over the pool's pairs, t and noise."""
    base, ctx = _gaussian_context()
    base.log_std.requires_grad_(False)
    ctx.optimizer = torch.optim.SGD([base.mean], lr=2.0)
    method = DiffusionIPO(beta=5.0, pool=1024, pairs_per_step=256)
    method.setup(ctx)
    pool = ctx.states["dpo_pairs"]
    shifted = LearnableGaussian(P.get("ddpm-linear"), [1.0], [1.0]).model()  # delta = 1: u = g
    x_w, x_l = pool.x_w.double().repeat(100, 1), pool.x_l.double().repeat(100, 1)
    g = implicit_margin(*pair_losses(shifted, ctx.reference, DDPMLoss(), x_w, x_l, {},
                                     torch.Generator().manual_seed(9))).detach()
    expected = 1 / (2 * method.beta) * float(g.mean() / (g * g).mean())
    gen, path = torch.Generator().manual_seed(1), []
    for step in range(200):
        method.step(ctx, gen, step)
        path.append(float(base.mean.detach()))
    assert 0.2 < expected < 0.6 and bool((g > 0).all())  # every pair ranked the same way: DPO would never stop
    assert abs(np.mean(path[100:]) - expected) < 0.03, (np.mean(path[100:]), expected)


def test_pool_is_registered_and_restores_exactly():
    _, ctx = _gaussian_context(seed=0)
    method = DiffusionDPO(pool=16, pairs_per_step=8)
    method.setup(ctx)
    state = {k: v.clone() for k, v in ctx.states["dpo_pairs"].state_dict().items()}
    _, ctx2 = _gaussian_context(seed=5)
    resumed = DiffusionDPO(pool=16, pairs_per_step=8)
    resumed.setup(ctx2)
    assert not torch.equal(ctx2.states["dpo_pairs"].x_w, state["x_w"])
    ctx2.states["dpo_pairs"].load_state_dict(state)
    a = method.step(ctx, torch.Generator().manual_seed(4), 0)
    b = resumed.step(ctx2, torch.Generator().manual_seed(4), 0)
    assert a == b
    assert bool((state["r_w"] >= state["r_l"]).all()) and bool((state["x_w"] >= state["x_l"]).all())


def test_bad_options_are_refused():
    with pytest.raises(UnifuseError, match="beta must be > 0"):
        DiffusionIPO(beta=0)
    with pytest.raises(UnifuseError, match="candidates must be >= 2"):
        DiffusionDPO(candidates=1)
    with pytest.raises(UnifuseError, match="online=True"):
        DiffusionDPO(online=True, pool=10)


# (5) folder pairs -------------------------------------------------------------------------------------------------
def _png(path, value, size=(6, 6), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


def test_folder_pairs_load_and_train(tmp_path):
    _png(tmp_path / "preferred" / "a.png", 255)
    _png(tmp_path / "rejected" / "a.png", 0, mode="RGB")
    _png(tmp_path / "preferred" / "b.png", 0, size=(9, 7))
    _png(tmp_path / "rejected" / "b.jpg", 255)
    pairs = dpo.folder_pairs(str(tmp_path), {"shape": [1, 4, 4], "num_classes": 0})
    assert pairs.x_w.shape == (2, 1, 4, 4) and pairs.cond == {}
    torch.testing.assert_close(pairs.x_w[:, :, 0, 0], torch.tensor([[1.0], [-1.0]]))  # a then b, in [-1, 1]
    torch.testing.assert_close(pairs.x_l[:, :, 0, 0], torch.tensor([[-1.0], [1.0]]))
    padded = dpo.folder_pairs(str(tmp_path), {"shape": [1, 6, 6], "num_classes": 0, "pad": 1})
    assert float(padded.x_w[0, 0, 0, 0]) == -1.0 and float(padded.x_w[0, 0, 1, 1]) == 1.0  # MNIST-style padding
    # one DPO round on the folder at theta = ref: log 2, with the reward of the folder's images
    base = LearnableGaussian(P.get("ddpm-linear"), 0.0, 1.0)
    ctx = Context(policy=base.model(), policy_net=base, reference=copy.deepcopy(base).model(),
                  reward=lambda x, cond=None: x.reshape(x.shape[0], -1).mean(1), info={"shape": [1, 4, 4]},
                  device=torch.device("cpu"), optimizer=torch.optim.SGD(base.parameters(), 0.1), batch=4)
    method = DiffusionDPO(pairs=str(tmp_path))
    method.setup(ctx)
    out = method.step(ctx, torch.Generator().manual_seed(0), 0)
    assert math.isclose(out["loss"], math.log(2), rel_tol=1e-6) and "reward_margin" not in out
    assert out["reward"] == pytest.approx(0.0, abs=1e-6)  # the pairs drawn hold one +1 and one -1 image each


def test_folder_pairs_classes_from_subfolders(tmp_path):
    for name, cls in (("a", "2"), ("b", "seven")):
        _png(tmp_path / "preferred" / cls / f"{name}.png", 200)
        _png(tmp_path / "rejected" / cls / f"{name}.png", 20)
    info = {"shape": [3, 4, 4], "num_classes": 8, "class_names": ["zero", "one", "two", "3", "4", "5", "6", "seven"]}
    pairs = dpo.folder_pairs(str(tmp_path), info, "class")
    assert pairs.x_w.shape == (2, 3, 4, 4)
    assert pairs.cond["class_labels"].tolist() == [2, 7]  # sorted by name: 2/a, seven/b


def test_folder_pairs_errors(tmp_path):
    info = {"shape": [1, 4, 4], "num_classes": 0}
    with pytest.raises(UnifuseError, match="lacks .*rejected"):
        (tmp_path / "preferred").mkdir()
        dpo.folder_pairs(str(tmp_path), info)
    (tmp_path / "rejected").mkdir()
    with pytest.raises(UnifuseError, match="no preference pairs"):
        dpo.folder_pairs(str(tmp_path), info)
    _png(tmp_path / "preferred" / "a.png", 255)
    with pytest.raises(UnifuseError, match="1 image.*no partner.*: a;"):
        dpo.folder_pairs(str(tmp_path), info)
    _png(tmp_path / "rejected" / "a.png", 0)
    with pytest.raises(UnifuseError, match="no captions"):
        dpo.folder_pairs(str(tmp_path), info, "text")
    with pytest.raises(UnifuseError, match="needs a class sub-folder"):
        dpo.folder_pairs(str(tmp_path), {**info, "num_classes": 3}, "class")
    with pytest.raises(UnifuseError, match="1 or 3 channels"):
        dpo.folder_pairs(str(tmp_path), {"shape": [2], "num_classes": 0})
    (tmp_path / "rejected" / "a.png").write_bytes(b"not a png")
    with pytest.raises(UnifuseError, match="cannot read preference image"):
        dpo.folder_pairs(str(tmp_path), info)

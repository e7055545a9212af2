"""Progressive distillation (card 15) against the exact oracle: the x-target makes one student DDIM step land on two
teacher DDIM steps, the last interval's target is the teacher's x-hat, rounds follow the budget, the student's
grid is uf.sample's DDIM grid, and a tiny MLP distilled from the oracle moves toward the data."""
import pytest
import torch

import unifuse as uf
from unifuse.distill import Context, frozen_copy
from unifuse.distill.progressive import ProgressiveDistillation, ddim_grid, midpoints
from unifuse.errors import UnifuseError
from unifuse.nets.mlp import MLP
from unifuse.samplers import step_ddim
from unifuse.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture([0.4, 0.6], [[0.8, -0.4], [-0.6, 0.5]], [[0.3, 0.2], [0.25, 0.4]])
CASES = [("edm", "edm", ""), ("vp-cosine", "v", "uniform"), ("rf", "velocity", "uniform"), ("rf", "x0", "karras"),
         ("trigflow", "v", "logsnr")]  # the oracle's own "trigflow" output is NaN at alpha = 0 (its se = sigma/0)


def ddim(model, x, s, t):
    return step_ddim(model, x, s, t, eta=0.0).mean


def data(n=64, seed=0):
    return GM.sample(n, torch.Generator().manual_seed(seed))[0]


def context(teacher, student, net, tmp_path="/tmp"):
    return Context(teacher=teacher, student=student, student_net=net, ema=None, info={"shape": [2], "is_image": False},
                   device=torch.device("cpu"), run_dir=str(tmp_path))


def intervals(method, model, steps, t):
    """(t', t'') of each sample's interval, found from its t on the grid."""
    grid, mids = method.grids(model, steps)
    i = torch.searchsorted(-grid, -t)
    assert torch.equal(grid[i], t)
    return mids[i], grid[i + 1]


@pytest.mark.parametrize("path_name,kind,spacing", CASES)
def test_one_student_step_with_x_tilde_lands_on_two_teacher_steps(path_name, kind, spacing):
    path = uf.paths.get(path_name)
    teacher = GM.model(path, kind)
    method = ProgressiveDistillation(start_steps=8, spacing=spacing)
    x = data()
    for steps in method.nfe:
        z_t, t, x_tilde = method.target(teacher, teacher, x, steps, {}, torch.Generator().manual_seed(steps))
        t1, t2 = intervals(method, teacher, steps, t)
        assert bool(((t2 < t1) | (t1 == t)).all()) and bool((t1 <= t).all())
        z2 = ddim(teacher, ddim(teacher, z_t, t, t1), t1, t2)
        as_x0 = uf.DiffusionModel(lambda x_in, tt: x_tilde, path, "x0")
        one = ddim(as_x0, z_t, t, t2)
        torch.testing.assert_close(one, z2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path_name,kind,spacing", CASES)
def test_last_interval_target_is_the_teachers_x_hat(path_name, kind, spacing):
    path = uf.paths.get(path_name)
    teacher = GM.model(path, kind)
    method = ProgressiveDistillation(start_steps=4, spacing=spacing)
    x = data()
    z_t, t, x_tilde = method.target(teacher, teacher, x, 1, {}, torch.Generator().manual_seed(0))  # the last round
    t1, t2 = intervals(method, teacher, 1, t)
    assert bool((path.sigma(t2) == 0).all())
    x_hat = teacher.denoise(ddim(teacher, z_t, t, t1), t1)
    torch.testing.assert_close(x_tilde, x_hat, rtol=0, atol=1e-12)


def test_nested_grids_give_the_papers_midpoint():
    """Uniform spacing on rf: the 2N-step grid interleaves the N-step one, t' = t - 0.5/N (the teacher's grid)."""
    model = GM.model(uf.paths.get("rf"), "velocity")
    method = ProgressiveDistillation(start_steps=8)
    for steps in method.nfe:
        grid, mids = method.grids(model, steps)
        torch.testing.assert_close(grid, torch.linspace(1, 0, steps + 1, dtype=F64), rtol=0, atol=1e-15)
        torch.testing.assert_close(mids, grid[:-1] - 0.5 / steps, rtol=0, atol=1e-15)
    edm = GM.model(uf.paths.get("edm"), "edm")  # karras: not nested, t' = the log-SNR midpoint; one step at the end
    grid = ddim_grid(edm, 4, "karras")
    mids = midpoints(edm.path, grid, ddim_grid(edm, 8, "karras"))
    lam = edm.path.log_snr(torch.cat([grid[:-2], mids[:-1]]))
    torch.testing.assert_close(lam[3:], 0.5 * (lam[:3] + edm.path.log_snr(grid[1:-1])), rtol=1e-12, atol=1e-12)
    assert float(mids[-1]) == float(grid[-2])


@pytest.mark.parametrize("path_name,kind", [("edm", "edm"), ("vp-cosine", "v"), ("rf", "velocity"), ("vp-cosine", "eps")])
@pytest.mark.parametrize("spacing", ["", "uniform", "logsnr"])
def test_grid_is_uf_sample_ddim_grid(path_name, kind, spacing):
    model = GM.model(uf.paths.get(path_name), kind)
    if kind == "eps" and spacing == "uniform":  # starts at alpha = 0: uf.sample fails there, setup refuses
        net = MLP(dim=2, width=8, depth=1).double()
        with pytest.raises(UnifuseError, match="zero SNR"):
            ProgressiveDistillation().setup(context(model, uf.DiffusionModel(net, model.path, "eps"), net))
        return
    noise = torch.randn(8, 2, dtype=F64)
    for steps in ProgressiveDistillation(start_steps=16).nfe:
        _, info = uf.sample(model, noise, "ddim", nfe=steps, spacing=spacing or None, return_info=True)
        assert ddim_grid(model, steps, spacing).tolist() == info["grid"]


def test_round_schedule_snapshots_and_resume(tmp_path):
    method = ProgressiveDistillation(start_steps=16)
    assert method.nfe == (16, 8, 4, 2, 1) and method.rounds == 5
    assert [method.round_at(p) for p in (0.0, 0.199, 0.2, 0.5, 0.799, 0.8, 0.999, 1.0)] == [0, 0, 1, 2, 3, 4, 4, 4]
    with pytest.raises(UnifuseError):
        ProgressiveDistillation(start_steps=12)
    with pytest.raises(UnifuseError):
        ProgressiveDistillation(spacing="cosine")

    path = uf.paths.get("rf")
    net = MLP(dim=2, width=16, depth=1).double()
    ctx = context(GM.model(path, "velocity"), uf.DiffusionModel(net, path, "x0"), net, tmp_path)
    method = ProgressiveDistillation(start_steps=4)  # rounds 4, 2, 1
    method.setup(ctx)
    assert method.teacher(ctx) is ctx.teacher and set(method.snapshots(ctx)) == {4}
    x, g = data(), torch.Generator().manual_seed(0)
    method.loss(ctx, x, {}, generator=g)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    after_round0 = {k: v.clone() for k, v in net.state_dict().items()}
    ctx.progress = 0.5  # round 1: the round-0 student is snapshotted and becomes the teacher
    method.loss(ctx, x, {}, generator=g)
    assert method._round.index == 1 and ctx.scalars["round"] == 1
    for name in ("nfe_4", "round_teacher"):
        assert all(torch.equal(ctx.nets[name].state_dict()[k], v) for k, v in after_round0.items())
    teacher = method.teacher(ctx)
    assert teacher.net is ctx.nets["round_teacher"] and teacher.prediction == "x0"
    snaps = method.snapshots(ctx)
    assert set(snaps) == {4, 2} and snaps[2] is net and snaps[4] is ctx.nets["nfe_4"]

    # an exact resume: a fresh method and context restore the registered nets and the round index
    net2 = MLP(dim=2, width=16, depth=1).double()
    ctx2 = context(ctx.teacher, uf.DiffusionModel(net2, path, "x0"), net2, tmp_path)
    resumed = ProgressiveDistillation(start_steps=4)
    resumed.setup(ctx2)
    assert set(ctx2.nets) == set(ctx.nets) and set(ctx2.states) == {"progressive"}
    for name, module in ctx.nets.items():
        ctx2.nets[name].load_state_dict(module.state_dict())
    ctx2.states["progressive"].load_state_dict(ctx.states["progressive"].state_dict())
    ctx2.progress = 0.5
    z = torch.randn(5, 2, dtype=F64)
    t = torch.full((5,), 0.5, dtype=F64)
    torch.testing.assert_close(resumed.teacher(ctx2).denoise(z, t), method.teacher(ctx).denoise(z, t), rtol=0, atol=0)


def test_truncated_snr_weight():
    """loss = max(SNR, 1) * x-MSE: the x-loss below SNR 1, the eps-loss above (the paper's max of the two)."""
    path = uf.paths.get("vp-cosine")
    teacher = GM.model(path, "x0")
    net = MLP(dim=2, width=16, depth=1).double()
    student = uf.DiffusionModel(net, path, "x0")
    method = ProgressiveDistillation(start_steps=4)
    ctx = context(teacher, student, net)
    method.setup(ctx)
    x = data(256)
    loss = method.loss(ctx, x, {}, generator=torch.Generator().manual_seed(3))
    z_t, t, x_tilde = method.target(teacher, student, x, 4, {}, torch.Generator().manual_seed(3))
    x_loss = (student.denoise(z_t, t) - x_tilde).pow(2).mean(1)
    eps_loss = x_loss * torch.exp(path.log_snr(t))  # eps-MSE = SNR x-MSE
    torch.testing.assert_close(loss, torch.maximum(x_loss, eps_loss), rtol=1e-12, atol=0)


def test_end_to_end_tiny_mlp_moves_toward_the_data():
    """Two rounds (2 steps, then 1) from the exact rf velocity teacher: the 1-step student's samples approach the
    Gaussian data (W2 between moment-matched Gaussians); the loss is finite and reaches the student."""
    torch.manual_seed(0)
    gm = GaussianMixture.gaussian([1.0, -0.5], [0.5, 0.3])
    path = uf.paths.get("rf")
    net = MLP(dim=2, width=64, depth=2)
    ctx = context(gm.model(path, "velocity"), uf.DiffusionModel(net, path, "x0"), net)
    method = ProgressiveDistillation(start_steps=2)
    method.setup(ctx)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def w2():
        y = uf.sample(ctx.student, noise, "ddim", nfe=1, spacing=method.spacing)
        return float(((y.mean(0) - gm.means[0]) ** 2 + (y.std(0) - gm.stds[0]) ** 2).sum().sqrt())

    before, steps = w2(), 150
    for k in range(steps):
        ctx.progress = k / steps
        loss = method.loss(ctx, gm.sample(128, g)[0].float(), {}, generator=g, step=k)
        assert loss.shape == (128,) and bool(torch.isfinite(loss).all())
        opt.zero_grad()
        loss.mean().backward()
        if k == 0:
            assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0
        opt.step()
    after = w2()
    assert method._round.index == 1 and set(method.snapshots(ctx)) == {2, 1}
    print(f"W2 before {before:.4f} after {after:.4f}")
    assert after < 0.4 * before, (before, after)  # measured 1.261 -> 0.381


def test_frozen_copy_is_detached():
    net = MLP(dim=2, width=8, depth=1)
    copy = frozen_copy(net)
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training

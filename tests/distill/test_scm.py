"""sCD and sCT (card 18) as distillation methods: their interface, the weight head they register and step, the
data-parallel rule, and short end-to-end runs on 2-D Gaussian data with the exact teacher."""
import math

import pytest
import torch
from torch import nn

import unifuse as uf
from unifuse.distill import Context, get
from unifuse.distill.scm import SCD, SCT
from unifuse.errors import UnifuseError
from unifuse.metrics.toy import sliced_wasserstein
from unifuse.model import DiffusionModel
from unifuse.nets.mlp import MLP
from unifuse.objectives.scm import bare_model
from unifuse.testing import GaussianMixture

F64 = torch.float64
SD = 0.5
PATH = uf.paths.get("trigflow", sigma_d=SD)
GM = GaussianMixture([1.0], [[1.0, -0.5]], [[0.5, 1.0]])
T_TOP = math.atan(80 / SD)  # card 18's one-step time for sigma_max = 80


def student(seed=0, width=64):
    torch.manual_seed(seed)
    net = MLP(dim=2, width=width, depth=2, emb_dim=32)
    return DiffusionModel(net, PATH, "trigflow", sigma_data=SD, time_input=PATH.c_noise), net


def context(tmp_path, model, net, teacher=None):
    return Context(teacher=teacher if teacher is not None else GM.model(PATH, "x0"), student=model, student_net=net,
                   ema=None, info={"shape": [2], "is_image": False}, device=torch.device("cpu"), run_dir=str(tmp_path))


def test_interface_and_grid():
    for name, cls in (("sct", SCT), ("scd", SCD)):
        m = get(name)
        assert isinstance(m, cls) and m.name == name and m.student_path == "trigflow"
        assert m.student_prediction is None and m.sampler == "consistency" and m.nfe is None and m.spacing == "renoise"
    assert (SCD().P_mean, SCD().P_std, SCT().P_mean, SCT().P_std) == (-0.8, 1.6, -1.0, 1.4)
    assert SCD.distilled and not SCT.distilled
    assert SCT().sample_times(2, SD).tolist() == [T_TOP, 1.1, 0.0] and abs(T_TOP - 1.5645) < 1e-4
    assert SCT().sample_times(1, SD).tolist() == [T_TOP, 0.0]
    assert torch.allclose(SCT().sample_times(3, SD), torch.tensor([T_TOP, 1.1, 0.55, 0.0], dtype=F64))
    assert SCT().sample_times(1, 1.0, 1e9)[0] == math.pi / 2 - 1e-4
    for bad in (dict(student_path="edm"), dict(t_mid=2.0), dict(norm="max"), dict(jvp="magic"), dict(head_lr=0)):
        with pytest.raises(UnifuseError):
            get("sct", **bad)


def test_setup_registers_head_and_checks_sigma_d(tmp_path):
    model, net = student()
    ctx = context(tmp_path, model, net)
    m = SCD()
    m.setup(ctx)
    assert ctx.nets["weight_head"] is m.objective.head and "weight_head" in ctx.optimizers
    no_head = SCT(adaptive=False)
    no_head.setup(ctx2 := context(tmp_path, model, net))
    assert not ctx2.nets and not ctx2.optimizers
    wrong = DiffusionModel(net, PATH, "trigflow", sigma_data=1.0)
    with pytest.raises(UnifuseError, match="sigma_d"):
        SCT().setup(context(tmp_path, wrong, net))


@pytest.mark.parametrize("cls", [SCD, SCT])
def test_loss_backpropagates_and_steps_the_head(tmp_path, cls):
    model, net = student()
    ctx = context(tmp_path, model, net)
    m = cls(warmup=10)
    m.setup(ctx)
    head0 = [p.detach().clone() for p in m.objective.head.parameters()]
    x = GM.sample(64, generator=torch.Generator().manual_seed(0))[0].float()
    out = m.loss(ctx, x, {}, generator=torch.Generator().manual_seed(1), step=3)
    assert out.shape == (64,) and bool(torch.isfinite(out).all())
    out.mean().backward()
    assert float(net.out.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in m.objective.head.parameters())  # the head stepped inside, detached here
    assert any(not torch.equal(a, b) for a, b in zip(head0, m.objective.head.parameters()))


def test_tangent_runs_on_the_unwrapped_network(tmp_path):
    model, net = student()
    wrapped = DiffusionModel(nn.DataParallel(net), PATH, "trigflow", sigma_data=SD, time_input=PATH.c_noise)
    assert bare_model(wrapped).net is net and bare_model(model) is model
    x = GM.sample(16, generator=torch.Generator().manual_seed(0))[0].float()
    out = []
    for m in (model, wrapped):
        method, ctx = SCD(), context(tmp_path, m, net)
        method.setup(ctx)  # a fresh zero-output head each time: the same weights exp(-u) = 1
        out.append(method.loss(ctx, x, {}, generator=torch.Generator().manual_seed(1), step=5))
    a, b = out
    assert torch.equal(a, b)


class TeacherPlusMLP(nn.Module):
    """The exact teacher's TrigFlow F plus a trainable MLP that starts at zero: a student that starts as the teacher
    (as sCD / sCT start from the teacher's weights), cheap enough to fine-tune in a test."""

    def __init__(self, width=64):
        super().__init__()
        self.teacher = GM.model(PATH, "trigflow").net
        self.mlp = MLP(dim=2, width=width, depth=2, emb_dim=32)

    def forward(self, x_in, t):
        return self.teacher(x_in, t).to(x_in.dtype) + self.mlp(x_in, PATH.c_noise(t))


def one_step_samples(model, n=2000, seed=7):
    z = SD * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.denoise(z, torch.full((n,), T_TOP, dtype=F64)).double()


def train(cls, tmp_path, steps, **options):
    torch.manual_seed(0)
    net = TeacherPlusMLP()
    model = DiffusionModel(net, PATH, "trigflow", sigma_data=SD)
    ctx = context(tmp_path, model, net)
    m = cls(**options)
    m.setup(ctx)
    opt = torch.optim.Adam(net.mlp.parameters(), lr=5e-4)
    gen, data = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    before = one_step_samples(model)
    for step in range(steps):
        x = GM.sample(128, generator=data)[0].float()
        m.loss(ctx, x, {}, generator=gen, step=step).mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, m, before


@pytest.mark.parametrize("cls", [SCD, SCT])
def test_few_hundred_steps_approach_the_data(tmp_path, cls):
    """From the teacher (one step: the data mean), a few hundred sCD / sCT steps spread the one-step samples."""
    ref = GM.sample(2000, generator=torch.Generator().manual_seed(9))[0]
    model, m, start = train(cls, tmp_path, 200, warmup=100, jvp="fd")  # fd: 3 forwards beat CPU forward-mode AD
    before, after = sliced_wasserstein(start, ref), sliced_wasserstein(one_step_samples(model), ref)
    two = uf.sample(model, SD * torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)), "consistency",
                    spacing=m.sample_times(2, SD))
    after2 = sliced_wasserstein(two.double(), ref)
    print(f"{cls.name} sliced W: teacher one step {before:.4f}, 1 step {after:.4f}, 2 steps {after2:.4f}")
    assert after < 0.6 * before and after2 < before


def test_freeze_time_keeps_the_teacher_time_embedding(tmp_path):
    """freeze_time (the default): the MLP that reads sinusoidal(c_noise) keeps the teacher's weights under AdamW on
    all parameters (zero gradients, zero moments, a zero step), so the student's time features e(t) stay the
    teacher's; every other weight trains. freeze_time=False trains them too."""
    for freeze in (True, False):
        model, net = student()
        ctx = context(tmp_path, model, net)
        m = SCD(freeze_time=freeze, jvp="fd")
        m.setup(ctx)
        time0 = [p.detach().clone() for p in net.embed.time.parameters()]
        rest0 = [p.detach().clone() for n, p in net.named_parameters() if not n.startswith("embed.time")]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
        for step in range(3):
            x = GM.sample(32, generator=torch.Generator().manual_seed(step))[0].float()
            m.loss(ctx, x, {}, generator=torch.Generator().manual_seed(10 + step), step=1000).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        kept = all(torch.equal(a, b) for a, b in zip(time0, net.embed.time.parameters()))
        rest = [p for n, p in net.named_parameters() if not n.startswith("embed.time")]
        assert kept == freeze and all(not torch.equal(a, b) for a, b in zip(rest0, rest) if a.numel() > 1)

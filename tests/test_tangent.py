"""Forward-mode tangents: autodiff and central differences agree with each other and with closed forms; the
fallback warns once; the data-parallel rule (tangent on the unwrapped module, online forward through DDP)
gives every rank the single-process gradient of the mean loss."""
import os
import warnings

import pytest
import torch
from torch import nn

from unifuse.errors import UnifuseError
from unifuse.nets import MLP, DiT
from unifuse.tangent import default_h, jvp, reset_fallback, unwrap

F64 = torch.float64


def _randomize(net: nn.Module, scale: float = 0.3) -> nn.Module:
    """Zero-initialised output layers make the tangent trivially zero: give every parameter a random value."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def test_closed_form_float64_to_1e8():
    def fn(x, t):
        return torch.sin(x) * torch.exp(-t)[:, None] + x ** 3 * t[:, None]

    x, v = torch.randn(8, 5, dtype=F64), torch.randn(8, 5, dtype=F64)
    t, w = torch.rand(8, dtype=F64), torch.randn(8, dtype=F64)
    et = torch.exp(-t)[:, None]
    exact = (torch.cos(x) * et + 3 * x ** 2 * t[:, None]) * v + (-torch.sin(x) * et + x ** 3) * w[:, None]
    for method in ("autodiff", "fd", "auto"):
        out, tan = jvp(fn, (x, t), (v, w), method=method)
        assert torch.equal(out, fn(x, t))
        assert (tan - exact).abs().max() < 1e-8, method
        assert not tan.requires_grad and tan.dtype == F64


def test_mlp_autodiff_equals_fd_float64_and_float32():
    net = _randomize(MLP(dim=3, width=32, depth=2, emb_dim=16)).double()
    x, v = torch.randn(16, 3, dtype=F64), torch.randn(16, 3, dtype=F64)
    t, w = torch.rand(16, dtype=F64), torch.rand(16, dtype=F64)
    _, a = jvp(net, (x, t), (v, w), method="autodiff")
    _, b = jvp(net, (x, t), (v, w), method="fd")
    assert (a - b).abs().max() < 1e-8 * max(1.0, float(a.abs().max()))
    net32 = net.float()
    _, a32 = jvp(net32, (x.float(), t.float()), (v.float(), w.float()), method="autodiff")
    _, b32 = jvp(net32, (x.float(), t.float()), (v.float(), w.float()), method="fd")
    assert b32.dtype == torch.float32 and default_h(torch.float32) == pytest.approx(1.04e-4, rel=1e-2)
    assert (a32 - b32).abs().max() < 3e-3 * max(1.0, float(a32.abs().max()))  # float32 rounding / h = 1e-4
    assert (a32.double() - a).abs().max() < 1e-4 * max(1.0, float(a.abs().max()))


def test_dit_with_attention_autodiff_equals_fd():
    net = _randomize(DiT(in_channels=1, resolution=4, patch=2, width=16, depth=1, heads=2), 0.1).double()
    x, v = torch.randn(3, 1, 4, 4, dtype=F64), torch.randn(3, 1, 4, 4, dtype=F64)
    t, w = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64)
    _, a = jvp(net, (x, t), (v, w), method="autodiff")
    _, b = jvp(net, (x, t), (v, w), method="fd")
    assert float(a.abs().max()) > 1e-3
    assert (a - b).abs().max() < 1e-7 * max(1.0, float(a.abs().max()))


def test_fd_uses_one_random_state_like_autodiff():
    net = _randomize(nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 4))).double().train()
    x, v = torch.randn(8, 4, dtype=F64), torch.randn(8, 4, dtype=F64)
    torch.manual_seed(3)
    out_a, a = jvp(net, (x,), (v,), method="autodiff")
    after_a = torch.random.get_rng_state()
    torch.manual_seed(3)
    out_b, b = jvp(net, (x,), (v,), method="fd")
    assert torch.equal(out_a, out_b) and (a - b).abs().max() < 1e-7
    assert torch.equal(torch.random.get_rng_state(), after_a)  # the state advanced as after one call


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.saved_tensors[0] * g


def test_auto_falls_back_once_and_autodiff_names_the_fix():
    x, v = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    reset_fallback()
    try:
        with pytest.raises(UnifuseError, match="distill.options.jvp=fd"):
            jvp(_NoForwardAD.apply, (x,), (v,), method="autodiff")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, first = jvp(_NoForwardAD.apply, (x,), (v,), method="auto")
            _, second = jvp(_NoForwardAD.apply, (x,), (v,), method="auto")
        assert len(caught) == 1 and "finite differences" in str(caught[0].message)
        assert (first - 2 * x * v).abs().max() < 1e-8 and torch.equal(first, second)
    finally:
        reset_fallback()


def test_unwrap():
    net = nn.Linear(2, 2)
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(net)) is net
    assert unwrap(torch.compile(nn.DataParallel(net))) is net


# --- the data-parallel rule -------------------------------------------------------------------------------------
def _net() -> nn.Module:
    torch.manual_seed(11)
    return _randomize(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))).double()


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)


def _loss(online: nn.Module, x, v) -> torch.Tensor:
    """A consistency-like per-sample loss: online forward vs a stop-gradient target built from a tangent."""
    out, tan = jvp(unwrap(online), (x,), (v,), method="autodiff")
    target = out - 0.1 * tan
    return (online(x) - target).pow(2).sum(1)


def _rank(rank: int, world: int, rdv: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        ddp = nn.parallel.DistributedDataParallel(_net())
        x, v = _batch()
        shard = slice(rank * 4, rank * 4 + 4)
        _loss(ddp, x[shard], v[shard]).mean().backward()
        torch.save([p.grad for p in ddp.module.parameters()], os.path.join(out, f"grad{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_rule_gives_single_process_gradient(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    net = _net()
    x, v = _batch()
    _loss(net, x, v).mean().backward()
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in (0, 1)]
    for ref, g0, g1 in zip((p.grad for p in net.parameters()), *grads):
        assert float(ref.abs().max()) > 0
        assert torch.equal(g0, g1)
        assert (g0 - ref).abs().max() < 1e-12


def test_absolute_step_is_the_secant():
    """step = s: (f(p + s v) - f(p - s v)) / 2s, which for f = x^3 + t^2 x is f'(p) v + s^2 f'''[v, v, v] / 6 exactly:
    3 x^2 v + 2 t w x + t^2 v + s^2 (v^3 + w^2 v)."""
    def fn(x, t):
        return x ** 3 + (t ** 2)[:, None] * x

    x, v = torch.randn(6, 3, dtype=F64), torch.randn(6, 3, dtype=F64)
    t, w = torch.rand(6, dtype=F64), torch.randn(6, dtype=F64)
    for s in (0.3, 0.05):
        out, tan = jvp(fn, (x, t), (v, w), method="fd", step=s)
        exact = 3 * x ** 2 * v + 2 * (t * w)[:, None] * x + (t ** 2)[:, None] * v + s ** 2 * (v ** 3 + (w ** 2)[:, None] * v)
        assert torch.equal(out, fn(x, t)) and (tan - exact).abs().max() < 1e-12
    for bad in (dict(method="autodiff", step=0.1), dict(method="fd", step=0.0), dict(method="auto", step=float("nan"))):
        with pytest.raises(UnifuseError, match="absolute step"):
            jvp(fn, (x, t), (v, w), **bad)

"""Two-time networks (two_times=True: net(x, t, r=...)): a two-time net loaded from a one-time net's weights
(strict=False) computes the same function at r = t (and at any r while the end-time layer is zero); r = None is
r = t; the option is in `config`, so checkpoints rebuild it; a one-time net refuses r."""
import pytest
import torch

import unifuse as uf
from unifuse.nets import build_net

SMALL = {
    "mlp": dict(dim=3, width=16, depth=2, emb_dim=16),
    "unet": dict(in_channels=1, resolution=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), heads=2, dropout=0.0),
    "dit": dict(in_channels=1, resolution=8, patch=2, width=32, depth=2, heads=2),
}


def inputs(family, n=4):
    g = torch.Generator().manual_seed(0)
    shape = (n, 3) if family == "mlp" else (n, 1, 8, 8)
    return torch.randn(shape, generator=g), 1000 * torch.rand(n, generator=g), 1000 * torch.rand(n, generator=g)


def perturbed(family, **kw):
    torch.manual_seed(0)
    net = build_net(family, **SMALL[family], **kw)
    with torch.no_grad():  # make the zero-initialised output layers non-zero so the outputs mean something
        for name, p in net.named_parameters():
            if "gap" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("family", ["mlp", "unet", "dit"])
def test_two_time_net_from_one_time_weights_is_the_same_function(family):
    one = perturbed(family)
    two = build_net(family, **SMALL[family], two_times=True).eval()
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("embed.gap.") for k in missing)
    x, t, r = inputs(family)
    with torch.no_grad():
        ref = one(x, t)
        assert float(ref.abs().max()) > 1e-3
        for out in (two(x, t), two(x, t, r=t), two(x, t, r=r)):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        # once the end-time layer is trained, r matters, and r = None is still r = t
        torch.nn.init.normal_(two.embed.gap[-1].weight, std=0.1)
        a, b, c = two(x, t), two(x, t, r=t), two(x, t, r=r)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((c - b).abs().max()) > 1e-4


@pytest.mark.parametrize("family", ["mlp", "unet", "dit"])
def test_config_rebuilds_the_two_time_net(family):
    net = build_net(family, **SMALL[family], two_times=True)
    assert net.config["two_times"] is True and net.two_times
    again = build_net(family, **net.config)
    assert again.two_times and set(again.state_dict()) == set(net.state_dict())
    assert build_net(family, **SMALL[family]).config["two_times"] is False


def test_a_one_time_net_refuses_r():
    net = build_net("mlp", **SMALL["mlp"])
    x, t, r = inputs("mlp")
    with pytest.raises(uf.UnifuseError, match="two_times=True"):
        net(x, t, r=r)


def test_forward_mode_through_t_and_r():
    """torch.func.jvp runs through the end-time embedding (what MeanFlow's target needs)."""
    net = perturbed("mlp", two_times=True).double()
    torch.nn.init.normal_(net.embed.gap[-1].weight, std=0.1)
    x, t, r = (v.double() for v in inputs("mlp"))
    f = lambda tt, rr: net(x, tt, r=rr)
    _, d_t = torch.func.jvp(f, (t, r), (torch.ones_like(t), torch.zeros_like(r)))
    h = 1e-4
    with torch.no_grad():
        fd = (f(t + h, r) - f(t - h, r)) / (2 * h)
    torch.testing.assert_close(d_t, fd, rtol=1e-5, atol=1e-7)

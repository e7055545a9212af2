"""Networks: call signature and shapes for every preset, conditioning semantics, the noise-label embedding's
resolution over the whole label range, spatial bookkeeping, and forward-mode AD through attention."""
import pytest
import torch

from unifuse.errors import UnifuseError
from unifuse.nets import NET_PRESETS, NETS, build_net, num_params
from unifuse.nets.layers import sinusoidal


def randomize(net, scale=0.05):
    """Replace the zero-initialised weights so conditioning paths actually reach the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def example(name, batch=3):
    family, kw = NET_PRESETS[name]
    shape = (kw["dim"],) if family == "mlp" else (kw["in_channels"], kw["resolution"], kw["resolution"])
    x = torch.randn(batch, *shape)
    return x, torch.linspace(-1500, 1100, batch)


@pytest.mark.parametrize("name", sorted(NET_PRESETS))
def test_every_preset_maps_x_to_its_shape(name):
    _, kw = NET_PRESETS[name]
    net = build_net(name).eval()
    x, t = example(name)
    cond = {}
    if kw.get("num_classes"):
        cond["class_labels"] = torch.tensor([0, 1, -1])
    if kw.get("text_dim"):
        cond["text"], cond["text_mask"] = torch.randn(3, 5, kw["text_dim"]), torch.tensor([[1, 1, 0, 0, 0]] * 3).bool()
    out = net(x, t, **cond)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert bool((out == 0).all())  # zero-initialised output layer: an untrained net predicts 0
    assert num_params(net) > 0


@pytest.mark.parametrize("family", sorted(NETS))
def test_learned_variance_doubles_channels_and_trains(family):
    name = {"mlp": "mlp-toy", "unet": "unet-digits", "dit": "dit-digits"}[family]
    net = randomize(build_net(name, learned_variance=True))
    x, t = example(name)
    out = net(x, t)
    assert out.shape == (x.shape[0], 2 * x.shape[1]) + x.shape[2:]
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_sinusoidal_resolves_half_unit_labels_over_the_whole_range():
    # Labels span EDM's 250 log(0.002) = -1554 .. 250 log(80) = 1095. Labels 0.5 apart must map to clearly
    # different features everywhere, and no two distinct grid labels may alias to nearly the same features.
    t = torch.arange(-1560.0, 1100.0, 0.5)
    e = sinusoidal(t, 128)
    step = (e[1:] - e[:-1]).norm(dim=1)
    assert float(step.min()) > 0.4 * float(e[0].norm()) / 8  # >= ~0.4 of one unit-frequency pair's norm
    sub = e[::7]  # all pairs of a 3.5-spaced subgrid (no aliasing far away either)
    d = torch.cdist(sub, sub) + torch.eye(sub.shape[0]) * 1e3
    assert float(d.min()) > 1.0


def test_net_output_separates_labels_half_a_unit_apart():
    net = randomize(build_net("unet-digits")).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    for t0 in (-1500.0, -3.0, 0.0, 700.0, 1095.0):
        out = net(x, torch.tensor([t0, t0 + 0.5]))
        assert float((out[0] - out[1]).detach().norm()) > 1e-3 * float(out[0].detach().norm())


def test_class_conditioning_null_class_and_errors():
    net = randomize(build_net("unet-digits-cond")).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 10.0])
    a = net(x, t, class_labels=torch.tensor([3, 3]))
    b = net(x, t, class_labels=torch.tensor([4, 4]))
    null = net(x, t, class_labels=torch.tensor([-1, -1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    torch.testing.assert_close(net(x, t), null)  # no labels = the null class
    with pytest.raises(UnifuseError, match="class_labels"):
        net(x, t, class_labels=torch.tensor([10, 0]))
    with pytest.raises(UnifuseError, match="num_classes"):
        build_net("unet-digits")(x, t, class_labels=torch.tensor([1, 2]))


@pytest.mark.parametrize("name", ["unet-digits-text", "dit-digits-text", "mlp-toy-text"])
def test_text_tokens_masks_and_pooled_embeddings(name):
    net = randomize(build_net(name)).eval()
    x, t = example(name, batch=2)
    d = NET_PRESETS[name][1]["text_dim"]
    tokens = torch.randn(2, 6, d)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    out = net(x, t, text=tokens, text_mask=mask)
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), d)  # padding tokens must not matter
    torch.testing.assert_close(net(x, t, text=changed, text_mask=mask), out)
    other = tokens.clone()
    other[:, 0] += torch.randn(2, d)
    assert not torch.allclose(net(x, t, text=other, text_mask=mask), out)
    pooled = net(x, t, text=tokens[:, 0])          # 2-D text: the pooled path
    empty = net(x, t, text=tokens, text_mask=torch.zeros(2, 6, dtype=torch.bool))  # the empty caption
    assert pooled.shape == out.shape and bool(torch.isfinite(empty).all())


def test_dit_unpatchify_keeps_each_patch_in_place():
    # At initialisation every adaLN-Zero block is the identity, so output patch (i, j) sees only input patch (i, j).
    net = build_net("dit-digits", depth=2)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x = torch.randn(1, 1, 8, 8)
    base = net(x, torch.tensor([5.0]))
    x2 = x.clone()
    x2[0, 0, 2, 5] += 1.0                                  # inside patch (row 1, col 2) for patch size 2
    diff = (net(x2, torch.tensor([5.0])) - base).abs()[0, 0] > 1e-7
    outside = diff.clone()
    outside[2:4, 4:6] = False
    assert diff[2:4, 4:6].any() and not outside.any()


@torch.no_grad()
def test_unet_channels_last_and_bf16_autocast():
    net = randomize(build_net("unet-mnist")).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3.0, 900.0])
    ref = net(x, t)
    cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert bool(torch.isfinite(low).all())
    assert float((low.float() - ref).abs().max()) < 0.1 * float(ref.abs().max()) + 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own jvp decompositions use torch.jit.script
@pytest.mark.parametrize("name", ["unet-digits-text", "dit-digits-text"])
def test_forward_mode_jvp_through_attention(name):
    # sCM training differentiates the net forward in (x, t): the attention must support torch.func.jvp.
    net = randomize(build_net(name, dropout=0.0)).eval().double()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    text, mask = torch.randn(2, 4, NET_PRESETS[name][1]["text_dim"], dtype=torch.float64), torch.ones(2, 4).bool()
    vx, vt = torch.randn_like(x), torch.ones_like(t)

    def f(x_, t_):
        return net(x_, t_, text=text, text_mask=mask)

    _, tangent = torch.func.jvp(f, (x, t), (vx, vt))
    h = 1e-5
    fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-4, atol=1e-6)


def test_build_net_names_and_overrides():
    assert build_net("unet", channels=16, channel_mult=(1, 2), resolution=8).config["channels"] == 16
    net = build_net("dit-digits", depth=2)
    assert build_net(net.family, **net.config).config == net.config  # rebuild from the stored config
    with pytest.raises(UnifuseError, match="unet-digits"):
        build_net("unet-digitz")
    with pytest.raises(UnifuseError, match="valid keywords"):
        build_net("unet-digits", chanels=3)
    with pytest.raises(UnifuseError, match="shape"):
        build_net("unet-digits")(torch.randn(2, 3, 8, 8), torch.zeros(2))

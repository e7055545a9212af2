"""LoRA adapters (unifuse.finetune.lora): identity at start, only the adapters train, W + (alpha/r) B A in closed
form, and the merged plain network equals the adapted one after training, on the library's own networks."""
import copy
import sys

import pytest
import torch

from unifuse.errors import UnifuseError
from unifuse.nets import build_net
from unifuse.training.build import Flattened

# the networks the library ships, small: name -> (builder, shape of one input)
NETS = {
    "mlp-toy": (lambda: build_net("mlp-toy", width=32, depth=2, emb_dim=16), (2,)),
    "flattened-mlp": (lambda: Flattened(build_net("mlp-toy", dim=64, width=32, depth=2, emb_dim=16)), (1, 8, 8)),
    "unet-digits": (lambda: build_net("unet-digits", channels=16), (1, 8, 8)),
    "dit-digits": (lambda: build_net("dit-digits", width=32, depth=2, heads=2), (1, 8, 8)),
}


def net_and_input(name):
    """(network in float64 eval mode, input x [3, ...], time t [3])."""
    build, shape = NETS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    return build().double().eval(), x, torch.rand(3, generator=g, dtype=torch.float64)


def train_a_little(net, x, t, steps=3):
    """A few Adam steps of the adapters toward a random target (moves every B away from zero)."""
    from unifuse.finetune.lora import adapter_parameters

    opt = torch.optim.Adam(adapter_parameters(net), lr=1e-2)
    target = torch.randn(net(x, t).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(steps):
        loss = (net(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", NETS)
def test_adapters_start_as_identity_and_merge_exactly(name):
    pytest.importorskip("peft")
    from unifuse.finetune.lora import adapter_parameters, add_adapters, is_adapted, merge_into, merged_state_dict

    net, x, t = net_and_input(name)
    plain = copy.deepcopy(net)
    keys = list(net.state_dict())
    with torch.no_grad():
        before = net(x, t)
    assert add_adapters(net, rank=4, alpha=8) is net and is_adapted(net) and not is_adapted(plain)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), before, rtol=0, atol=0)    # B = 0: exactly the base network
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in adapter_parameters(net)} == {id(p) for p in net.parameters() if p.requires_grad}
    train_a_little(net, x, t)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    merged = merged_state_dict(net)
    assert list(merged) == keys                                          # the plain network's keys, in order
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())   # net untouched by the merge
    with torch.no_grad():
        adapted_out = net(x, t)
        assert (adapted_out - before).abs().max() > 1e-3                # training moved the adapted network
        torch.testing.assert_close(merge_into(plain, net)(x, t), adapted_out, rtol=0, atol=1e-6)


def test_linear_update_is_alpha_over_rank_times_BA():
    pytest.importorskip("peft")
    from unifuse.finetune.lora import add_adapters, merged_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    W, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    add_adapters(net, rank=2, alpha=6.0, targets=["0"])
    assert not hasattr(net[2], "lora_A")                                 # only the named layer
    A, B = torch.randn(2, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        net[0].lora_A["default"].weight.copy_(A)
        net[0].lora_B["default"].weight.copy_(B)
    x = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net[0](x), x @ (W + 3.0 * B @ A).T + b)   # alpha / r = 6 / 2
    torch.testing.assert_close(merged_state_dict(net)["0.weight"], W + 3.0 * B @ A)


def test_conv_update_merges_into_the_kernel():
    pytest.importorskip("peft")
    from unifuse.finetune.lora import add_adapters, merged_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1)).double()
    add_adapters(net, rank=2)
    with torch.no_grad():
        net[0].lora_B["default"].weight.normal_()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    plain = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    plain.load_state_dict({k[2:]: v for k, v in merged_state_dict(net).items()})
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=0, atol=1e-12)


def test_bad_input_messages():
    pytest.importorskip("peft")
    from unifuse.finetune.lora import add_adapters, merge_into, merged_state_dict

    net = build_net("mlp-toy", width=8, depth=1, emb_dim=8)
    with pytest.raises(UnifuseError, match=r"LoRA targets \['nope'\] name no nn.Linear or nn.Conv2d"):
        add_adapters(copy.deepcopy(net), targets=["nope"])
    with pytest.raises(UnifuseError, match="LoRA rank must be a positive integer, got 0"):
        add_adapters(copy.deepcopy(net), rank=0)
    with pytest.raises(UnifuseError, match="has no LoRA adapters to merge"):
        merged_state_dict(net)
    adapted = add_adapters(copy.deepcopy(net), rank=2)
    with pytest.raises(UnifuseError, match="already has LoRA adapters"):
        add_adapters(adapted)
    with pytest.raises(UnifuseError, match="does not fit the plain one"):
        merge_into(build_net("mlp-toy", width=16, depth=1, emb_dim=8), adapted)


def test_missing_peft_names_the_extra(monkeypatch):
    from unifuse.finetune.lora import add_adapters

    monkeypatch.setitem(sys.modules, "peft", None)                      # `import peft` now raises ImportError
    with pytest.raises(UnifuseError, match=r"LoRA needs the peft package: pip install 'unifuse\[peft\]'"):
        add_adapters(torch.nn.Linear(2, 2))

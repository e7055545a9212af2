"""The latent-diffusion autoencoder: shapes per downsampling factor, the Gaussian posterior, the loss as written,
the KL closed form, rebuilding from the config a checkpoint stores."""
import pytest
import torch

from unifuse.errors import UnifuseError
from unifuse.nets import AUTOENCODERS, NETS, build_net
from unifuse.objectives import AutoencoderLoss, get, kl_divergence

F64 = torch.float64


@pytest.mark.parametrize("name, shape, latent", [("ae-mnist", (1, 28, 28), (4, 7, 7)),
                                                 ("ae-mnist-plain", (1, 28, 28), (4, 7, 7)),
                                                 ("ae-rgb32", (3, 32, 32), (4, 8, 8)),
                                                 ("ae-rgb64", (3, 64, 64), (4, 16, 16))])
def test_latent_shapes_follow_the_downsampling_factor_4(name, shape, latent):
    ae = build_net(name, channels=8).eval()
    x = torch.rand(2, *shape) * 2 - 1
    mean, logvar = ae.encode(x)
    assert ae.factor == 4 and tuple(mean.shape) == (2, *latent)
    assert (logvar is None) == name.endswith("plain")
    assert tuple(ae.decode(mean).shape) == (2, *shape)
    for module in ae.modules():  # GroupNorm groups divide the channels
        if isinstance(module, torch.nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0


def test_bad_sizes_are_refused_in_one_message():
    ae = build_net("ae-mnist", channels=8)
    with pytest.raises(UnifuseError, match="divisible by its downsampling factor 4"):
        ae.encode(torch.zeros(1, 1, 30, 30))
    with pytest.raises(UnifuseError, match="latents"):
        ae.decode(torch.zeros(1, 3, 7, 7))


def test_posterior_sample_is_mean_plus_std_times_noise_in_training_and_the_mean_in_eval():
    ae = build_net("ae-mnist", channels=8).double()
    with torch.no_grad():  # a non-zero decoder output layer, so the decoder is not constant
        torch.nn.init.normal_(ae.decoder[-1].weight, std=0.1)
    x = torch.rand(3, 1, 28, 28, dtype=F64) * 2 - 1
    mean, logvar = ae.encode(x)
    ae.train()
    recon, m2, _ = ae(x, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(recon, ae.decode(mean + (0.5 * logvar).exp() * noise))
    torch.testing.assert_close(m2, mean)
    ae.eval()
    torch.testing.assert_close(ae(x)[0], ae.decode(mean))
    assert not torch.allclose(ae(x)[0], recon)


def test_kl_matches_the_closed_form_of_torch_distributions():
    mean, logvar = torch.randn(5, 4, 3, 3, dtype=F64), torch.randn(5, 4, 3, 3, dtype=F64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)
    assert float(kl_divergence(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0


def test_loss_is_l1_l2_plus_kl_over_pixels_and_its_gradient_is_the_autograd_one():
    ae = build_net("ae-mnist", channels=8).double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=F64) * 2 - 1
    loss_fn = get("autoencoder", kl=0.5, l1=1.0, l2=2.0)
    loss, parts = loss_fn(ae, x)
    recon, mean, logvar = ae(x)
    D = 28 * 28
    expected = ((recon - x).abs().flatten(1).mean(1) + 2.0 * (recon - x).square().flatten(1).mean(1)
                + 0.5 * kl_divergence(mean, logvar) / D)
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"l1", "l2", "kl"} and parts["kl"] > 0
    plain = build_net("ae-mnist-plain", channels=8).double().eval()
    assert set(AutoencoderLoss(kl=1e-6)(plain, x)[1]) == {"l1", "l2"}  # no posterior, no KL term
    with pytest.raises(UnifuseError, match="features="):
        AutoencoderLoss(perceptual=1.0)


def test_perceptual_term_is_the_squared_feature_distance_of_the_shipped_classifier():
    from unifuse.metrics import load_classifier

    ae = build_net("ae-mnist", channels=8).eval()
    with torch.no_grad():
        torch.nn.init.normal_(ae.decoder[-1].weight, std=0.1)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    loss_fn = AutoencoderLoss(kl=0.0, l1=0.0, perceptual=1.0, features="mnist", pad=2)
    loss, _ = loss_fn(ae, x)
    phi = load_classifier("mnist")
    pad = torch.nn.functional.pad
    expected = (phi.embed(pad(ae(x)[0], (2,) * 4, value=-1.0)) - phi.embed(pad(x, (2,) * 4, value=-1.0))).square()
    torch.testing.assert_close(loss, expected.mean(1), rtol=1e-4, atol=1e-6)
    loss.sum().backward()
    assert ae.decoder[-1].weight.grad.abs().sum() > 0  # the frozen classifier passes gradients to the decoder


def test_rebuilt_from_its_config_the_autoencoder_computes_the_same_function():
    ae = build_net("ae-mnist", channels=8).eval()
    assert ae.family not in NETS  # not a denoiser: its own registry
    again = AUTOENCODERS[ae.family](**ae.config).eval()
    again.load_state_dict(ae.state_dict())
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(again.encode(x)[0], ae.encode(x)[0])
    with pytest.raises(UnifuseError, match="non-empty channel_mult"):
        build_net("ae-mnist", channel_mult=())

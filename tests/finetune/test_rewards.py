"""Rewards (unifuse.finetune.rewards): closed-form values, JPEG-size ordering, classifier log-probabilities that
normalise and whose gradients match finite differences, and one clear message for every kind of bad input."""
import math

import pytest
import torch

from unifuse.errors import UnifuseError
from unifuse.finetune.rewards import REWARDS, Reward, checked, get_reward, jpeg_kilobytes, require_differentiable

DIGITS = {"name": "digits", "shape": [1, 8, 8], "num_classes": 10, "pad": 0}


def test_brightness_closed_form_and_gradient():
    r = get_reward("brightness", DIGITS)
    c = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0], dtype=torch.float64)
    images = c.reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone().requires_grad_(True)
    value = r(images, {})
    assert value.shape == (5,) and r.differentiable
    torch.testing.assert_close(value, (c + 1) / 2)           # a constant image c has brightness (c + 1) / 2
    (grad,) = torch.autograd.grad(value.sum(), images)
    torch.testing.assert_close(grad, torch.full_like(images, 1 / (2 * 64)))   # d mean((x+1)/2) / dx_i = 1 / (2N)
    vectors = torch.rand(3, 5, dtype=torch.float64) * 2 - 1   # [B, D] vectors work too
    torch.testing.assert_close(r(vectors), ((vectors + 1) / 2).mean(1))


def test_contrast_closed_form_and_finite_differences():
    r = get_reward("contrast", DIGITS)
    half = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    half[..., :4] = -1                                        # half black, half white: std in [0,1] units = 1/2
    flat = torch.full((1, 1, 8, 8), 0.3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(r(half), torch.tensor([0.5], dtype=torch.float64))
    assert float(r(flat.detach())) == 0.0
    (g,) = torch.autograd.grad(r(flat).sum(), flat)           # finite (zero) gradient at a constant image
    assert torch.equal(g, torch.zeros_like(g))
    x = (torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert torch.autograd.gradcheck(lambda y: r(y), (x.requires_grad_(True),))
    u = (x.detach() + 1) / 2
    torch.testing.assert_close(r(x), u.flatten(1).std(1, correction=0))


def test_jpeg_sizes_ordered_and_not_differentiable():
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 3, 32, 32)
    noisy = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    images = torch.cat([flat, noisy]).requires_grad_(True)
    comp, incomp = get_reward("compressibility", {"shape": [3, 32, 32]}), get_reward("incompressibility", {})
    assert not comp.differentiable and not incomp.differentiable
    size = incomp(images, {})
    assert size.dtype == torch.float32 and not size.requires_grad
    assert 0 < size[0] < size[1]                               # noise compresses worse than a flat image
    torch.testing.assert_close(comp(images), -size)
    grey = torch.cat([torch.zeros(1, 1, 32, 32), torch.rand(1, 1, 32, 32, generator=g) * 2 - 1])
    assert jpeg_kilobytes(grey)[0] < jpeg_kilobytes(grey)[1]
    # MNIST-style padding is cropped before encoding: noise only in the 2-pixel border costs nothing
    border = torch.zeros(1, 1, 32, 32)
    border[..., :2, :] = torch.rand(1, 1, 2, 32, generator=g)
    pad = get_reward("incompressibility", {"pad": 2})
    assert float(pad(border)) == float(pad(torch.zeros(1, 1, 32, 32))) < float(incomp(border))
    with pytest.raises(UnifuseError, match=r"needs images \[B, 1 or 3, H, W\]"):
        comp(torch.zeros(2, 64))


def digits_heldout():
    from unifuse.data import load_dataset

    data = load_dataset("digits", "heldout")
    return data.images, data.labels


def test_class_reward_normalises_and_prefers_its_class():
    x, y = digits_heldout()
    values = torch.stack([get_reward(f"class:{k}", DIGITS)(x) for k in range(10)], 1)   # [N, 10] log p(k | x)
    torch.testing.assert_close(torch.logsumexp(values.double(), 1), torch.zeros(len(x), dtype=torch.float64),
                               atol=1e-5, rtol=0)
    for k in range(10):                                        # real digits of class k score highest on class:k
        assert values[y == k, k].mean() > values[y != k, k].mean() + 1.0
    flat = x.flatten(1)                                        # flattened samples (the MLP's) are reshaped
    torch.testing.assert_close(get_reward("class:3", DIGITS)(flat), values[:, 3])


def test_class_reward_gradient_matches_finite_differences(monkeypatch):
    import unifuse.metrics.classifier as shipped

    load = shipped.load_classifier
    monkeypatch.setattr(shipped, "load_classifier", lambda name: load(name).double())   # float64 for the check
    x, _ = digits_heldout()
    x = x[:4].double() * 0.9   # inside (-1, 1): the reward clamps images to [-1, 1] (a kink at the ends)
    r = get_reward("class:7", DIGITS)
    images = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(r(images).sum(), images)      # gradients reach the images
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    v = torch.randn(images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        fd = (r(x + eps * v) - r(x - eps * v)) / (2 * eps)     # central difference along v
    torch.testing.assert_close(fd, (grad * v).flatten(1).sum(1), rtol=1e-6, atol=1e-8)


def test_class_reward_from_a_noisy_classifier_folder(tmp_path):
    from unifuse.nets.classifier import NoisyClassifier, clean_time, save_noisy_classifier
    from unifuse.paths import get as get_path

    torch.manual_seed(0)
    clf = NoisyClassifier(get_path("edm"), width=8, mult=(1, 2), emb_dim=16).eval()
    save_noisy_classifier(clf, str(tmp_path), {"path": "edm", "config": clf.config, "shape": [1, 8, 8],
                                                "data": "digits"})
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = get_reward(f"class:2@{tmp_path}", DIGITS)
    t0 = torch.full((3,), clean_time(clf.path), dtype=torch.float64)
    with torch.no_grad():
        expected = torch.log_softmax(clf(x, t0), 1)[:, 2]
    torch.testing.assert_close(r(x), expected)
    images = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(r(images).sum(), images)
    assert grad.abs().sum() > 0
    with pytest.raises(UnifuseError, match="holds no noise-conditional classifier"):
        get_reward(f"class:2@{tmp_path / 'nothing'}", DIGITS)
    with pytest.raises(UnifuseError, match=r"class '12' is not one of the classifier's classes 0\.\.9"):
        get_reward(f"class:12@{tmp_path}", DIGITS)


def test_class_reward_bad_input_messages():
    with pytest.raises(UnifuseError, match=r"class '10' is not one of the classifier's classes 0\.\.9"):
        get_reward("class:10", DIGITS)
    with pytest.raises(UnifuseError, match="class 'seven' is not one"):
        get_reward("class:seven", DIGITS)
    with pytest.raises(UnifuseError, match=r"data set 'moons' has no shipped classifier.*class:K@DIR"):
        get_reward("class:0", {"name": "moons", "shape": [2], "num_classes": 0})
    with pytest.raises(UnifuseError, match=r"takes images \[1, 8, 8\], got \[1, 16, 16\]"):
        get_reward("class:0", DIGITS)(torch.zeros(2, 1, 16, 16))


def test_output_checks_name_the_reward_and_the_fix():
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(UnifuseError, match=r"reward 'mine' returned shape \[4, 1\] for 4 images; it must return "
                                           r"shape \[4\]"):
        checked(lambda x, c: x.flatten(1).mean(1, keepdim=True), "mine")(images)
    nan = torch.tensor([0.0, math.nan, math.inf, 1.0])
    with pytest.raises(UnifuseError, match="reward 'mine' returned NaN or inf for 2 of 4 samples"):
        checked(lambda x, c: nan, "mine")(images)
    with pytest.raises(UnifuseError, match="reward 'mine' returned a list"):
        checked(lambda x, c: [0.0] * 4, "mine")(images)
    with pytest.raises(UnifuseError, match=r"reward 'mine' returned dtype torch.int64; it must return floats"):
        checked(lambda x, c: torch.zeros(4, dtype=torch.long), "mine")(images)
    good = checked(lambda x, c: x.flatten(1).sum(1), "mine")
    assert isinstance(good, Reward) and checked(good) is good and good(images).shape == (4,)


def test_unknown_name_lists_the_rewards():
    with pytest.raises(UnifuseError) as err:
        get_reward("aesthetics", DIGITS)
    assert "unknown reward 'aesthetics'" in str(err.value)
    assert all(name in str(err.value) for name in REWARDS)


USER = '''
import torch

def darkness(images, cond):
    return -images.flatten(1).mean(1)

def count(images, cond):
    return (images.flatten(1) > 0).float().sum(1)
count.differentiable = False
'''


def test_user_rewards_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    by_file = get_reward(f"{tmp_path / 'my_rewards.py'}:darkness", DIGITS)
    torch.testing.assert_close(by_file(x), -x.flatten(1).mean(1))
    assert by_file.differentiable
    monkeypatch.syspath_prepend(str(tmp_path))
    counted = get_reward("my_rewards:count", DIGITS)
    assert not counted.differentiable
    assert torch.equal(counted(x.requires_grad_(True)), (x.detach().flatten(1) > 0).double().sum(1).float())
    with pytest.raises(UnifuseError, match="reward 'my_rewards:nope': 'my_rewards' has no callable 'nope'; "
                                           "its callables are: count, darkness"):
        get_reward("my_rewards:nope", DIGITS)
    with pytest.raises(UnifuseError, match="module 'no_such_module_xyz' not found"):
        get_reward("no_such_module_xyz:fn", DIGITS)
    with pytest.raises(UnifuseError, match="no Python file"):
        get_reward(f"{tmp_path / 'missing.py'}:fn", DIGITS)


def test_require_differentiable_names_reward_method_and_alternatives():
    require_differentiable(get_reward("brightness", DIGITS), "draft")    # fine: has a gradient
    with pytest.raises(UnifuseError, match="reward 'compressibility' has no gradient; method 'draft' "
                                           "backpropagates through it; use ddpo, dpok, grpo, dpo or ipo"):
        require_differentiable(get_reward("compressibility", DIGITS), "draft")


def test_rewards_score_images_clamped_to_the_data_range():
    """Out-of-range pixels earn nothing: the reward sees the picture as written (a fine-tuned policy otherwise learns
    to push pixels past 1, where the classifier's logits keep growing)."""
    r = get_reward("brightness", DIGITS)
    x = torch.full((2, 1, 8, 8), 3.0).requires_grad_(True)
    value = r(x)
    assert torch.equal(value, torch.ones(2))
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    three = get_reward("class:3", DIGITS)
    y = torch.randn(4, 1, 8, 8) * 3
    torch.testing.assert_close(three(y), three(y.clamp(-1, 1)))

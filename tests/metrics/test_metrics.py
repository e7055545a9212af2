"""Metrics: Frechet distance against the Gaussian closed form, precision/recall and sliced Wasserstein against
their defining limits, MMD, the exact toy cross-entropy, and the shipped classifiers against their stated accuracy."""
import math

import pytest
import torch

from unifuse.data import load_dataset, sample_toy, toy_entropy
from unifuse.errors import UnifuseError
from unifuse.metrics import (
    classifier_info,
    classify,
    cross_entropy,
    evaluate_images,
    evaluate_toy,
    frechet_distance,
    frechet_from_stats,
    load_classifier,
    mmd,
    precision_recall,
    real_floor,
    sliced_wasserstein,
)

F64 = torch.float64


def test_frechet_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=F64)
    S1, S2 = a @ a.T + torch.eye(5, dtype=F64), torch.diag(torch.rand(5, generator=g, dtype=F64) + 0.5)
    m1, m2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    assert frechet_from_stats(m1, S1, m1, S1) < 1e-9                               # d(P, P) = 0
    assert abs(frechet_from_stats(m1, S1, m2, S2) - frechet_from_stats(m2, S2, m1, S1)) < 1e-9  # symmetric
    assert abs(frechet_from_stats(m1, S1, m2, S1) - float((m1 - m2).square().sum())) < 1e-9  # equal covariances
    d1, d2 = torch.rand(5, generator=g, dtype=F64) + 0.1, torch.rand(5, generator=g, dtype=F64) + 0.1
    exact = float((m1 - m2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum())  # commuting covariances
    assert abs(frechet_from_stats(m1, torch.diag(d1), m2, torch.diag(d2)) - exact) < 1e-9
    # a rotated pair: FD is invariant under a common orthogonal change of basis
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    rot = frechet_from_stats(q @ m1, q @ torch.diag(d1) @ q.T, q @ m2, q @ torch.diag(d2) @ q.T)
    assert abs(rot - exact) < 1e-9


def test_frechet_of_samples_grows_with_a_mean_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20_000, 4, generator=g, dtype=F64), torch.randn(20_000, 4, generator=g, dtype=F64)
    assert frechet_distance(x, x) < 1e-9
    base = frechet_distance(x, y)
    assert base < 0.01
    for c in (0.5, 1.0, 2.0):
        shift = torch.tensor([c, 0, 0, c], dtype=F64)
        assert abs(frechet_distance(x, y + shift) - 2 * c * c) < 0.02 + 0.05 * c   # |m1 - m2|^2 = 2 c^2


def test_precision_recall_limits():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1500, 3, generator=g, dtype=F64)
    same = torch.randn(1500, 3, generator=g, dtype=F64)
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    far = same + 10
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:5].repeat(300, 1) + 1e-3 * torch.randn(1500, 3, generator=g, dtype=F64)  # mode collapse
    p, r = precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.2


def test_sliced_wasserstein_of_a_translation():
    x = sample_toy("moons", 3000, torch.Generator().manual_seed(0))
    y = sample_toy("moons", 3000, torch.Generator().manual_seed(1))
    c = torch.tensor([0.6, -0.8])                                   # |c| = 1
    assert sliced_wasserstein(x, x) == 0.0
    # x vs x + c: every projection is shifted by theta.c, so SW_2^2 = mean (theta.c)^2 ~ |c|^2 / D
    assert abs(sliced_wasserstein(x, x + c, projections=1024) - 1 / math.sqrt(2)) < 0.03
    small = sliced_wasserstein(x, y)
    assert small < 0.1 and sliced_wasserstein(x, y + 0.5 * c) > 3 * small
    assert sliced_wasserstein(x[:1000], y) < 0.15  # unequal sizes go through quantiles


def test_mmd_is_near_zero_for_equal_distributions_and_grows_with_shift():
    x = sample_toy("8gaussians", 1500, torch.Generator().manual_seed(0))
    y = sample_toy("8gaussians", 1500, torch.Generator().manual_seed(1))
    same = mmd(x, y)
    assert abs(same) < 2e-3
    assert mmd(x, y + 0.3) > 5 * abs(same) + 1e-3 and mmd(x, y + 1.0) > mmd(x, y + 0.3)


def test_toy_cross_entropy_and_evaluate_toy():
    x = sample_toy("checkerboard", 2000, torch.Generator().manual_seed(0))
    ce = cross_entropy(x, "checkerboard")
    assert ce["nll"] == pytest.approx(math.log(32)) and ce["off_support"] == 0.0
    off = cross_entropy(x + torch.tensor([2.0, 0.0]), "checkerboard")        # shifted one square: all off support
    assert off["nll"] == math.inf and off["off_support"] > 0.9
    report = evaluate_toy(sample_toy("moons", 2000, torch.Generator().manual_seed(3)), "moons")
    assert report["swd"] < 3 * report["swd_floor"] + 0.02 and abs(report["nll"] - toy_entropy("moons")) < 0.1
    bad = evaluate_toy(sample_toy("moons", 2000, torch.Generator().manual_seed(3)) * 1.3, "moons")
    assert bad["swd"] > 3 * report["swd"] and bad["nll"] > report["nll"] + 0.3
    with pytest.raises(UnifuseError, match=r"\[N, 2\]"):
        evaluate_toy(torch.zeros(10, 3), "moons")


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_shipped_classifier_reaches_its_stated_accuracy(name):
    info = classifier_info(name)
    assert info["heldout_accuracy"] >= 0.97 and info["feature_dim"] == 64
    held = load_dataset(name, "heldout")
    feats, logits = classify(load_classifier(name), held.images)
    assert feats.shape == (len(held), 64)
    acc = float((logits.argmax(1) == held.labels).double().mean())
    assert acc == pytest.approx(info["heldout_accuracy"], abs=2 / len(held))


def test_evaluate_images_separates_real_from_corrupted():
    held = load_dataset("digits", "heldout")
    real = evaluate_images(held.images, "digits", labels=held.labels)
    assert sum(real["class_hist"]) == len(held) and real["label_accuracy"] > 0.97 and real["class_kl"] < 0.01
    floor = real_floor("digits", 250)
    blurred = torch.nn.functional.avg_pool2d(held.images, 3, 1, 1)
    worse = evaluate_images(blurred, "digits")
    assert 0 < floor < worse["fd"] and real["fd"] < worse["fd"] / 10 and worse["precision"] < real["precision"]
    as_uint8 = evaluate_images(held.to_uint8(held.images), "digits")           # the samples.npz layout
    assert as_uint8["fd"] == pytest.approx(real["fd"], rel=0.05, abs=0.02)
    ones = torch.full((300, 1, 8, 8), -1.0)
    ones[:, :, 2:6, 3:5] = 1.0                                                  # one repeated blob: mode collapse
    collapsed = evaluate_images(ones + 0.01 * torch.randn_like(ones), "digits")
    assert collapsed["class_kl"] > 1.0 and collapsed["recall"] < 0.1
    # Recognised digits: nearly all real ones, in every class; the collapsed set gives at most one class.
    assert real["recognised"] > 0.9 and min(real["recognised_hist"]) >= 20 and sum(real["recognised_hist"]) <= len(held)
    assert sum(c > 0 for c in collapsed["recognised_hist"]) <= 1
    per_class = [r / h for r, h in zip(real["recognised_hist"], real["class_hist"])]
    assert real["recognised_per_class"] == pytest.approx(per_class) and min(per_class) > 0.8
    with pytest.raises(UnifuseError, match="real_floor n"):
        real_floor("digits", 10_000)


def test_heldout_floor_is_the_distance_a_perfect_generator_reaches():
    """The held-out floor is the distance of i.i.d. draws of real images, so an i.i.d. draw of training images (a
    perfect generator of the training distribution) scores about 1, and it is well above the distance of subsets
    drawn without replacement, whose class counts barely move (the held-out split is stratified)."""
    from unifuse.training.demo import heldout_fd, heldout_floor

    floor, sd, subset = heldout_floor("digits", 1000, seed=0, repeats=40)
    assert subset < 0.85 * floor and 0 < sd < floor
    train = load_dataset("digits", "train").images
    g = torch.Generator().manual_seed(123)
    ratios = [heldout_fd(train[torch.randint(len(train), (1000,), generator=g)], "digits", floor_repeats=40)["fd_ratio"]
              for _ in range(8)]
    assert 0.75 < sum(ratios) / len(ratios) < 1.25

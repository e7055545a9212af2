"""Folder metrics: KID's estimator against its definition and its zero mean, the real-vs-real floors as the score of
a perfect copy, the ranking of noisier sample sets under both feature maps, and invariance to sample order."""
import pytest
import torch

from unifuse.data import load_dataset
from unifuse.errors import UnifuseError
from unifuse.metrics import evaluate_folder, kid, mmd2_unbiased
from unifuse.metrics.folder import split_real
from unifuse.metrics.kernel import polynomial_kernel

F64 = torch.float64
DISTANCES = ("fd", "kid", "swd")


def test_mmd2_unbiased_is_the_u_statistic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64) + 0.5
    k = lambda a, b: float((a @ b / 3 + 1) ** 3)
    sxx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    syy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    sxy = sum(k(a, b) for a in x for b in y) / 30
    got = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert float(got) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-12)


def test_kid_is_unbiased_between_draws_of_one_distribution():
    """Over many independent pairs of small draws from one distribution the mean KID is 0 within its standard
    error (values of both signs), while the biased V-statistic (diagonals kept) is positive every time."""
    g = torch.Generator().manual_seed(0)
    values, biased = [], []
    for _ in range(300):
        x, y = torch.randn(40, 8, generator=g, dtype=F64), torch.randn(40, 8, generator=g, dtype=F64)
        values.append(kid(x, y, subsets=1)[0])
        biased.append(float(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                            - 2 * polynomial_kernel(x, y).mean()))
    v = torch.tensor(values, dtype=F64)
    stderr = float(v.std()) / len(values) ** 0.5
    assert abs(float(v.mean())) < 3 * stderr
    assert 0.2 < float((v < 0).double().mean()) < 0.8
    assert min(biased) > 0 and sum(biased) / len(biased) > 10 * stderr
    # A mean shift raises KID far above that noise, and more for a larger shift.
    x, y = torch.randn(400, 8, generator=g, dtype=F64), torch.randn(400, 8, generator=g, dtype=F64)
    small, large = kid(x, y + 0.3)[0], kid(x, y + 0.6)[0]
    assert 20 * stderr < small < large
    with pytest.raises(UnifuseError, match="KID needs"):
        kid(x, y[:, :4])


@pytest.fixture(scope="module")
def digits():
    """134 random train images as samples (the train split is ordered by writer: a random draw is a perfect
    generator's sample), the 270 held-out images with their labels as the folder's real images."""
    train, held = load_dataset("digits", "train"), load_dataset("digits", "heldout")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:134]
    return train.images[idx], train.labels[idx], held.images, held.labels


def noisy(x, std, seed=0):
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_a_perfect_copy_scores_its_floor_and_identical_sets_score_zero(digits):
    """Samples equal to the held part of the real images are the floor's own comparison: every distance equals its
    floor; and the Frechet distance and SWD of a set against itself are exactly 0."""
    _, _, real, _ = digits
    _, held_idx = split_real(len(real), 100, seed=0)
    report = evaluate_folder(real[held_idx], real, seed=0)
    for key in (*DISTANCES, "precision", "recall"):
        assert report[key] == pytest.approx(report[f"{key}_floor"], abs=1e-12)
    assert report["n"] == 100 and report["n_ref"] == len(real) - 100 and "random" in report["features"]
    assert "not comparable" in report["note"]
    from unifuse.metrics.folder import distances

    f = torch.randn(50, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    px = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    same = distances(f, f, px, px, seed=0)
    assert same["fd"] < 1e-9 and same["swd"] == 0.0 and same["precision"] == same["recall"] == 1.0


@pytest.mark.parametrize("labelled", [False, True])
def test_noisier_samples_rank_worse(digits, labelled):
    """Clean images, then the same with Gaussian pixel noise of std 0.3 and 0.6: every distance grows and precision
    falls, in the features of a trained classifier (labelled folder) and of the random net (no labels)."""
    samples, sample_labels, real, real_labels = digits
    kw = dict(real_labels=real_labels, steps=150) if labelled else {}
    reports = [evaluate_folder(noisy(samples, s), real, labels=sample_labels, **kw) for s in (0.0, 0.3, 0.6)]
    for key in DISTANCES:
        clean, mid, bad = (r[key] for r in reports)
        assert clean < mid < bad, key
    floor = {key: reports[0][f"{key}_floor"] for key in DISTANCES}
    assert reports[0]["fd"] < 1.3 * floor["fd"] and reports[0]["swd"] < 1.3 * floor["swd"]   # a perfect generator
    assert reports[2]["fd"] > 1.5 * floor["fd"] and reports[2]["swd"] > 1.5 * floor["swd"]
    assert reports[2]["kid"] > abs(floor["kid"]) + 2 * reports[0]["kid_std"]
    assert reports[0]["precision"] > reports[2]["precision"]
    if labelled:
        assert "trained 150 steps on 10 classes" in reports[0]["features"]
        assert reports[0]["classifier_accuracy"] > 0.7 and reports[0]["label_accuracy"] > 0.7
        assert sum(reports[0]["class_hist"]) == reports[0]["n"]
    else:
        assert "label_accuracy" not in reports[0]


def test_order_invariance_determinism_and_no_global_state(digits):
    samples, labels, real, real_labels = digits
    samples = samples[:60]
    rng = torch.random.get_rng_state()
    with torch.inference_mode():  # as a caller sampling under inference mode would call it
        a = evaluate_folder(samples, real, labels=labels[:60], real_labels=real_labels, steps=20)
    assert torch.equal(rng, torch.random.get_rng_state())
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    b = evaluate_folder(samples[perm], real, labels=labels[:60][perm], real_labels=real_labels, steps=20)
    for key in ("swd", "fd", "precision", "recall", "label_accuracy", "fd_floor", "kid_floor", "swd_floor"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), key  # float32 features
    assert a["warning"].startswith("only 60 samples")


def test_folder_metrics_refuse_bad_input(digits):
    samples, _, real, _ = digits
    with pytest.raises(UnifuseError, match="must have one shape"):
        evaluate_folder(samples, torch.zeros(20, 3, 8, 8))
    with pytest.raises(UnifuseError, match="at least 8 real images"):
        evaluate_folder(samples, real[:5])
    with pytest.raises(UnifuseError, match="real_labels must hold one class index"):
        evaluate_folder(samples, real, real_labels=torch.zeros(3))
    with pytest.raises(UnifuseError, match=r"float images \[N, C, H, W\]"):
        evaluate_folder(samples[:, 0], real)

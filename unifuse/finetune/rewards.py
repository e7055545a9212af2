"""Rewards for fine-tuning (ALGORITHMS card 21): plain callables reward(images, cond) -> Tensor [B].

images are [B, C, H, W] (or [B, D] vectors) in data units, [-1, 1] for images; cond is the rollouts' condition
dict ({} when unconditional). `get_reward(name, info)` builds one by name, wrapped in `Reward`, which checks every
output (a finite float tensor [B]) so that a broken reward stops with one message instead of a NaN policy.

    class:K             log p(K | x) under the shipped evaluation classifier of the data set (differentiable)
    class:K@DIR         log p(K | x) under the noise-conditional classifier in DIR, at its data end
    compressibility     minus the JPEG size in kB at quality 95 (DDPO, Black et al. 2023); no gradient
    incompressibility   plus the JPEG size in kB; no gradient
    brightness          mean pixel value in [0, 1] units (differentiable)
    contrast            per-image std of the pixels in [0, 1] units (differentiable)
    module:function     a user callable, imported (a module path or a file "path/to/file.py:fn")
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnifuseError

REWARDS = {
    "class:K": "log-probability of class K under the data set's shipped classifier (digits, mnist)",
    "class:K@DIR": "log-probability of class K under the noise-conditional classifier in DIR, at the data end",
    "compressibility": "minus the JPEG size in kB at quality 95 (DDPO); no gradient",
    "incompressibility": "plus the JPEG size in kB at quality 95 (DDPO); no gradient",
    "brightness": "mean pixel value per image, in [0, 1] units",
    "contrast": "standard deviation of each image's pixels, in [0, 1] units",
    "module:function": "your own reward(images, cond) -> [B], e.g. mypkg.rewards:aesthetic or path/to/file.py:fn",
}


@dataclass
class Reward:
    """A named reward: `reward(images, cond)` -> float tensor [B], checked on every call.
    differentiable: False when the reward has no gradient (JPEG sizes): backpropagating methods refuse it.
    Images ([B, C, H, W]) are clamped to [-1, 1] first: the reward scores the picture as it is written, so a policy
    cannot earn reward with out-of-range pixels (a fine-tuned model otherwise learns exactly that: the classifier's
    logits keep growing outside the data's range while the saved image shows another digit)."""

    name: str
    fn: Callable
    differentiable: bool = True
    pixels: bool = True             # False: the inputs are latents (`decoded`), not clamped

    def __call__(self, images: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        images = images.clamp(-1.0, 1.0) if images.ndim == 4 and self.pixels else images
        if self.differentiable:
            value = self.fn(images, cond if cond is not None else {})
        else:
            with torch.no_grad():
                value = self.fn(images, cond if cond is not None else {})
        return self.check(value, images.shape[0])

    def check(self, value, batch: int) -> torch.Tensor:
        """value if it is a finite float tensor [batch], else one UnifuseError naming the reward and the fix."""
        if not isinstance(value, torch.Tensor):
            raise UnifuseError(f"reward {self.name!r} returned a {type(value).__name__}; it must return a torch "
                               f"tensor of shape [{batch}] (one value per image)")
        if tuple(value.shape) != (batch,):
            raise UnifuseError(f"reward {self.name!r} returned shape {list(value.shape)} for {batch} images; it must "
                               f"return shape [{batch}] (one value per image: reduce the other dimensions, e.g. "
                               ".flatten(1).mean(1))")
        if not value.is_floating_point():
            raise UnifuseError(f"reward {self.name!r} returned dtype {value.dtype}; it must return floats "
                               "(e.g. value.float())")
        bad = int((~torch.isfinite(value.detach())).sum())
        if bad:
            raise UnifuseError(f"reward {self.name!r} returned NaN or inf for {bad} of {batch} samples; "
                               "make it finite for every image in [-1, 1] (clamp, add an epsilon to logs and divisions)")
        return value


def checked(fn: Callable, name: str | None = None, differentiable: bool | None = None) -> Reward:
    """Wrap a plain callable reward(images, cond) -> [B] in `Reward` (a `Reward` is returned as it is)."""
    if isinstance(fn, Reward):
        return fn
    if differentiable is None:
        differentiable = bool(getattr(fn, "differentiable", True))
    return Reward(name or getattr(fn, "name", None) or getattr(fn, "__name__", "reward"), fn, differentiable)


# --- pixel statistics ------------------------------------------------------------------------------------------
def brightness(images: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """Mean pixel value per image in [0, 1] units: mean((x + 1) / 2) over all but the batch dimension."""
    return ((images.flatten(1) + 1) / 2).mean(1)


def contrast(images: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """Per-image population std of the pixels in [0, 1] units: sqrt(mean((u - mean u)^2)), u = (x + 1) / 2.
    0 for a constant image, with gradient 0 there (not sqrt's infinite one)."""
    u = (images.flatten(1) + 1) / 2
    var = (u - u.mean(1, keepdim=True)).square().mean(1)
    positive = var > 0
    return torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)


# --- JPEG sizes (DDPO's compressibility reward) ------------------------------------------------------------------
def jpeg_kilobytes(images: torch.Tensor, pad: int = 0, quality: int = 95) -> torch.Tensor:
    """The size in kB (1000 bytes) of each image saved as JPEG at `quality` (Pillow), images [B, C, H, W] in
    [-1, 1] mapped to uint8 [0, 255] (padding of `pad` pixels cropped); C = 1 (grey) or 3 (RGB). float32 [B]."""
    from PIL import Image

    from ..data.images import to_uint8

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UnifuseError(f"a JPEG-size reward needs images [B, 1 or 3, H, W], got shape {list(images.shape)}; "
                           "use it on an image data set (brightness and contrast also work on vectors)")
    sizes = []
    for pixels in to_uint8(images, pad):
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="JPEG",
                                                                                  quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def _jpeg_reward(sign: float, pad: int) -> Callable:
    def reward(images, cond=None):
        return sign * jpeg_kilobytes(images.detach(), pad)
    return reward


# --- classifier log-probabilities ---------------------------------------------------------------------------------
def _class_index(spec: str, name: str, num_classes: int) -> int:
    try:
        k = int(spec)
    except ValueError:
        k = -1
    if not 0 <= k < num_classes:
        raise UnifuseError(f"reward {name!r}: class {spec!r} is not one of the classifier's classes 0..{num_classes - 1}; "
                           f"use class:K with an integer K in that range")
    return k


def _as_images(images: torch.Tensor, shape) -> torch.Tensor:
    """[B, D] vectors back to [B, C, H, W] images of the data shape (what flattened samples look like)."""
    return images.reshape(images.shape[0], *shape) if images.ndim == 2 and len(shape) == 3 else images


def _shipped_classifier(spec: str, name: str, info: dict, device) -> Callable:
    """log_softmax of the shipped evaluation classifier (`unifuse.metrics.classifier`), through net.embed and
    net.head so that gradients reach the images (its `classify` runs under no_grad)."""
    from ..metrics.classifier import CLASSIFIER_SETS, load_classifier

    data = info.get("name")
    if data not in CLASSIFIER_SETS:
        raise UnifuseError(f"reward {name!r}: data set {data!r} has no shipped classifier (only "
                           f"{', '.join(CLASSIFIER_SETS)}); train a noise-conditional one on the data with "
                           f"`unifuse train digits-classifier --out DIR` (or a classifier of your own saved the same way) "
                           f"and use class:K@DIR")
    net = load_classifier(data).to(device).requires_grad_(False)
    k = _class_index(spec, name, int(net.config["num_classes"]))
    shape = info.get("shape") or [net.config["in_channels"], net.config["resolution"], net.config["resolution"]]

    expected = [net.config["in_channels"], net.config["resolution"], net.config["resolution"]]

    def reward(images, cond=None):
        x = _as_images(images, shape).to(next(net.parameters()).dtype)
        if list(x.shape[1:]) != expected:
            raise UnifuseError(f"reward {name!r}: the {data} classifier takes images {expected}, got "
                               f"{list(images.shape[1:])}; give images of the data set's shape")
        return torch.log_softmax(net.head(net.embed(x)), dim=1)[:, k].to(images.dtype)
    return reward


def _folder_classifier(spec: str, folder: str, name: str, info: dict, device) -> Callable:
    """log_softmax of the noise-conditional classifier saved in `folder` (`unifuse train digits-classifier
    --out DIR`: classifier.safetensors + classifier.json), evaluated at its path's data end t_min (sigma = 0)."""
    from ..nets.classifier import clean_time, load_noisy_classifier

    shape = info.get("shape")
    clf = load_noisy_classifier(folder, shape if shape and len(shape) == 3 else None,
                                int(info["num_classes"]) if info.get("num_classes") else None)
    clf = clf.to(device).requires_grad_(False)
    k = _class_index(spec, name, clf.num_classes)
    t0 = clean_time(clf.path)

    def reward(images, cond=None):
        x = _as_images(images, shape or [])
        t = torch.full((x.shape[0],), t0, dtype=torch.float64, device=x.device)
        return torch.log_softmax(clf(x.to(clf.out.weight.dtype), t), dim=1)[:, k].to(images.dtype)
    return reward


# --- user rewards -------------------------------------------------------------------------------------------------
def _user_reward(name: str) -> Reward:
    """"module:function" or "path/to/file.py:function": the callable, imported; differentiable unless it has the
    attribute `differentiable = False`."""
    where, _, attr = name.rpartition(":")
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not (where.endswith(".py") and os.path.isfile(where)):
            raise UnifuseError(f"reward {name!r}: no Python file {where!r}; give an existing .py file as "
                               "path/to/file.py:function")
        module_name = "unifuse_user_reward_" + os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module   # registered first, as `import` does (dataclasses, pickling need it)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            if err.name is None or not (where == err.name or where.startswith(err.name + ".")):
                raise  # the module exists but an import inside it failed: show that error as it is
            raise UnifuseError(f"reward {name!r}: module {where!r} not found; install it or add its folder to "
                               "PYTHONPATH, or give a file as path/to/file.py:function") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        found = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise UnifuseError(f"reward {name!r}: {where!r} has no callable {attr!r}; "
                           f"its callables are: {', '.join(found) or 'none'}")
    return checked(fn, name)


# --- by name ------------------------------------------------------------------------------------------------------
def get_reward(name: str, info: dict, device="cpu") -> Reward:
    """A reward by name (see `REWARDS`) for data described by `info` (the run's data_info: name, shape, pad,
    num_classes), its networks on `device`. For a latent run (info["latent"]) the reward takes latents and scores
    their decoded images (`decoded`)."""
    if (info or {}).get("latent"):
        return decoded(get_reward(name, dict(info, shape=info["latent"]["shape"], latent=None), device), info)
    if not isinstance(name, str) or not name:
        raise UnifuseError(f"reward must be a name, got {name!r}; valid rewards: {', '.join(REWARDS)}")
    device = torch.device(device)
    if name in ("compressibility", "incompressibility"):
        return Reward(name, _jpeg_reward(-1.0 if name == "compressibility" else 1.0, int(info.get("pad", 0))), False)
    if name == "brightness":
        return Reward(name, brightness)
    if name == "contrast":
        return Reward(name, contrast)
    if name.startswith("class:"):
        spec, _, folder = name[len("class:"):].partition("@")
        if folder:
            return Reward(name, _folder_classifier(spec, folder, name, info, device))
        return Reward(name, _shipped_classifier(spec, name, info, device))
    if ":" in name:
        return _user_reward(name)
    raise UnifuseError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}")


def decoded(pixel: Reward, info: dict) -> Reward:
    """`pixel` on the decoded images of latents: r(z, cond) = pixel(D(z), cond), differentiable through the decoder
    (the run's codec, `unifuse.latent.find_codec`, found when first called: loading the run registers it)."""
    from ..latent import find_codec

    def fn(latents: torch.Tensor, cond: dict) -> torch.Tensor:
        images = find_codec(info).decode(latents)
        return pixel(images.to(latents.dtype), cond)

    return Reward(pixel.name, fn, pixel.differentiable, pixels=False)


def require_differentiable(reward, method_name: str) -> None:
    """Refuse a reward without gradients for a method that backpropagates through it (DRaFT, ReFL, AlignProp)."""
    if getattr(reward, "differentiable", True):
        return
    from . import METHODS

    others = [n for n, (module, _) in METHODS.items() if module != "backprop"]
    name = getattr(reward, "name", getattr(reward, "__name__", "reward"))
    raise UnifuseError(f"reward {name!r} has no gradient; method {method_name!r} backpropagates through it; "
                       f"use {', '.join(others[:-1])} or {others[-1]}")


__all__ = ["REWARDS", "Reward", "brightness", "checked", "contrast", "get_reward", "jpeg_kilobytes",
           "require_differentiable"]
